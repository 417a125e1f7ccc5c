"""Data that reaches pods through `spec.data.configMap`: while the ConfigMap is missing or
lacks a dataset's file, the run waits with a condition that says so and no Job (its pods would
hang on the mount); once it is fixed, the run starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.procs import wait_until
from tests.controller.conftest import Operator, ftj
from tests.controller.helpers import create, quickstart, wait_phase
from tests.controller.test_operator_policies import ON_KWOK

pytestmark = pytest.mark.cluster


def ready(api: client.ApiClient, ns: str, name: str) -> dict[str, str]:
    conditions = (ftj(api, ns, name).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_a_missing_then_incomplete_configmap_holds_the_run_until_fixed(
    cluster_api: client.ApiClient, cluster_namespace: str, kwok_operator: Operator, tmp_path: Path
) -> None:
    ns, name = cluster_namespace, "needs-data"
    changes = {"spec": {"data": {"configMap": "train-files"}, **ON_KWOK}}
    body = quickstart(tmp_path / "model", name, changes)
    body["spec"]["data"]["datasets"] = [{"path": "data/identity.jsonl", "format": "messages"}]
    create(cluster_api, ns, body)
    core, batch = client.CoreV1Api(cluster_api), client.BatchV1Api(cluster_api)

    def reason_is(reason: str) -> bool:
        return ready(cluster_api, ns, name).get("reason") == reason

    wait_until("DataConfigMapMissing", lambda: reason_is("DataConfigMapMissing"), 30)
    status = ftj(cluster_api, ns, name)["status"]
    assert status["phase"] == "Pending" and "'train-files' not found" in status["message"]
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True"
    assert not batch.list_namespaced_job(ns).items

    wrong = {"metadata": {"name": "train-files"}, "data": {"other.jsonl": "{}"}}
    core.create_namespaced_config_map(ns, wrong)
    wait_until("DataConfigMapIncomplete", lambda: reason_is("DataConfigMapIncomplete"), 30)
    message = ftj(cluster_api, ns, name)["status"]["message"]
    assert "'identity.jsonl' (for data/identity.jsonl)" in message and "other.jsonl" in message
    assert not batch.list_namespaced_job(ns).items

    core.patch_namespaced_config_map("train-files", ns, {"data": {"identity.jsonl": "{}"}})
    wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 60)
    [job] = batch.list_namespaced_job(ns, label_selector=f"{ch.JOB_LABEL}={name}").items
    assert job.metadata.name.endswith("-1")
