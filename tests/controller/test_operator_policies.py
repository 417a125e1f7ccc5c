"""runPolicy and Events on the real control plane: activeDeadlineSeconds fails the run with
DeadlineExceeded (the real trainer, cut off by the Job controller); ttlSecondsAfterFinished
deletes the finished FineTuneJob and keeps its output claim; the retrain-token annotation
starts a new run with an unchanged spec; with retrainOnSpecChange false a training change
starts nothing. The last three need no trainer: kwok plays their pods (Succeeded at once)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.procs import wait_until
from tests.controller.conftest import GROUP, PLURAL, VERSION, Operator, ftj
from tests.controller.helpers import create, labelled, quickstart, wait_phase

pytestmark = pytest.mark.cluster
MERGE_PATCH = "application/merge-patch+json"
# Pods for kwok's GPU nodes (tainted nvidia.com/gpu=present:NoSchedule).
ON_KWOK = {
    "resources": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    }
}


def events(api: client.ApiClient, ns: str, name: str) -> list[tuple[str, str]]:
    """(type, reason) of the Events about the FineTuneJob, oldest first."""
    selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={name}"
    items = client.CoreV1Api(api).list_namespaced_event(ns, field_selector=selector).items
    items.sort(key=lambda e: (e.metadata.creation_timestamp, e.metadata.resource_version))
    return [(e.type, e.reason) for e in items]


def patch(api: client.ApiClient, ns: str, name: str, body: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, body, _content_type=MERGE_PATCH
    )


def test_active_deadline_fails_the_run_with_deadline_exceeded_and_events(
    cluster_api: client.ApiClient, cluster_namespace: str, operator: Operator, tiny_model: Path
) -> None:
    ns, name = cluster_namespace, "deadline"
    changes = {"spec": {"training": {"maxSteps": 100000, "saveSteps": 100000},
                        "evaluation": {"samplePrompts": []},
                        "runPolicy": {"activeDeadlineSeconds": 6, "backoffLimit": 2}}}  # fmt: skip
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    status = wait_phase(cluster_api, ns, name, "Failed", operator, 120)["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["status"] == "True"
    assert conditions["Failed"]["reason"] == "DeadlineExceeded"
    assert conditions["Stalled"]["status"] == "True"
    assert status["currentRun"]["attempt"] == 1  # a deadline is not retried
    assert len(labelled(cluster_api, ns, name)["jobs"]) == 1
    job = client.BatchV1Api(cluster_api).read_namespaced_job(
        ch.job_name(status["currentRun"]["id"], 1), ns
    )
    assert job.spec.active_deadline_seconds == 6

    # An Event per transition: the first status (Pending), then the Warning for the failure.
    seen = wait_until(
        "the DeadlineExceeded Event",
        lambda: (lambda e: e if ("Warning", "DeadlineExceeded") in e else None)(
            events(cluster_api, ns, name)
        ),
        30,
    )
    assert seen[0][0] == "Normal" and seen[0][1] in ("Creating", "PodsPending"), seen
    assert seen[-1] == ("Warning", "DeadlineExceeded"), seen


def test_ttl_deletes_the_finished_job_and_keeps_the_claim(
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    kwok_operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "short-lived"
    changes = {"spec": {**ON_KWOK, "runPolicy": {"ttlSecondsAfterFinished": 4}}}
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 60)
    succeeded = time.monotonic()

    def gone() -> bool:
        try:
            ftj(cluster_api, ns, name)
        except client.ApiException as err:
            return err.status == 404
        return False

    wait_until("deleted after the TTL", gone, 30, interval=0.2, alive=kwok_operator.alive)
    assert time.monotonic() - succeeded >= 2  # not at once (finishedAt has 1 s resolution)
    core = client.CoreV1Api(cluster_api)
    assert core.read_namespaced_persistent_volume_claim(ch.output_claim_name(name), ns)
    reasons = [reason for _, reason in events(cluster_api, ns, name)]
    assert "TrainingSucceeded" in reasons, reasons


def test_retrain_token_starts_a_new_run_with_an_unchanged_spec(
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    kwok_operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "again"
    create(cluster_api, ns, quickstart(tiny_model, name, {"spec": ON_KWOK}))
    run1 = wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 60)["status"]
    run1_id = run1["currentRun"]["id"]

    patch(cluster_api, ns, name, {"metadata": {"annotations": {ch.RETRAIN_TOKEN_ANNOTATION: "1"}}})

    def second_run_done() -> dict[str, Any] | None:
        status = ftj(cluster_api, ns, name).get("status") or {}
        current = status.get("currentRun") or {}
        done = current.get("id") != run1_id and status.get("phase") == "Succeeded"
        return status if done else None

    status = wait_until("run 2 Succeeded", second_run_done, 60, alive=kwok_operator.alive)
    run2_id = status["currentRun"]["id"]
    assert status["currentRun"]["retrainToken"] == "1"
    assert status["currentRun"]["generation"] == 1  # the spec did not change
    assert status["observedGeneration"] == 1
    assert [r["id"] for r in status["runs"]] == [run1_id, run2_id]
    assert status["runs"][1]["outputPath"] == f"{name}/{run2_id}"
    assert ("Normal", "NewRun") in events(cluster_api, ns, name)
    wait_until(
        "only run 2's Job left",
        lambda: labelled(cluster_api, ns, name)["jobs"] == [ch.job_name(run2_id, 1)],
        30,
    )


def test_retrain_on_spec_change_false_starts_nothing_until_a_token(
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    kwok_operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "pinned"
    changes = {"spec": {**ON_KWOK, "runPolicy": {"retrainOnSpecChange": False}}}
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    run1 = wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 60)["status"]
    run1_id = run1["currentRun"]["id"]

    patch(cluster_api, ns, name, {"spec": {"training": {"learningRate": 5.0e-4}}})
    status = wait_until(
        "observedGeneration 2",
        lambda: (lambda s: s if s.get("observedGeneration") == 2 else None)(
            ftj(cluster_api, ns, name)["status"]
        ),
        30,
        alive=kwok_operator.alive,
    )
    assert status["phase"] == "Succeeded" and status["currentRun"]["id"] == run1_id
    assert [r["id"] for r in status["runs"]] == [run1_id]
    assert labelled(cluster_api, ns, name)["jobs"] == [ch.job_name(run1_id, 1)]

    # A token still forces a run, now with the changed spec.
    patch(cluster_api, ns, name, {"metadata": {"annotations": {ch.RETRAIN_TOKEN_ANNOTATION: "x"}}})
    status = wait_until(
        "run 2 Succeeded",
        lambda: (
            lambda s: (
                s if s.get("phase") == "Succeeded" and s["currentRun"]["id"] != run1_id else None
            )
        )(ftj(cluster_api, ns, name)["status"]),
        60,
        alive=kwok_operator.alive,
    )
    assert status["currentRun"]["generation"] == 2
