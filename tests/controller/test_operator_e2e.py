"""The operator end to end on the real control plane: a FineTuneJob becomes a ConfigMap, a
headless Service and an Indexed Job; the pod runner runs the real trainer from the pod spec
the operator rendered; the status follows it to Succeeded and the model lands on the volume.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.harness import LocalCluster
from tests.cluster.procs import wait_until
from tests.controller.conftest import Operator, ftj
from tests.controller.helpers import create, labelled, quickstart

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TRAIN_TIMEOUT = 300


def test_quickstart_runs_to_succeeded_with_the_model_on_the_volume(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "quickstart"
    create(cluster_api, ns, quickstart(tiny_model))

    # Children appear with deterministic names and owner references to the FineTuneJob.
    def created() -> tuple[str, dict[str, list[str]]] | None:
        found = labelled(cluster_api, ns, name)
        current = (ftj(cluster_api, ns, name).get("status") or {}).get("currentRun")
        return (current["id"], found) if current and all(found.values()) else None

    run, children = wait_until("children and status", created, 60, alive=operator.alive)
    base = ch.base_name(run)
    assert children == {"jobs": [f"{base}-1"], "services": [base], "configmaps": [base]}
    job = client.BatchV1Api(cluster_api).read_namespaced_job(f"{base}-1", ns)
    assert job.spec.completion_mode == "Indexed" and job.spec.completions == 1
    assert job.metadata.owner_references[0].kind == "FineTuneJob"
    assert job.spec.template.spec.subdomain == base

    # Status goes Running with progress numbers, then Succeeded.
    seen: set[str] = set()
    progress: set[str] = set()
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while time.monotonic() < deadline:
        status = ftj(cluster_api, ns, name).get("status") or {}
        seen.add(status.get("phase", ""))
        if (status.get("currentRun") or {}).get("progress"):
            progress.add(status["currentRun"]["progress"])
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        assert operator.alive() is None, operator.alive()
        time.sleep(0.3)
    assert status.get("phase") == "Succeeded", json.dumps(status, indent=1) + operator.tail()
    assert "Running" in seen, seen
    assert progress, "no progress numbers appeared"

    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Reconciling"]["status"] == "False"
    assert conditions["Stalled"]["status"] == "False"
    assert status["observedGeneration"] == 1
    assert status["currentRun"]["progress"] == "4/4"
    assert status["runs"][-1]["id"] == run and status["runs"][-1]["phase"] == "Succeeded"
    assert status["outputs"]["merged"] == f"{name}/{run}/merged"

    # The merged model is in the PVC's directory; the claim is not owned by the job.
    claim = client.CoreV1Api(cluster_api).read_namespaced_persistent_volume_claim(
        ch.output_claim_name(name), ns
    )
    assert not claim.metadata.owner_references
    assert cluster.runner is not None
    volume = cluster.runner.claim_dir(ns, claim.metadata.name)
    merged_dir = volume / name / run / "merged"
    assert (merged_dir / "config.json").exists(), sorted(p.name for p in (volume / name).iterdir())
    assert list(merged_dir.glob("*.safetensors"))
    summary = json.loads((volume / name / run / "summary.json").read_text())
    assert summary["phase"] == "Succeeded" and summary["steps"] == 4

    # The operator's own metrics.
    url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert 'kubetune_operator_jobs{phase="Succeeded"} 1.0' in text
    assert "kubetune_operator_runs_started_total 1.0" in text
    assert "kubetune_operator_runs_succeeded_total 1.0" in text
    assert 'kubetune_operator_reconcile_total{result="success"}' in text
    assert "kubetune_operator_reconcile_time_seconds_bucket" in text
