"""A 2-node FineTuneJob under torchrun on the pod runner: bad input still fails at once. (The
2-node ZeRO-2 run itself, through cluster DNS, is on the real node: test_real_node.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from kubetune.controller import children as ch
from tests.controller.conftest import Operator
from tests.controller.helpers import create, quickstart, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_bad_input_under_torchrun_fails_the_run_at_once(
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    operator: Operator,
    tiny_model: Path,
) -> None:
    """Under torchrun the trainer's exit 2 becomes torchrun's exit 1, which the pod failure
    policy cannot tell from a crash; the summary's `invalid` flag still fails the run at once."""
    ns, name = cluster_namespace, "two-broken"
    missing = str(tiny_model.parent / "no-such-model")
    changes = {
        "spec": {
            "model": {"path": missing},
            "distributed": {"nodes": 2, "gpusPerNode": 1},
            "runPolicy": {"backoffLimit": 3},
        }
    }
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    status = wait_phase(cluster_api, ns, name, "Failed", operator, 240)["status"]
    reasons = {c["type"]: c["reason"] for c in status["conditions"]}
    assert reasons["Failed"] == "InvalidInput", status
    assert status["currentRun"]["attempt"] == 1
    assert "no-such-model" in status["message"]
    jobs = client.BatchV1Api(cluster_api).list_namespaced_job(
        ns, label_selector=f"{ch.JOB_LABEL}={name}"
    )
    assert [j.metadata.name for j in jobs.items] == [ch.job_name(status["currentRun"]["id"], 1)]
