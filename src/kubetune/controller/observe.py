"""What the operator sees of a run: its Jobs and pods read into states, and the decision of
which attempt must exist now (with retries that wait longer each time).

Pure, like status.py, which turns what is seen here into the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from kubetune.api.status import Phase
from kubetune.controller.children import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_ANNOTATION,
    CONTAINER,
    DISRUPTED_ANNOTATION,
)
from kubetune.controller.progress import Progress, parse_summary

Obj = dict[str, Any]
TERMINAL: tuple[Phase, ...] = ("Succeeded", "Failed")
AttemptState = Literal[
    "missing", "suspended", "active", "succeeded", "failed", "rejected", "deadline", "deleting"
]
RETRY_BASE_SECONDS = 10.0
RETRY_MAX_SECONDS = 600.0
"""Delay before attempt n+1: base * 2^(n-1), at most this (Kubernetes Jobs back off alike)."""
MAX_DISRUPTIONS = 20
"""Times a run's attempts are recreated after disruptions before a disruption counts as a
failure (a trainer whose own memory use gets its node to evict it would loop forever)."""


def timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# -- reading the children -----------------------------------------------------------------------


def conditions_of(obj: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def attempt_of(obj: Obj) -> int:
    try:
        return int(obj["metadata"]["labels"][ATTEMPT_LABEL])
    except (KeyError, ValueError):
        return 0


def job_state(job: Obj | None) -> AttemptState:
    if job is None:
        return "missing"
    conditions = conditions_of(job)

    def true(kind: str) -> bool:
        return conditions.get(kind, {}).get("status") == "True"

    if true("Complete"):
        return "succeeded"
    if true("Failed"):
        reason = conditions["Failed"].get("reason")
        if reason == "DeadlineExceeded":
            return "deadline"
        # The pod failure policy's FailJob rules: the trainer exited 2 (bad spec, data, model
        # or output), which no retry can fix; or a pod of a multi-node attempt was disrupted.
        if reason == "PodFailurePolicy" and not _disruption_rule(conditions["Failed"]):
            return "rejected"
        return "failed"
    meta = job["metadata"]
    if meta.get("deletionTimestamp") and DISRUPTED_ANNOTATION in (meta.get("annotations") or {}):
        # Stopped whole by the operator after a disruption: nothing new starts until its pods
        # are gone (foreground deletion), so no second trainer overlaps them.
        return "deleting"
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


def oom_killed(pods: list[Obj]) -> bool:
    """A trainer container of the attempt was killed for exceeding its memory limit."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            state = status.get("state") or {}
            last = status.get("lastState") or {}
            terminated = state.get("terminated") or last.get("terminated") or {}
            if status.get("name") == CONTAINER and terminated.get("reason") == "OOMKilled":
                return True
    return False


def _disruption_rule(failed: Obj) -> bool:
    """The Job failed by its FailJob rule for DisruptionTarget (multi-node attempts), whose
    message the Job controller writes as "Pod ns/name has condition DisruptionTarget ..."."""
    return failed.get("reason") == "PodFailurePolicy" and "DisruptionTarget" in str(
        failed.get("message") or ""
    )


def disruption(job: Obj | None, pods: list[Obj]) -> str | None:
    """Why a multi-node attempt must be recreated whole, or None: a pod of it was disrupted
    (preempted, evicted, its node drained, shut down or lost: a DisruptionTarget condition on
    a pod that is going or gone), so its peers fail on the broken ring through no fault of the
    run. Read from what lasts: the Job's FailJob rule for DisruptionTarget, the annotation the
    operator puts on a Job it stops, or the pod's condition from before the Job failed. A
    one-pod attempt needs nothing: its Job replaces the pod (the pod failure policy ignores
    disruptions there). Not a disruption: a trainer stopped by SIGTERM for any other reason
    (its peers are terminated that way when one of them crashes)."""
    if job is None or int((job.get("spec") or {}).get("parallelism") or 1) < 2:
        return None
    annotations = job["metadata"].get("annotations") or {}
    if DISRUPTED_ANNOTATION in annotations:
        return str(annotations[DISRUPTED_ANNOTATION])
    if job_state(job) not in ("active", "failed"):
        return None
    # When the Job's end was decided: FailureTarget comes first (the Job controller then waits
    # for every pod to stop before it writes Failed).
    conditions = conditions_of(job)
    ending = [c for kind in ("FailureTarget", "Failed")
              if (c := conditions.get(kind)) and c.get("status") == "True"]  # fmt: skip
    for condition in ending:
        if _disruption_rule(condition):
            return str(condition.get("message"))
    decided = min((str(c.get("lastTransitionTime") or "") for c in ending), default=None)
    for pod in pods:
        target = conditions_of(pod).get("DisruptionTarget") or {}
        going = pod["metadata"].get("deletionTimestamp") or (
            (pod.get("status") or {}).get("phase") == "Failed"
        )
        # A condition on a pod that stays (an eviction a PodDisruptionBudget refused) is
        # stale; one set after the Job's failure was decided (a crash) did not cause it.
        if target.get("status") != "True" or not going:
            continue
        if decided is not None and str(target.get("lastTransitionTime") or "") > decided:
            continue
        said = f": {target['message']}" if target.get("message") else ""
        return f"pod {pod['metadata'].get('name')}: {target.get('reason') or 'disrupted'}{said}"
    return None


def disruptions_spent(observed: Observed, previous: Obj, latest: Obj) -> bool:
    """The run's attempts were recreated MAX_DISRUPTIONS times already (this Job's own
    disruption, once counted, still gets its recreation)."""
    run = previous.get("currentRun") or {}
    if run.get("id") != observed.run or run.get("disruptedJob") == latest["metadata"].get("uid"):
        return False
    return int(run.get("disruptions") or 0) >= MAX_DISRUPTIONS


def unschedulable(pods: list[Obj]) -> str | None:
    for pod in pods:
        scheduled = conditions_of(pod).get("PodScheduled")
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
    queued: bool = False
    """The Job goes through a Kueue queue (resources.queueName)."""
    merge: bool = True
    retrain_token: str | None = None
    jobs: list[Obj] = field(default_factory=list)
    """The batch Jobs of this run (every attempt)."""
    pods: list[Obj] = field(default_factory=list)
    """The pods of the latest attempt."""
    progress: Progress | None = None
    disrupted: str | None = None
    """Why the latest attempt is being recreated whole (see `disruption`)."""
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
    failed = conditions_of(observed.latest or {}).get("Failed", {})
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
    retry_left = observed.attempt <= observed.backoff_limit
    if observed.suspend and observed.queued and (state == "missing" or (
        state == "failed" and retry_left
    )):  # fmt: skip
        # Suspended under a Kueue queue: no Job at all (a suspended Job would be unsuspended
        # by Kueue as soon as its workload is admitted); resuming creates it again.
        return None
    if state == "missing":
        return 1
    if state == "deleting" or observed.disrupted:
        return None  # once it is gone, the same attempt is created again
    if state == "failed" and observed.attempt <= observed.backoff_limit:
        return observed.attempt + 1 if retry_in(observed) == 0 else None
    if state in ("succeeded", "failed", "rejected", "deadline"):
        return None
    return observed.attempt


PROBLEM_WAITING = (
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
)  # fmt: skip


IMAGE_PULL = ("ErrImagePull", "ImagePullBackOff")
"""The kubelet alternates these on every back-off cycle: reported as one, with one message,
so the flips cost neither a status write nor an Event."""
STALLED_AFTER = 600.0
"""Seconds a pod may wait on a retried problem (an image pull) before a person is asked."""


def container_problem(pods: list[Obj], now: datetime | None) -> tuple[str, str, bool] | None:
    """(reason, message, stalled) of the first container (lowest completion index) that
    cannot start, e.g. an image that cannot be pulled or a Secret that does not exist."""

    def index(pod: Obj) -> int:
        annotations = pod["metadata"].get("annotations") or {}
        value = annotations.get(COMPLETION_INDEX_ANNOTATION, "")
        return int(value) if value.isdigit() else 1 << 30

    for pod in sorted(pods, key=index):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason not in PROBLEM_WAITING:
                continue
            name = pod["metadata"].get("name", "a training pod")
            if reason in IMAGE_PULL:
                created = parse_time(pod["metadata"].get("creationTimestamp"))
                waited = (now - created).total_seconds() if created and now else 0.0
                message = f"{name}: cannot pull its image (kubectl describe pod {name})"
                return "ImagePullBackOff", message, waited > STALLED_AFTER
            return str(reason), f"{name}: {reason}: {waiting.get('message') or ''}".strip(), True
    return None


PODS_EXPECTED_WITHIN = 60.0
"""Seconds after which a Job without any pod is reported (the Job controller failed to
create them)."""


def podless_for(observed: Observed) -> float:
    """Seconds the latest Job has been running (created, or last resumed: startTime) without
    an active pod; 0 when it has one or is suspended (queued by Kueue, or paused)."""
    job = observed.latest or {}
    status = job.get("status") or {}
    if observed.now is None or status.get("active") or (job.get("spec") or {}).get("suspend"):
        return 0.0
    times = [parse_time(job.get("metadata", {}).get("creationTimestamp")),
             parse_time(status.get("startTime"))]  # fmt: skip
    since = max((t for t in times if t is not None), default=None)
    return 0.0 if since is None else (observed.now - since).total_seconds()


def invalid_spec(
    previous: Obj, fallback_run: str, generation: int, error: str, now: datetime
) -> Observed:
    """What an invalid spec observes: the current run and its record unchanged; this
    generation observed (kstatus then reads Stalled, not InProgress for ever)."""
    current = previous.get("currentRun") or {}
    return Observed(
        generation,
        str(current.get("id") or fallback_run),
        "",
        now=now,
        run_spec=current.get("spec"),
        spec_error=error,
        retrain_token=current.get("retrainToken"),
    )


KEEP_FAILED_ATTEMPTS = 3
"""Failed attempts' Jobs kept (with their pods, for `kubectl logs`); older ones are deleted,
so a run retried a hundred times does not leave a hundred Jobs."""


def prunable(jobs: list[Obj], keep: int = KEEP_FAILED_ATTEMPTS) -> list[Obj]:
    """The failed attempts' Jobs beyond the newest `keep`; never the latest attempt."""
    ordered = sorted(jobs, key=attempt_of)
    failed = [j for j in ordered[:-1] if job_state(j) in ("failed", "rejected", "deadline")]
    return failed[: max(len(failed) - keep, 0)]
