"""Scheduling states in status on the real control plane: a Kueue queue gives a suspended Job
(Queued), more GPUs than any node has gives Pending with the scheduler's reason, and
spec.runPolicy.suspend pauses a job that then resumes and succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.procs import wait_until
from tests.controller.conftest import GROUP, PLURAL, VERSION, Operator, ftj
from tests.controller.helpers import create, labelled, quickstart, wait_phase

pytestmark = pytest.mark.cluster


def test_queue_name_gives_a_suspended_job_with_the_kueue_label(
    cluster_api: client.ApiClient, cluster_namespace: str, operator: Operator, tiny_model: Path
) -> None:
    ns, name = cluster_namespace, "queued"
    changes = {"spec": {"resources": {"queueName": "team-a"}}}
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    status = wait_phase(cluster_api, ns, name, "Queued", operator, 60)["status"]
    job = client.BatchV1Api(cluster_api).read_namespaced_job(
        ch.job_name(status["currentRun"]["id"], 1), ns
    )
    assert job.spec.suspend is True
    assert job.metadata.labels[ch.KUEUE_QUEUE_LABEL] == "team-a"


def test_more_gpus_than_any_node_has_is_pending_unschedulable(
    cluster_api: client.ApiClient, cluster_namespace: str, operator: Operator, tiny_model: Path
) -> None:
    ns, name = cluster_namespace, "too-big"
    changes = {"spec": {"distributed": {"gpusPerNode": 64}}}
    create(cluster_api, ns, quickstart(tiny_model, name, changes))

    def unschedulable() -> dict[str, str] | None:
        status = ftj(cluster_api, ns, name).get("status") or {}
        ready = {c["type"]: c for c in status.get("conditions") or []}.get("Ready")
        return ready if ready and ready["reason"] == "Unschedulable" else None

    ready = wait_until("Unschedulable in status", unschedulable, 60, alive=operator.alive)
    assert "Insufficient nvidia.com/gpu" in ready["message"], ready
    assert ftj(cluster_api, ns, name)["status"]["phase"] == "Pending"


@pytest.mark.slow
def test_suspend_pauses_and_resume_completes(
    cluster_api: client.ApiClient, cluster_namespace: str, operator: Operator, tiny_model: Path
) -> None:
    ns, name = cluster_namespace, "paused"
    create(
        cluster_api, ns, quickstart(tiny_model, name, {"spec": {"runPolicy": {"suspend": True}}})
    )
    status = wait_phase(cluster_api, ns, name, "Suspended", operator, 60)["status"]
    core = client.CoreV1Api(cluster_api)
    selector = f"{ch.JOB_LABEL}={name}"
    assert not core.list_namespaced_pod(ns, label_selector=selector).items
    run = status["currentRun"]["id"]

    client.CustomObjectsApi(cluster_api).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": {"runPolicy": {"suspend": False}}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    status = wait_phase(cluster_api, ns, name, "Succeeded", operator, 300)["status"]
    assert status["currentRun"]["id"] == run  # suspension is not a new run
    assert len(labelled(cluster_api, ns, name)["jobs"]) == 1
