"""Status of a FineTuneJob, computed level-triggered from what exists right now.

Pure: `observe` and `compute` take the children as the API server returned them (dicts), the
trainer's progress and the previous status, and return the new status and the Events to
emit. Nothing here remembers anything between calls except what is in the previous status,
so an operator restarted at any moment computes the same answer from the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from kubetune.api.status import MAX_RUN_HISTORY, Phase
from kubetune.controller.children import ATTEMPT_LABEL, COMPLETION_INDEX_ANNOTATION, CONTAINER
from kubetune.controller.progress import Progress, format_eta, parse_summary

Obj = dict[str, Any]
TERMINAL: tuple[Phase, ...] = ("Succeeded", "Failed")
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Succeeded", "Failed", "Suspended")
AttemptState = Literal[
    "missing", "suspended", "active", "succeeded", "failed", "rejected", "deadline"
]
RETRY_BASE_SECONDS = 10.0
RETRY_MAX_SECONDS = 600.0
"""Delay before attempt n+1: base * 2^(n-1), at most this (Kubernetes Jobs back off alike)."""


def timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# -- reading the children -----------------------------------------------------------------------


def _conditions(obj: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def attempt_of(obj: Obj) -> int:
    try:
        return int(obj["metadata"]["labels"][ATTEMPT_LABEL])
    except (KeyError, ValueError):
        return 0


def job_state(job: Obj | None) -> AttemptState:
    if job is None:
        return "missing"
    conditions = _conditions(job)

    def true(kind: str) -> bool:
        return conditions.get(kind, {}).get("status") == "True"

    if true("Complete"):
        return "succeeded"
    if true("Failed"):
        reason = conditions["Failed"].get("reason")
        if reason == "DeadlineExceeded":
            return "deadline"
        # The pod failure policy's FailJob rule: the trainer exited 2 (bad spec, data, model
        # or output), which no retry can fix.
        return "rejected" if reason == "PodFailurePolicy" else "failed"
    if (job.get("spec") or {}).get("suspend") and not (job.get("status") or {}).get("active"):
        return "suspended"
    return "active"


def termination_message(pods: list[Obj]) -> str | None:
    """The most telling termination message of an attempt's pods: rank 0's, else a failed
    pod's (where the error is), else any."""

    def key(pod: Obj) -> tuple[int, int]:
        index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
        failed = (pod.get("status") or {}).get("phase") == "Failed"
        return (0 if index == "0" else 1, 0 if failed else 1)

    for pod in sorted(pods, key=key):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status.get("name") != CONTAINER:
                continue
            terminated = (status.get("state") or {}).get("terminated") or (
                status.get("lastState") or {}
            ).get("terminated")
            if terminated and terminated.get("message"):
                return str(terminated["message"]).strip()
    return None


def unschedulable(pods: list[Obj]) -> str | None:
    for pod in pods:
        scheduled = _conditions(pod).get("PodScheduled")
        if scheduled and scheduled.get("status") == "False":
            return str(scheduled.get("message") or scheduled.get("reason") or "unschedulable")
    return None


# -- what the operator saw ----------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """Everything the status depends on, gathered by the handlers."""

    generation: int
    run: str
    """The run id the spec asks for now."""
    output_path: str
    """The run's directory relative to the output volume."""
    now: datetime | None = None
    run_spec: Obj | None = None
    """What the run records of the spec (see runs.py)."""
    backoff_limit: int = 3
    suspend: bool = False
    merge: bool = True
    retrain_token: str | None = None
    jobs: list[Obj] = field(default_factory=list)
    """The batch Jobs of this run (every attempt)."""
    pods: list[Obj] = field(default_factory=list)
    """The pods of the latest attempt."""
    progress: Progress | None = None
    spec_error: str | None = None
    blocked: tuple[str, str] | None = None
    """(reason, message) when a child could not be created: its name held by another owner's
    object (ChildNameTaken), a quota (ExceededQuota) or a rejection (CreateRejected)."""

    @property
    def latest(self) -> Obj | None:
        return max(self.jobs, key=attempt_of, default=None)

    @property
    def attempt(self) -> int:
        latest = self.latest
        return attempt_of(latest) if latest is not None else 0


def finished_phase(previous: Obj, run: str) -> Phase | None:
    """The outcome already recorded for `run`, if it finished (its Job may be gone since)."""
    for record in previous.get("runs") or []:
        if record.get("id") == run and record.get("phase") in TERMINAL:
            phase: Phase = record["phase"]
            return phase
    return None


def attempt_state(observed: Observed) -> AttemptState:
    """The latest attempt's state; a failure the trainer reported as bad input (exit 2 under
    torchrun, which exits 1 itself, so the pod failure policy cannot see it) is "rejected"."""
    state = job_state(observed.latest)
    if state == "failed" and (parse_summary(termination_message(observed.pods)) or {}).get(
        "invalid"
    ):
        return "rejected"
    return state


def retry_in(observed: Observed) -> float:
    """Seconds until the next attempt may start after a failed one (0: now)."""
    failed = _conditions(observed.latest or {}).get("Failed", {})
    since = parse_time(failed.get("lastTransitionTime"))
    if since is None or observed.now is None:
        return 0.0
    delay = min(RETRY_BASE_SECONDS * 2.0 ** max(observed.attempt - 1, 0), RETRY_MAX_SECONDS)
    return max(0.0, delay - (observed.now - since).total_seconds())


def next_attempt(observed: Observed, previous: Obj) -> int | None:
    """The attempt whose Job must exist now, or None when the run needs no (new) Job."""
    if observed.spec_error or finished_phase(previous, observed.run):
        return None
    state = attempt_state(observed)
    if state == "missing":
        return 1
    if state == "failed" and observed.attempt <= observed.backoff_limit:
        return observed.attempt + 1 if retry_in(observed) == 0 else None
    if state in ("succeeded", "failed", "rejected", "deadline"):
        return None
    return observed.attempt


# -- the status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: str
    message: str
    reconciling: bool = False
    stalled: bool = False
    """Needs a person although the run has not failed (kstatus Stalled)."""


def verdict(observed: Observed, previous: Obj) -> Verdict:
    if observed.spec_error:
        return Verdict("Failed", "InvalidSpec", observed.spec_error)
    if observed.blocked:
        reason, message = observed.blocked
        # A quota frees up and a garbage-collected name comes free; a rejection needs a person.
        resolves = reason in ("ChildNameTaken", "ExceededQuota")
        return Verdict("Pending", reason, message, reconciling=resolves, stalled=not resolves)
    done = finished_phase(previous, observed.run)
    latest = observed.latest
    state = attempt_state(observed)
    if done and state == "missing":
        return Verdict(done, f"Run{done}", f"run {observed.run} {done.lower()}")
    attempts = f"attempt {observed.attempt} of {observed.backoff_limit + 1}"
    last_words = _last_words(observed.pods)
    if state == "succeeded":
        summary = parse_summary(termination_message(observed.pods)) or {}
        if summary.get("reused"):  # a re-created FineTuneJob found its finished run
            return Verdict("Succeeded", "OutputReused", f"run {observed.run}: {summary['message']}")
        return Verdict("Succeeded", "TrainingSucceeded", f"run {observed.run} succeeded")
    if state == "deadline":
        return Verdict("Failed", "DeadlineExceeded", f"run {observed.run}: {_deadline(latest)}")
    if state == "rejected":
        return Verdict(
            "Failed",
            "InvalidInput",
            f"run {observed.run} stopped, not retried (bad spec, data, model or output): "
            f"{last_words}",
        )
    if state == "failed":
        # Once recorded Failed, a run stays so (raising backoffLimit later retries nothing;
        # the retrain-token annotation starts a new run).
        if observed.attempt > observed.backoff_limit or done == "Failed":
            return Verdict(
                "Failed",
                "BackoffLimitExceeded",
                f"run {observed.run} failed after {observed.attempt} attempts: {last_words}",
            )
        wait = retry_in(observed)
        # An absolute time: a countdown would change the status (a write) on every tick.
        at = timestamp(observed.now + timedelta(seconds=wait)) if observed.now else None
        when = f"at {at}" if wait > 0 and at else "now"
        return Verdict(
            "Pending", "Retrying", f"{attempts} failed, the next starts {when}: {last_words}", True
        )
    if state == "missing":
        return Verdict("Pending", "Creating", f"creating the Job of run {observed.run}", True)
    if observed.suspend:
        return Verdict("Suspended", "Suspended", "spec.runPolicy.suspend is true")
    if state == "suspended":
        return Verdict("Queued", "Queued", "the Job waits for admission (Kueue)")
    running = [p for p in observed.pods if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        progress = observed.progress
        if progress and progress.trainer_phase in ("merging", "exporting"):
            return Verdict("Merging", progress.trainer_phase.capitalize(), "exporting the model")
        return Verdict("Running", "Training", f"{len(running)} pod(s) training, {attempts}")
    waiting = container_problem(observed.pods)
    if waiting is not None:
        reason, message = waiting
        return Verdict(
            "Pending", reason, message, reconciling=reason in RETRIED_WAITING,
            stalled=reason not in RETRIED_WAITING,
        )  # fmt: skip
    # Both may resolve by themselves (a node frees up or is added; pods start).
    blocked = unschedulable(observed.pods)
    if blocked:
        return Verdict("Pending", "Unschedulable", blocked, True)
    if observed.jobs and not observed.pods and latest is not None and _created_long_ago(observed):
        return Verdict(
            "Pending",
            "PodsNotCreated",
            f"the Job {latest['metadata']['name']} has created no pod yet (see its Events: a "
            "quota, a LimitRange or Pod Security admission may reject them)",
            True,
        )
    return Verdict("Pending", "PodsPending", f"waiting for the training pods, {attempts}", True)


RETRIED_WAITING = ("ErrImagePull", "ImagePullBackOff", "ContainerCreating", "PodInitializing")
"""Container waiting reasons the kubelet keeps retrying; any other one needs a person."""
PROBLEM_WAITING = (
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
)  # fmt: skip


def container_problem(pods: list[Obj]) -> tuple[str, str] | None:
    """(reason, message) of the first container that cannot start, e.g. an image that cannot
    be pulled or a Secret that does not exist."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in PROBLEM_WAITING:
                name = pod["metadata"].get("name", "a training pod")
                return str(reason), f"{name}: {reason}: {waiting.get('message') or ''}".strip()
    return None


PODS_EXPECTED_WITHIN = 60.0
"""Seconds after which a Job without any pod is reported (the Job controller failed to
create them)."""


def _created_long_ago(observed: Observed) -> bool:
    created = parse_time((observed.latest or {}).get("metadata", {}).get("creationTimestamp"))
    if created is None or observed.now is None:
        return False
    active = (observed.latest or {}).get("status", {}).get("active")
    return not active and (observed.now - created).total_seconds() > PODS_EXPECTED_WITHIN


def _last_words(pods: list[Obj]) -> str:
    message = termination_message(pods)
    summary = parse_summary(message)
    if summary is not None:
        return str(summary.get("message") or summary.get("phase") or "")
    return message or "no termination message"


def _deadline(job: Obj | None) -> str:
    failed = _conditions(job or {}).get("Failed", {})
    return str(failed.get("message") or "activeDeadlineSeconds exceeded")


def conditions(previous: list[Obj], verdict: Verdict, generation: int, now: datetime) -> list[Obj]:
    """The full list (a merge patch replaces lists whole); lastTransitionTime kept unless
    the condition's status changed."""
    phase = verdict.phase
    wanted = {
        "Ready": phase in ("Running", "Merging", "Succeeded"),
        "Reconciling": verdict.reconciling,
        "Stalled": phase == "Failed" or verdict.stalled,
        "Succeeded": phase == "Succeeded",
        "Failed": phase == "Failed",
        "Suspended": phase == "Suspended",
    }
    before = {c.get("type"): c for c in previous}
    out = []
    for kind in CONDITION_TYPES:
        status = "True" if wanted[kind] else "False"
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": verdict.reason if wanted[kind] or kind == "Ready" else phase,
                "message": verdict.message if wanted[kind] or kind == "Ready" else "",
                "lastTransitionTime": since or timestamp(now),
                "observedGeneration": generation,
            }
        )
    return out


def _current_run(observed: Observed, previous: Obj, verdict: Verdict, now: datetime) -> Obj:
    old = previous.get("currentRun") or {}
    same = old.get("id") == observed.run
    earlier: Obj = next((r for r in previous.get("runs") or [] if r.get("id") == observed.run), {})
    run: Obj = {
        "id": observed.run,
        "attempt": max(observed.attempt, 1),
        "generation": old.get("generation") if same else observed.generation,
        "startedAt": old.get("startedAt") if same else earlier.get("startedAt", timestamp(now)),
    }
    if observed.retrain_token:
        run["retrainToken"] = observed.retrain_token
    if observed.run_spec is not None:
        run["spec"] = observed.run_spec
    if not same and "finalLoss" in earlier:
        run["loss"] = earlier["finalLoss"]  # a revert to a finished run shows its result
    # Keep the last numbers seen when the trainer is not reachable this time.
    for key in ("step", "totalSteps", "progress", "epoch", "loss", "evalLoss"):
        if same and key in old:
            run[key] = old[key]
    progress = observed.progress
    summary = parse_summary(termination_message(observed.pods))
    if summary is not None:
        progress = Progress(
            step=summary.get("steps"),
            total_steps=summary.get("totalSteps"),
            loss=summary.get("finalLoss"),
            eval_loss=summary.get("finalEvalLoss"),
        )
    if progress is not None:
        live = {
            "step": progress.step,
            "totalSteps": progress.total_steps,
            "epoch": progress.epoch,
            "loss": progress.loss,
            "evalLoss": progress.eval_loss,
            "tokensPerSecond": progress.tokens_per_second,
            "eta": format_eta(progress.eta_seconds),
        }
        run.update({k: v for k, v in live.items() if v is not None})
        if progress.step is not None and progress.total_steps:
            run["progress"] = f"{progress.step}/{progress.total_steps}"
    if verdict.phase in TERMINAL:
        run.pop("eta", None)
        run.pop("tokensPerSecond", None)
    return run


def _record(
    run: Obj, phase: str, output_path: str | None, now: datetime, outputs: Obj | None = None
) -> Obj:
    record = {
        "id": run["id"],
        "generation": run.get("generation"),
        "phase": phase,
        "startedAt": run.get("startedAt"),
        "finishedAt": timestamp(now),
        "outputPath": output_path,
        "finalLoss": run.get("loss"),
        "outputs": outputs,
    }
    return {k: v for k, v in record.items() if v is not None}


@dataclass(frozen=True)
class Transition:
    """A Kubernetes Event to emit: the job changed phase."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def compute(observed: Observed, previous: Obj, now: datetime) -> tuple[Obj, list[Transition]]:
    """The new status (full; lists whole) and the Events that go with the change."""
    judged = verdict(observed, previous)
    # The current run has no unfinished record: a run superseded earlier and now current
    # again (a revert) records its outcome when it finishes.
    runs = [
        dict(r) for r in previous.get("runs") or []
        if r.get("id") != observed.run or r.get("phase") in TERMINAL
    ]  # fmt: skip
    old_run = previous.get("currentRun") or {}
    events: list[Transition] = []
    if old_run.get("id") and old_run["id"] != observed.run:
        # A new run replaces the previous one; record it unless it already finished.
        if not any(r.get("id") == old_run["id"] for r in runs):
            runs.append(_record(old_run, "Superseded", None, now))
        events.append(
            Transition("Normal", "NewRun", f"run {observed.run} replaces {old_run['id']}")
        )
    current = _current_run(observed, previous, judged, now)
    recorded = next((r for r in runs if r.get("id") == observed.run), None)
    outputs = None
    if judged.phase == "Succeeded":
        outputs = (recorded or {}).get("outputs") or _outputs(observed)
    if judged.phase in TERMINAL and judged.reason != "InvalidSpec" and recorded is None:
        path = observed.output_path if judged.phase == "Succeeded" else None
        runs.append(_record(current, judged.phase, path, now, outputs))
    runs = runs[-MAX_RUN_HISTORY:]
    status: Obj = {
        "phase": judged.phase,
        "observedGeneration": observed.generation,
        "conditions": conditions(
            previous.get("conditions") or [], judged, observed.generation, now
        ),
        "currentRun": current,
        "runs": runs,
        "message": judged.message,
    }
    if outputs:
        status["outputs"] = outputs
    elif previous.get("outputs"):
        status["outputs"] = previous["outputs"]  # the latest successful run's, still valid
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    old_reason = (before.get("Ready") or {}).get("reason")
    problem = judged.stalled or judged.reason in (*PROBLEM_WAITING, "ExceededQuota")
    if previous.get("phase") != judged.phase or (problem and old_reason != judged.reason):
        warn = judged.phase == "Failed" or problem
        kind: Literal["Normal", "Warning"] = "Warning" if warn else "Normal"
        events.append(Transition(kind, judged.reason, f"{judged.phase}: {judged.message}"))
    return status, events


def _outputs(observed: Observed) -> Obj:
    """The succeeded run's outputs: what its summary lists, else what its spec asked for."""
    summary = parse_summary(termination_message(observed.pods))
    produced = set((summary or {}).get("outputs") or {}) or {"adapter", "merged"}
    outputs = {name: f"{observed.output_path}/{name}" for name in ("adapter", "merged")}
    return {k: v for k, v in outputs.items() if k in produced and (k != "merged" or observed.merge)}


def with_progress_only_changed(old: Obj, new: Obj) -> bool:
    """True when only live numbers differ (those writes are rate-limited)."""

    def strip(status: Obj) -> Obj:
        run = dict(status.get("currentRun") or {})
        for key in ("step", "progress", "epoch", "loss", "evalLoss", "tokensPerSecond", "eta"):
            run.pop(key, None)
        return {**status, "currentRun": run}

    return old != new and strip(old) == strip(new)


__all__ = [
    "Observed",
    "Transition",
    "Verdict",
    "compute",
    "next_attempt",
    "with_progress_only_changed",
]
