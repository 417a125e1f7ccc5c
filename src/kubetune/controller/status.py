"""Status of a FineTuneJob, computed level-triggered from what exists right now.

Pure: `compute` takes what observe.py read of the children, the trainer's progress and the
previous status, and returns the new status and the Events to emit. Nothing here remembers
anything between calls except what is in the previous status, so an operator restarted at any
moment computes the same answer from the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from kubetune.api.status import MAX_RUN_HISTORY, Phase
from kubetune.controller.observe import (
    PODS_EXPECTED_WITHIN,
    PROBLEM_WAITING,
    STALLED_AFTER,
    TERMINAL,
    Observed,
    attempt_state,
    container_problem,
    disruption,
    disruptions_spent,
    finished_phase,
    invalid_spec,
    job_state,
    next_attempt,
    oom_killed,
    parse_time,
    podless_for,
    prunable,
    retry_in,
    termination_message,
    timestamp,
    unschedulable,
)
from kubetune.controller.observe import conditions_of as _conditions
from kubetune.controller.progress import Progress, format_eta, parse_summary
from kubetune.controller.redact import redact

CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Succeeded", "Failed", "Suspended")

Obj = dict[str, Any]


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
    retry_left = observed.attempt <= observed.backoff_limit and done != "Failed"
    if observed.suspend and observed.queued and (state == "missing" or (
        state == "failed" and retry_left
    )):  # fmt: skip
        return Verdict("Suspended", "Suspended", "spec.runPolicy.suspend is true")
    attempts = f"attempt {observed.attempt} of {observed.backoff_limit + 1}"
    last_words = _last_words(observed.pods)
    if observed.disrupted or (state == "deleting" and not observed.suspend):
        why = f" ({observed.disrupted})" if observed.disrupted else ""
        return Verdict(
            "Pending",
            "AttemptDisrupted",
            f"attempt {observed.attempt} was disrupted{why}: its pods stop (saving a "
            "checkpoint), then it starts again whole, not counted as a retry",
            reconciling=True,
        )
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
    if observed.suspend:
        return Verdict("Suspended", "Suspended", "spec.runPolicy.suspend is true")
    if state == "missing":
        return Verdict("Pending", "Creating", f"creating the Job of run {observed.run}", True)
    if state == "suspended":
        return Verdict("Queued", "Queued", "the Job waits for admission (Kueue)", True)
    # A pod that finished well still counts until the Job controller marks the Job Complete
    # (a moment later): the status must not fall back to Pending in between.
    running = [
        p for p in observed.pods
        if (p.get("status") or {}).get("phase") in ("Running", "Succeeded")
    ]  # fmt: skip
    if running:
        progress = observed.progress
        if progress and progress.trainer_phase in ("merging", "exporting"):
            return Verdict("Merging", progress.trainer_phase.capitalize(), "exporting the model")
        return Verdict("Running", "Training", f"{len(running)} pod(s) training, {attempts}")
    waiting = container_problem(observed.pods, observed.now)
    if waiting is not None:
        reason, message, stalled = waiting
        return Verdict("Pending", reason, message, reconciling=not stalled, stalled=stalled)
    # Both may resolve by themselves (a node frees up or is added; pods start).
    blocked = unschedulable(observed.pods)
    if blocked:
        return Verdict("Pending", "Unschedulable", blocked, True)
    podless = podless_for(observed) if not observed.pods else 0.0
    if latest is not None and podless > PODS_EXPECTED_WITHIN:
        # Still retried by the Job controller; after a while, a person is asked.
        stalled = podless > STALLED_AFTER
        return Verdict(
            "Pending",
            "PodsNotCreated",
            f"the Job {latest['metadata']['name']} has created no pod yet (see its Events: a "
            "quota, a LimitRange or Pod Security admission may reject them)",
            reconciling=not stalled,
            stalled=stalled,
        )
    return Verdict("Pending", "PodsPending", f"waiting for the training pods, {attempts}", True)


def _last_words(pods: list[Obj]) -> str:
    message = termination_message(pods)
    summary = parse_summary(message)
    if summary is not None:
        return str(summary.get("message") or summary.get("phase") or "")
    if oom_killed(pods):
        # The kernel killed it: nothing of its own was written, and its log may be empty.
        said = f"; its log ended: {message}" if message else ""
        return f"OOMKilled: the trainer needed more memory than spec.resources.memory{said}"
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
        # Without Jobs (an invalid spec, a finished run's Jobs gone) the attempt stays.
        "attempt": max(observed.attempt, 1) if observed.jobs or not same else old.get("attempt", 1),
        "generation": old.get("generation") if same else observed.generation,
        "startedAt": old.get("startedAt") if same else earlier.get("startedAt", timestamp(now)),
    }
    for key in ("disruptions", "disruptedJob"):
        if same and old.get(key):
            run[key] = old[key]
    latest = (observed.latest or {}).get("metadata") or {}
    stopped = latest.get("uid") or latest.get("name")
    if observed.disrupted and stopped and run.get("disruptedJob") != stopped:
        run["disruptions"] = int(run.get("disruptions") or 0) + 1
        run["disruptedJob"] = stopped
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
    # Messages quote the trainer's errors, which may quote URLs with credentials.
    judged = replace(judged, message=redact(judged.message))
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
    "TERMINAL",
    "Observed",
    "Transition",
    "Verdict",
    "compute",
    "disruption",
    "disruptions_spent",
    "finished_phase",
    "invalid_spec",
    "job_state",
    "next_attempt",
    "parse_time",
    "prunable",
    "timestamp",
    "with_progress_only_changed",
]
