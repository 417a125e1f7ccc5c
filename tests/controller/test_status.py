"""Status computed level-triggered from given children (no cluster): phases, conditions,
attempts, progress, history."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune.controller import children as ch
from kubetune.controller import status as st
from kubetune.controller.observe import attempt_of
from kubetune.controller.progress import Progress

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
RUN = "quickstart-1234abcd"
Obj = dict[str, Any]


def batch_job(attempt: int = 1, condition: str | None = None, reason: str = "", **spec: Any) -> Obj:
    status: Obj = {}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason}]
    return {
        "metadata": {"name": f"{RUN}-{attempt}", "namespace": "ns",
                     "labels": {ch.ATTEMPT_LABEL: str(attempt)}},
        "spec": spec,
        "status": status,
    }  # fmt: skip


def pod(phase: str = "Running", index: int = 0, message: str | None = None, **extra: Any) -> Obj:
    status: Obj = {"phase": phase, "podIP": "10.0.0.1", **extra}
    if message is not None:
        status["containerStatuses"] = [
            {"name": ch.CONTAINER, "state": {"terminated": {"exitCode": 1, "message": message}}}
        ]
    return {
        "metadata": {"annotations": {ch.COMPLETION_INDEX_ANNOTATION: str(index)}},
        "spec": {"containers": [{"name": ch.CONTAINER, "ports": [
            {"name": "metrics", "containerPort": 9090}]}]},
        "status": status,
    }  # fmt: skip


def observed(**changes: Any) -> st.Observed:
    values: Obj = {"generation": 1, "run": RUN, "output_path": f"quickstart/{RUN}"}
    return st.Observed(**(values | changes))


def conditions(status: Obj) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_no_job_yet_is_pending_and_reconciling() -> None:
    status, events = st.compute(observed(), {}, NOW)
    assert status["phase"] == "Pending"
    assert conditions(status) == {
        "Ready": "False", "Reconciling": "True", "Stalled": "False",
        "Succeeded": "False", "Failed": "False", "Suspended": "False",
    }  # fmt: skip
    assert status["observedGeneration"] == 1
    assert status["currentRun"]["id"] == RUN
    assert [e.reason for e in events] == ["Creating"]
    assert st.next_attempt(observed(), {}) == 1


def test_running_pods_make_it_ready_with_progress() -> None:
    progress = Progress(step=5, total_steps=20, loss=1.25, eta_seconds=3725, epoch=0.5)
    seen = observed(jobs=[batch_job()], pods=[pod()], progress=progress)
    status, _ = st.compute(seen, {}, NOW)
    assert status["phase"] == "Running"
    assert conditions(status)["Ready"] == "True"
    assert conditions(status)["Reconciling"] == "False"
    run = status["currentRun"]
    assert run["progress"] == "5/20" and run["loss"] == 1.25 and run["eta"] == "1h02m"
    assert st.next_attempt(seen, status) == 1  # nothing to create


def test_unschedulable_pod_is_visible_with_its_reason() -> None:
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/9 nodes are available: 9 Insufficient nvidia.com/gpu."}  # fmt: skip
    seen = observed(jobs=[batch_job()], pods=[pod("Pending", conditions=[scheduled])])
    status, _ = st.compute(seen, {}, NOW)
    assert status["phase"] == "Pending"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in ready["message"]


def test_failed_attempt_retries_until_the_backoff_limit_then_fails_with_the_message() -> None:
    summary = json.dumps({"runId": RUN, "phase": "Failed", "message": "CUDA out of memory"})
    first = observed(jobs=[batch_job(1, "Failed")], pods=[pod("Failed", message=summary)])
    assert st.next_attempt(first, {}) == 2
    status, _ = st.compute(first, {}, NOW)
    assert status["phase"] == "Pending" and conditions(status)["Reconciling"] == "True"

    jobs = [batch_job(a, "Failed") for a in (1, 2, 3, 4)]
    last = observed(jobs=jobs, pods=[pod("Failed", message=summary)], backoff_limit=3)
    assert st.next_attempt(last, {}) is None
    status, events = st.compute(last, {"phase": "Running"}, NOW)
    assert status["phase"] == "Failed"
    assert conditions(status)["Stalled"] == "True" and conditions(status)["Failed"] == "True"
    assert "CUDA out of memory" in status["message"]
    assert "after 4 attempts" in status["message"]
    assert status["runs"][-1]["phase"] == "Failed"
    assert events[-1].type == "Warning"


def test_log_tail_is_the_message_when_the_trainer_wrote_no_summary() -> None:
    jobs = [batch_job(1, "Failed")]
    seen = observed(jobs=jobs, pods=[pod("Failed", message="Traceback: boom")], backoff_limit=0)
    status, _ = st.compute(seen, {}, NOW)
    assert status["phase"] == "Failed" and "Traceback: boom" in status["message"]


def test_an_oom_kill_is_named_as_such() -> None:
    """The kernel's kill leaves no summary and often no log: the reason says what happened."""
    killed = pod("Failed")
    killed["status"]["containerStatuses"] = [
        {"name": ch.CONTAINER, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
    ]
    seen = observed(jobs=[batch_job(1, "Failed")], pods=[killed], backoff_limit=0)
    status, events = st.compute(seen, {}, NOW)
    assert status["phase"] == "Failed"
    assert "OOMKilled" in status["message"] and "spec.resources.memory" in status["message"]
    assert "OOMKilled" in events[-1].message


def test_deadline_fails_at_once() -> None:
    seen = observed(jobs=[batch_job(1, "Failed", "DeadlineExceeded")])
    assert st.next_attempt(seen, {}) is None
    status, _ = st.compute(seen, {}, NOW)
    assert status["phase"] == "Failed" and "Deadline" in status["conditions"][0]["reason"]


def test_success_records_history_outputs_and_final_numbers() -> None:
    outputs = {"adapter": "/x", "merged": "/y"}
    summary = json.dumps({"runId": RUN, "phase": "Succeeded", "steps": 20, "totalSteps": 20,
                          "finalLoss": 0.5, "outputs": outputs})  # fmt: skip
    seen = observed(jobs=[batch_job(1, "Complete")], pods=[pod("Succeeded", message=summary)])
    status, _ = st.compute(seen, {"phase": "Running"}, NOW)
    assert status["phase"] == "Succeeded"
    assert conditions(status)["Ready"] == "True" and conditions(status)["Succeeded"] == "True"
    assert status["currentRun"]["progress"] == "20/20" and status["currentRun"]["loss"] == 0.5
    assert status["outputs"] == {
        "adapter": f"quickstart/{RUN}/adapter",
        "merged": f"quickstart/{RUN}/merged",
    }
    assert status["runs"] == [
        {"id": RUN, "generation": 1, "phase": "Succeeded", "startedAt": "2025-01-02T03:04:05Z",
         "finishedAt": "2025-01-02T03:04:05Z", "outputPath": f"quickstart/{RUN}",
         "finalLoss": 0.5, "outputs": status["outputs"]}
    ]  # fmt: skip
    # Level-triggered: the same objects give the same status, and a finished run whose Job is
    # gone is not started again.
    again, events = st.compute(seen, status, NOW + timedelta(minutes=1))
    assert again == status and events == []
    gone = observed()
    assert st.next_attempt(gone, status) is None
    assert st.compute(gone, status, NOW)[0]["phase"] == "Succeeded"


def test_a_new_run_supersedes_the_current_one_in_history() -> None:
    old = {"phase": "Running", "currentRun": {"id": "quickstart-00000000", "generation": 1}}
    status, events = st.compute(observed(generation=2), old, NOW)
    assert status["currentRun"]["id"] == RUN and status["currentRun"]["generation"] == 2
    assert status["runs"][-1]["id"] == "quickstart-00000000"
    assert status["runs"][-1]["phase"] == "Superseded"
    assert events[0].reason == "NewRun"


def test_history_is_bounded() -> None:
    runs = [{"id": f"r{i}", "phase": "Succeeded"} for i in range(st.MAX_RUN_HISTORY)]
    previous = {"runs": runs, "currentRun": {"id": "r-running"}, "phase": "Running"}
    status, _ = st.compute(observed(), previous, NOW)
    assert len(status["runs"]) == st.MAX_RUN_HISTORY
    assert status["runs"][0]["id"] == "r1" and status["runs"][-1]["id"] == "r-running"


def test_suspend_and_queue() -> None:
    status, _ = st.compute(observed(jobs=[batch_job(suspend=True)], suspend=True), {}, NOW)
    assert status["phase"] == "Suspended" and conditions(status)["Suspended"] == "True"
    status, _ = st.compute(observed(jobs=[batch_job(suspend=True)]), {}, NOW)
    assert status["phase"] == "Queued"


def test_invalid_spec_is_stalled() -> None:
    status, _ = st.compute(observed(spec_error="spec.x: bad"), {}, NOW)
    assert status["phase"] == "Failed" and conditions(status)["Stalled"] == "True"
    assert status["message"] == "spec.x: bad"


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    first, _ = st.compute(observed(jobs=[batch_job()], pods=[pod()]), {}, NOW)
    later, _ = st.compute(
        observed(jobs=[batch_job()], pods=[pod()]), first, NOW + timedelta(minutes=5)
    )
    ready = next(c for c in later["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2025-01-02T03:04:05Z"


def test_progress_only_changes_are_recognised_for_coalescing() -> None:
    def at(step: int) -> st.Observed:
        progress = Progress(step=step, total_steps=9)
        return observed(jobs=[batch_job()], pods=[pod()], progress=progress)

    one, _ = st.compute(at(1), {}, NOW)
    two, _ = st.compute(at(2), one, NOW)
    assert st.with_progress_only_changed(one, two)
    assert not st.with_progress_only_changed(one, one)


def failed_job(attempt: int, reason: str, at: datetime) -> Obj:
    job = batch_job(attempt, "Failed", reason)
    job["status"]["conditions"][0]["lastTransitionTime"] = st.timestamp(at)
    return job


def test_exit_2_fails_the_run_at_once_without_a_retry() -> None:
    rejected = observed(
        jobs=[failed_job(1, "PodFailurePolicy", NOW)],
        pods=[pod("Failed", message="error: model.path: no such directory")],
        now=NOW,
    )
    assert st.next_attempt(rejected, {}) is None
    status, _ = st.compute(rejected, {}, NOW)
    assert status["phase"] == "Failed"
    assert conditions(status)["Stalled"] == "True"
    assert "InvalidInput" in {c["reason"] for c in status["conditions"]}
    assert "model.path: no such directory" in status["message"]


def test_a_retryable_failure_waits_longer_before_each_attempt() -> None:
    def at(attempt: int, seconds: float) -> st.Observed:
        return observed(jobs=[failed_job(attempt, "BackoffLimitExceeded", NOW)],
                        now=NOW + timedelta(seconds=seconds))  # fmt: skip

    # Attempt 1 failed: attempt 2 after 10 s; attempt 2 failed: attempt 3 after 20 s.
    assert st.next_attempt(at(1, 5), {}) is None
    assert st.next_attempt(at(1, 10), {}) == 2
    assert st.next_attempt(at(2, 15), {}) is None
    assert st.next_attempt(at(2, 20), {}) == 3
    waiting, _ = st.compute(at(2, 15), {}, NOW)
    assert waiting["phase"] == "Pending" and "starts at 2025-01-02T03:04:25Z" in waiting["message"]
    assert conditions(waiting)["Reconciling"] == "True"


def test_a_run_superseded_then_current_again_records_its_outcome() -> None:
    other = "quickstart-99999999"
    previous = {
        "currentRun": {"id": other},
        "runs": [{"id": RUN, "phase": "Superseded", "finishedAt": "2024-01-01T00:00:00Z"}],
    }
    done = observed(jobs=[batch_job(1, "Complete")], pods=[pod("Succeeded")], now=NOW)
    status, _ = st.compute(done, previous, NOW)
    assert status["phase"] == "Succeeded"
    phases = {r["id"]: r["phase"] for r in status["runs"]}
    assert phases == {RUN: "Succeeded", other: "Superseded"}
    assert status["outputs"]["adapter"] == f"quickstart/{RUN}/adapter"


def test_a_revert_to_a_finished_run_reports_that_runs_outputs() -> None:
    other = "quickstart-99999999"
    mine = {"adapter": f"quickstart/{RUN}/adapter"}
    previous = {
        "currentRun": {"id": other},
        "outputs": {"adapter": f"quickstart/{other}/adapter", "merged": "x"},
        "runs": [{"id": RUN, "phase": "Succeeded", "outputs": mine, "finalLoss": 0.25},
                 {"id": other, "phase": "Succeeded"}],
    }  # fmt: skip
    status, _ = st.compute(observed(now=NOW), previous, NOW)
    assert status["phase"] == "Succeeded"
    assert status["outputs"] == mine
    assert status["currentRun"]["loss"] == 0.25


def test_a_name_held_by_another_owner_is_reported_and_reconciling() -> None:
    status, _ = st.compute(
        observed(blocked=("ChildNameTaken", "ConfigMap x belongs to another")), {}, NOW
    )
    assert status["phase"] == "Pending" and conditions(status)["Reconciling"] == "True"
    assert "belongs to another" in status["message"]


def waiting_pod(reason: str, message: str = "") -> Obj:
    waiting = pod("Pending")
    waiting["metadata"]["name"] = "p-0"
    waiting["status"]["containerStatuses"] = [
        {"name": ch.CONTAINER, "state": {"waiting": {"reason": reason, "message": message}}}
    ]
    return waiting


def test_a_container_that_cannot_start_is_reported_with_its_reason() -> None:
    pulling = observed(jobs=[batch_job()], pods=[waiting_pod("ImagePullBackOff", "no such image")])
    status, events = st.compute(pulling, {}, NOW)
    assert status["phase"] == "Pending"
    assert conditions(status)["Reconciling"] == "True"  # the kubelet keeps trying
    assert conditions(status)["Stalled"] == "False"
    assert "cannot pull its image" in status["message"]
    assert ("Warning", "ImagePullBackOff") in {(e.type, e.reason) for e in events}

    secret = observed(jobs=[batch_job()], pods=[waiting_pod("CreateContainerConfigError",
                                                            'secret "hub" not found')])  # fmt: skip
    later, events = st.compute(secret, status, NOW)
    assert conditions(later)["Stalled"] == "True"  # a person must create the Secret
    assert conditions(later)["Reconciling"] == "False"
    assert 'secret "hub" not found' in later["message"]
    assert ("Warning", "CreateContainerConfigError") in {(e.type, e.reason) for e in events}


def test_waiting_for_pods_and_for_a_quota_is_reconciling_and_a_rejection_stalls() -> None:
    pending, _ = st.compute(observed(jobs=[batch_job()], pods=[pod("Pending")]), {}, NOW)
    assert conditions(pending)["Reconciling"] == "True"
    quota = observed(blocked=("ExceededQuota", "exceeded quota: jobs"))
    status, events = st.compute(quota, {}, NOW)
    assert conditions(status)["Reconciling"] == "True" and conditions(status)["Stalled"] == "False"
    assert [e.type for e in events] == ["Warning"]
    rejected, _ = st.compute(observed(blocked=("CreateRejected", "forbidden")), {}, NOW)
    assert conditions(rejected)["Stalled"] == "True"
    assert rejected["phase"] == "Pending"


def test_a_job_without_pods_for_a_minute_is_reported() -> None:
    job = batch_job()
    job["metadata"]["creationTimestamp"] = st.timestamp(NOW)
    soon, _ = st.compute(observed(jobs=[job], now=NOW + timedelta(seconds=10)), {}, NOW)
    assert soon["conditions"][0]["reason"] == "PodsPending"
    late, _ = st.compute(observed(jobs=[job], now=NOW + timedelta(seconds=90)), {}, NOW)
    assert late["conditions"][0]["reason"] == "PodsNotCreated"


def test_bad_input_reported_in_the_summary_is_not_retried_under_torchrun() -> None:
    summary = json.dumps({"runId": RUN, "phase": "Failed", "message": "no such model",
                          "invalid": True})  # fmt: skip
    failed = observed(jobs=[failed_job(1, "BackoffLimitExceeded", NOW)],
                      pods=[pod("Failed", message=summary)], now=NOW)  # fmt: skip
    assert st.next_attempt(failed, {}) is None
    status, _ = st.compute(failed, {}, NOW)
    assert status["phase"] == "Failed" and "no such model" in status["message"]
    assert {c["reason"] for c in status["conditions"]} >= {"InvalidInput"}


def test_a_failed_run_stays_failed_when_the_backoff_limit_is_raised() -> None:
    spent = observed(jobs=[failed_job(2, "BackoffLimitExceeded", NOW)], backoff_limit=1, now=NOW)
    failed, _ = st.compute(spent, {}, NOW)
    assert failed["phase"] == "Failed"
    raised = observed(jobs=[failed_job(2, "BackoffLimitExceeded", NOW)], backoff_limit=5,
                      now=NOW + timedelta(hours=1))  # fmt: skip
    assert st.next_attempt(raised, failed) is None
    status, _ = st.compute(raised, failed, NOW)
    assert status["phase"] == "Failed"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Reconciling"] == "False"


def test_finished_pods_before_the_job_completes_do_not_fall_back_to_pending() -> None:
    running, _ = st.compute(observed(jobs=[batch_job()], pods=[pod("Running")]), {}, NOW)
    assert running["phase"] == "Running"
    between, events = st.compute(
        observed(jobs=[batch_job()], pods=[pod("Succeeded")]), running, NOW
    )
    assert between["phase"] == "Running" and events == []


def test_queued_is_reconciling_and_image_pull_flips_cost_nothing() -> None:
    queued, _ = st.compute(observed(jobs=[batch_job(suspend=True)]), {}, NOW)
    assert queued["phase"] == "Queued" and conditions(queued)["Reconciling"] == "True"
    pulling, _ = st.compute(observed(jobs=[batch_job()], pods=[waiting_pod("ErrImagePull", "x")],
                                     now=NOW), {}, NOW)  # fmt: skip
    flipped, events = st.compute(
        observed(jobs=[batch_job()], pods=[waiting_pod("ImagePullBackOff", "y")], now=NOW),
        pulling,
        NOW,
    )
    assert flipped == pulling and events == []  # no write, no Event per back-off cycle
    stuck = waiting_pod("ImagePullBackOff")
    stuck["metadata"]["creationTimestamp"] = st.timestamp(NOW - timedelta(minutes=11))
    late, _ = st.compute(observed(jobs=[batch_job()], pods=[stuck], now=NOW), pulling, NOW)
    assert conditions(late)["Stalled"] == "True"  # a wrong tag or missing credentials


def test_suspended_under_a_queue_has_no_job_and_resumes_the_same_attempt() -> None:
    suspended = observed(suspend=True, queued=True)
    assert st.next_attempt(suspended, {}) is None
    status, _ = st.compute(suspended, {}, NOW)
    assert status["phase"] == "Suspended"
    assert st.next_attempt(observed(queued=True), {}) == 1


def test_a_url_with_credentials_in_the_trainers_message_is_hidden_everywhere() -> None:
    message = "error: cannot download https://bob:hunter2@data.example.com/x.jsonl?sig=S1GN"
    failed = observed(jobs=[failed_job(1, "PodFailurePolicy", NOW)],
                      pods=[pod("Failed", message=message)], now=NOW)  # fmt: skip
    status, events = st.compute(failed, {}, NOW)
    text = json.dumps(status) + json.dumps([e.message for e in events])
    assert "hunter2" not in text and "S1GN" not in text
    assert "https://***@data.example.com/x.jsonl?sig=***" in status["message"]


def test_only_the_newest_failed_attempts_are_kept() -> None:
    jobs = [failed_job(n, "BackoffLimitExceeded", NOW) for n in range(1, 7)] + [batch_job(7)]
    assert [attempt_of(j) for j in st.prunable(jobs)] == [1, 2, 3]
    assert st.prunable(jobs[:4]) == []
    # The latest attempt is never pruned, even when it failed.
    assert [attempt_of(j) for j in st.prunable(jobs[:6])] == [1, 2]


def disrupted_pod(index: int, reason: str = "PreemptionByScheduler", at: str = "") -> Obj:
    target = {"type": "DisruptionTarget", "status": "True", "reason": reason,
              "message": "Preempted by a higher-priority pod",
              "lastTransitionTime": at}  # fmt: skip
    disrupted = pod("Failed", index, conditions=[target])
    disrupted["metadata"]["name"] = f"{RUN}-2-{index}-x"
    return disrupted


def two_pod_job(attempt: int, uid: str, **fields: Any) -> Obj:
    job = batch_job(attempt, parallelism=2)
    job["metadata"].update(uid=uid, **fields)
    return job


def test_a_disrupted_multi_node_attempt_is_recreated_whole_without_spending_a_retry() -> None:
    """One pod preempted: the attempt is stopped (annotated, then deleted by the reconciler),
    reported with the cause, counted once, and once its Job is gone the same attempt number
    starts again."""
    active = two_pod_job(2, "job-2")
    earlier = failed_job(1, "BackoffLimitExceeded", NOW - timedelta(hours=1))
    pods = [disrupted_pod(0), pod("Running", 1)]
    why = st.disruption(active, pods)
    assert why is not None and "PreemptionByScheduler" in why
    seen = observed(jobs=[earlier, active], pods=pods, backoff_limit=1, disrupted=why, now=NOW)
    status, events = st.compute(seen, {"phase": "Running"}, NOW)
    assert status["phase"] == "Pending"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "AttemptDisrupted" and "PreemptionByScheduler" in ready["message"]
    assert conditions(status)["Reconciling"] == "True"
    assert [e.reason for e in events] == ["AttemptDisrupted"]
    assert status["currentRun"]["disruptions"] == 1
    assert st.next_attempt(seen, status) is None  # nothing new while its pods stop

    # Stopping: its pods are gone, the annotation says why; counted once, nothing created.
    annotations = {ch.DISRUPTED_ANNOTATION: why}
    deleting = two_pod_job(2, "job-2", deletionTimestamp="x", annotations=annotations)
    assert st.job_state(deleting) == "deleting"
    assert st.disruption(deleting, []) == why
    stopping = observed(jobs=[earlier, deleting], backoff_limit=1, disrupted=why, now=NOW)
    assert st.next_attempt(stopping, status) is None
    again, _ = st.compute(stopping, status, NOW)
    assert again["phase"] == "Pending" and again["currentRun"]["disruptions"] == 1
    gone = observed(jobs=[earlier], backoff_limit=1, now=NOW)
    assert st.next_attempt(gone, again) == 2  # the same attempt, with backoffLimit 1


def test_what_counts_as_a_disruption() -> None:
    two = two_pod_job(1, "j")
    assert st.disruption(batch_job(1, parallelism=1), [disrupted_pod(0)]) is None  # one pod
    assert st.disruption(two, [pod("Running", 0), pod("Running", 1)]) is None
    assert st.disruption(batch_job(1, "Complete", parallelism=2), [disrupted_pod(0)]) is None
    # A condition on a pod that stays (an eviction a PodDisruptionBudget refused) is stale.
    staying = disrupted_pod(0)
    staying["status"]["phase"] = "Running"
    assert st.disruption(two, [staying]) is None
    # The Job's own FailJob rule for DisruptionTarget: lasts after the pod is gone.
    by_rule = batch_job(1, "Failed", "PodFailurePolicy", parallelism=2)
    by_rule["status"]["conditions"][0]["message"] = (
        "Pod ns/p-1 has condition DisruptionTarget matching FailJob rule at index 2"
    )
    assert "DisruptionTarget" in (st.disruption(by_rule, []) or "")
    assert st.job_state(by_rule) == "failed"  # not "rejected", as exit 2 is
    exit_2 = batch_job(1, "Failed", "PodFailurePolicy", parallelism=2)
    exit_2["status"]["conditions"][0]["message"] = (
        "Container trainer for pod ns/p-0 failed with exit code 2 matching FailJob rule at index 0"
    )
    assert st.job_state(exit_2) == "rejected" and st.disruption(exit_2, []) is None
    # A crash failed the Job first; a pod disrupted afterwards did not cause it.
    crashed = batch_job(1, "Failed", "BackoffLimitExceeded", parallelism=2)
    crashed["status"]["conditions"][0]["lastTransitionTime"] = "2025-01-02T03:00:00Z"
    assert st.disruption(crashed, [disrupted_pod(1, at="2025-01-02T03:00:05Z")]) is None
    assert st.disruption(crashed, [disrupted_pod(1, at="2025-01-02T02:59:58Z")]) is not None
    # Decided but not yet Failed (the Job controller waits for the pods to stop): the same.
    deciding = batch_job(1, "FailureTarget", "BackoffLimitExceeded", parallelism=2)
    deciding["status"]["conditions"][0]["lastTransitionTime"] = "2025-01-02T03:00:00Z"
    assert st.disruption(deciding, [disrupted_pod(1, at="2025-01-02T03:00:05Z")]) is None
    # A trainer stopped by SIGTERM is no disruption by itself (peers of a crash are, too).
    preempted = pod("Failed", 1, message='{"phase": "Preempted"}')
    assert st.disruption(crashed, [preempted]) is None


def test_disruptions_stop_being_free_after_the_cap() -> None:
    latest = two_pod_job(1, "job-b")
    seen = observed(jobs=[latest])
    spent = {"currentRun": {"id": RUN, "disruptions": 20, "disruptedJob": "job-a"}}
    assert st.disruptions_spent(seen, spent, latest)
    assert not st.disruptions_spent(seen, {"currentRun": {"id": RUN, "disruptions": 19}}, latest)
    this_one = {"currentRun": {"id": RUN, "disruptions": 20, "disruptedJob": "job-b"}}
    assert not st.disruptions_spent(seen, this_one, latest)  # its own recreation goes on
