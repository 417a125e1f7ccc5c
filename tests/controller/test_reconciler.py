"""The reconciler's bookkeeping without a cluster: an invalid spec moves no run, a burst of
requests during a reconcile is never lost and never blocks, a deleted job leaves nothing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.api import SpecError
from kubetune.api.validation import Problem
from kubetune.controller import reconciler as rc
from kubetune.controller import status as st

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
Obj = dict[str, Any]


def test_an_invalid_spec_keeps_the_current_run_and_its_record() -> None:
    record = {"model": {"path": "/m"}, "training": {"learningRate": 0.001}}
    previous = {
        "observedGeneration": 4,
        "currentRun": {"id": "qs-aaaaaaaa", "spec": record, "attempt": 2},
        "phase": "Running",
    }
    err = SpecError([Problem("spec.training", "no good")])
    observed = st.invalid_spec(previous, "qs-bbbbbbbb", 5, str(err), NOW)
    status, events = st.compute(observed, previous, NOW)
    assert status["phase"] == "Failed"
    assert status["currentRun"]["id"] == "qs-aaaaaaaa"
    assert status["currentRun"]["spec"] == record
    assert status["runs"] == []  # nothing superseded, nothing recorded
    assert [e.reason for e in events] == ["InvalidSpec"]
    assert status["observedGeneration"] == 5  # observed: kstatus reads Stalled, not InProgress
    assert status["currentRun"]["attempt"] == 2


def body(uid: str = "u1") -> Obj:
    return {"metadata": {"uid": uid, "name": "qs", "namespace": "ns"}, "spec": {}}


def test_requests_during_a_reconcile_run_it_once_more_and_never_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reconciler = rc.Reconciler(rc.Config())
    reconciler.seen(body())
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def reconcile(*args: Any) -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            inside.set()
            release.wait(10)

    monkeypatch.setattr(reconciler, "_timed", reconcile)
    first = threading.Thread(target=reconciler.request, args=("u1", lambda ns, n: ([], [])))
    first.start()
    assert inside.wait(10)
    for _ in range(5):  # a burst of pod events: each returns at once
        reconciler.request("u1", lambda ns, n: ([], []))
    release.set()
    first.join(10)
    assert calls == [0, 1]  # the burst cost exactly one more reconcile


def test_an_event_during_a_reconcile_is_served_by_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reconciler = rc.Reconciler(rc.Config())
    reconciler.seen(body())
    state = reconciler._state("u1")
    assert state is not None
    calls: list[int] = []

    def reconcile(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            # Another event arrives after this reconcile read everything but before it
            # releases the lock: it must still be served.
            racer = threading.Thread(target=reconciler.request, args=("u1", lambda ns, n: ([], [])))
            racer.start()
            racer.join(10)

    monkeypatch.setattr(reconciler, "_timed", reconcile)
    reconciler.request("u1", lambda ns, n: ([], []))
    assert len(calls) == 2


def test_a_deleted_job_leaves_no_state_and_is_not_reconciled() -> None:
    reconciler = rc.Reconciler(rc.Config())
    reconciler.seen(body())
    assert reconciler._state("u1") is not None
    reconciler.gone(body()["metadata"])
    assert reconciler._state("u1") is None
    assert reconciler.known() == [] and reconciler.uid_of("ns", "qs") is None
    reconciler.request("u1", lambda ns, n: ([], []))  # a late pod event: nothing happens
    assert reconciler._states == {}


def test_a_namesake_replaces_a_job_whose_deletion_was_never_seen() -> None:
    reconciler = rc.Reconciler(rc.Config())
    reconciler.seen(body("old"))
    reconciler.seen(body("new"))  # same name, new uid: the old one is gone
    assert [b["metadata"]["uid"] for b in reconciler.known()] == ["new"]
    assert reconciler._state("old") is None and reconciler.uid_of("ns", "qs") == "new"


class StopRecorder:
    def __init__(self) -> None:
        self.stopped: list[tuple[str, str | None]] = []

    def stop_attempt(self, latest: Obj, why: str | None = None) -> None:
        self.stopped.append((latest["metadata"]["name"], why))


def test_a_disrupted_attempt_is_stopped_once_and_never_for_a_finished_run() -> None:
    reconciler = rc.Reconciler(rc.Config())
    recorder = StopRecorder()
    reconciler._children = recorder  # type: ignore[assignment]
    job = {"metadata": {"name": "qs-1", "uid": "j1", "labels": {"kubetune.io/attempt": "1"}},
           "spec": {"parallelism": 2}, "status": {}}  # fmt: skip
    target = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    evicted = {"metadata": {"name": "qs-1-1", "deletionTimestamp": "x",
                            "ownerReferences": [{"uid": "j1"}]},
               "status": {"phase": "Running", "conditions": [target]}}  # fmt: skip
    stranger = {**evicted, "metadata": {**evicted["metadata"], "ownerReferences": [{"uid": "j0"}]}}
    observed = st.Observed(generation=1, run="qs", output_path="qs/qs", jobs=[job])

    assert reconciler._recreate_if_disrupted(observed, [stranger], {}).disrupted is None
    assert recorder.stopped == []  # another Job's pod says nothing about this attempt
    seen = reconciler._recreate_if_disrupted(observed, [evicted], {})
    assert seen.disrupted is not None and "EvictionByEvictionAPI" in seen.disrupted
    assert recorder.stopped == [("qs-1", seen.disrupted)]
    finished = {"runs": [{"id": "qs", "phase": "Failed"}]}
    assert reconciler._recreate_if_disrupted(observed, [evicted], finished).disrupted is None
    deleting = {**job, "metadata": {**job["metadata"], "deletionTimestamp": "x"}}
    again = st.Observed(generation=1, run="qs", output_path="qs/qs", jobs=[deleting])
    assert reconciler._recreate_if_disrupted(again, [evicted], {}).disrupted is not None
    assert len(recorder.stopped) == 1  # already going: not deleted again


def test_the_index_keeps_what_disruptions_are_read_from() -> None:
    """A multi-node Job's parallelism and a going pod's deletionTimestamp survive the slim
    copy the operator indexes (without them no disruption is ever seen)."""
    from kubetune.controller.handlers import _slim

    job = {"metadata": {"name": "j", "uid": "u", "deletionTimestamp": "t", "managedFields": []},
           "spec": {"parallelism": 2, "suspend": False, "template": {"spec": {}}},
           "status": {"conditions": []}}  # fmt: skip
    slim = _slim(job)
    assert slim["spec"] == {"parallelism": 2, "suspend": False}
    assert slim["metadata"]["deletionTimestamp"] == "t" and "managedFields" not in slim["metadata"]
    target = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    pod = {"metadata": {"name": "p", "deletionTimestamp": "t", "ownerReferences": [{"uid": "u"}]},
           "spec": {"containers": []},
           "status": {"phase": "Running", "conditions": [target]}}  # fmt: skip
    assert st.disruption(slim, [_slim(pod)]) is not None
