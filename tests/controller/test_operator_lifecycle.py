"""The operator over a job's life on the real control plane: killed and restarted mid-run
(no duplicates, the job completes), a no-op spec change (TTL) that starts nothing, a
training change that starts run 2 in a new directory while run 1's output stays, deletion
(children garbage-collected, the output volume kept), and an always-failing job that ends
Failed after the backoff limit with the trainer's message in status."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.harness import LocalCluster
from tests.cluster.procs import wait_until
from tests.controller.conftest import GROUP, PLURAL, VERSION, Operator, ftj
from tests.controller.helpers import create, labelled, quickstart, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
MERGE_PATCH = "application/merge-patch+json"


def patch_spec(api: client.ApiClient, ns: str, name: str, spec: dict[str, object]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": spec}, _content_type=MERGE_PATCH
    )


def digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        sha.update(str(path.relative_to(directory)).encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def test_restart_noop_change_retrain_and_delete(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "lifecycle"
    create(cluster_api, ns, quickstart(tiny_model, name, {"spec": {"training": {"maxSteps": 6}}}))

    # SIGKILL the operator as soon as it has created the Job, then start a new one.
    wait_until("the Job", lambda: labelled(cluster_api, ns, name)["jobs"], 60, alive=operator.alive)
    operator.kill()
    operator.start()
    status = wait_phase(cluster_api, ns, name, "Succeeded", operator, 300)["status"]
    run1 = status["currentRun"]["id"]
    base1 = ch.base_name(run1)
    assert labelled(cluster_api, ns, name) == {
        "jobs": [f"{base1}-1"], "services": [base1], "configmaps": [base1]
    }  # fmt: skip
    assert status["currentRun"]["attempt"] == 1
    # Read back from the API server: exactly the final status, no live numbers left over.
    assert "eta" not in status["currentRun"] and "tokensPerSecond" not in status["currentRun"]
    assert set(status["outputs"]) == {"adapter", "merged"}

    assert cluster.runner is not None
    volume = cluster.runner.claim_dir(ns, ch.output_claim_name(name))
    run1_dir = volume / name / run1
    before = digest(run1_dir)

    # A change that does not affect training: observed, nothing started.
    patch_spec(cluster_api, ns, name, {"runPolicy": {"ttlSecondsAfterFinished": 3600}})
    wait_until(
        "observedGeneration 2",
        lambda: ftj(cluster_api, ns, name)["status"].get("observedGeneration") == 2,
        30,
        alive=operator.alive,
    )
    status = ftj(cluster_api, ns, name)["status"]
    assert status["phase"] == "Succeeded" and status["currentRun"]["id"] == run1
    assert labelled(cluster_api, ns, name)["jobs"] == [f"{base1}-1"]

    # A training change, and no merge this time: run 2, its own directory; run 1's output
    # untouched; run 1's numbers and merged model never shown as run 2's.
    patch_spec(cluster_api, ns, name, {"training": {"learningRate": 5.0e-4},
                                       "output": {"merge": False}})  # fmt: skip
    first_of_run2 = wait_until(
        "run 2",
        lambda: (lambda s: s if s["currentRun"]["id"] != run1 else None)(
            ftj(cluster_api, ns, name)["status"]
        ),
        30,
        interval=0.1,
        alive=operator.alive,
    )
    assert "step" not in first_of_run2["currentRun"], first_of_run2["currentRun"]
    status = wait_phase(cluster_api, ns, name, "Succeeded", operator, 300)["status"]
    run2 = status["currentRun"]["id"]
    assert status["currentRun"]["generation"] == 3
    assert [r["id"] for r in status["runs"]] == [run1, run2]
    assert status["runs"][1]["outputPath"] == f"{name}/{run2}"
    assert status["outputs"] == {"adapter": f"{name}/{run2}/adapter"}
    assert not (volume / name / run2 / "merged").exists()
    assert (volume / name / run2 / "adapter" / "adapter_config.json").exists()
    assert digest(run1_dir) == before
    base2 = ch.base_name(run2)
    wait_until(
        "run 1's children gone",
        lambda: (
            labelled(cluster_api, ns, name)
            == {"jobs": [f"{base2}-1"], "services": [base2], "configmaps": [base2]}
        ),
        30,
    )

    # Deletion: children are garbage-collected; the output claim and the models stay.
    client.CustomObjectsApi(cluster_api).delete_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name
    )

    def gone() -> bool:
        try:
            ftj(cluster_api, ns, name)
            return False
        except client.ApiException as err:
            return err.status == 404

    wait_until("the FineTuneJob deleted", gone, 30, alive=operator.alive)
    wait_until(
        "children garbage-collected",
        lambda: not any(labelled(cluster_api, ns, name).values()),
        60,
    )
    core = client.CoreV1Api(cluster_api)
    assert core.read_namespaced_persistent_volume_claim(ch.output_claim_name(name), ns)
    assert digest(run1_dir) == before


def test_a_bad_input_fails_the_run_at_once_with_the_trainers_message(
    cluster_api: client.ApiClient, cluster_namespace: str, operator: Operator, tiny_model: Path
) -> None:
    """The trainer exits 2 (here: no such model): the pod failure policy fails the Job and the
    operator fails the run at once; no attempt is spent on what no retry can fix."""
    ns, name = cluster_namespace, "broken"
    missing = str(tiny_model.parent / "no-such-model")
    changes = {"spec": {"model": {"path": missing}, "runPolicy": {"backoffLimit": 3}}}
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    status = wait_phase(cluster_api, ns, name, "Failed", operator, 240)["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Stalled"]["status"] == "True"
    assert conditions["Failed"]["reason"] == "InvalidInput"
    assert status["currentRun"]["attempt"] == 1
    assert "no-such-model" in status["message"], status["message"]
    time.sleep(3)  # no second attempt follows
    assert len(labelled(cluster_api, ns, name)["jobs"]) == 1
    job = client.BatchV1Api(cluster_api).read_namespaced_job(
        ch.job_name(status["currentRun"]["id"], 1), ns
    )
    failed = next(c for c in job.status.conditions if c.type == "Failed")
    assert failed.reason == "PodFailurePolicy"


def test_killed_pod_fails_the_attempt_and_the_next_resumes_from_the_checkpoint(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "killed"
    changes = {"spec": {"training": {"maxSteps": 60, "saveSteps": 5},
                        "evaluation": {"samplePrompts": []}}}  # fmt: skip
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    run = wait_phase(cluster_api, ns, name, "Running", operator, 120)["status"]["currentRun"]["id"]
    assert cluster.runner is not None
    runner = cluster.runner
    volume = runner.claim_dir(ns, ch.output_claim_name(name))
    checkpoint = volume / name / f".{run}.work" / "checkpoints" / "checkpoint-10" / "COMPLETE"
    wait_until("checkpoint 10", checkpoint.exists, 180, interval=0.1, alive=operator.alive)
    pids = runner.running_pids()
    assert pids
    for pid in pids:  # the trainer dies as on an OOM kill: no chance to checkpoint
        os.killpg(pid, signal.SIGKILL)

    status = wait_phase(cluster_api, ns, name, "Succeeded", operator, 300)["status"]
    assert status["currentRun"]["attempt"] == 2
    base = ch.base_name(run)
    assert labelled(cluster_api, ns, name)["jobs"] == [f"{base}-1", f"{base}-2"]
    pods = client.CoreV1Api(cluster_api).list_namespaced_pod(
        ns, label_selector=f"{ch.ATTEMPT_LABEL}=2,{ch.JOB_LABEL}={name}"
    )
    pod_dir = runner.pod_dir(ns, pods.items[0].metadata.name)
    assert pod_dir is not None
    log = (pod_dir / "logs" / f"{ch.CONTAINER}.log").read_text()
    assert "resuming from" in log and "checkpoint-" in log, log[-2000:]
    assert status["currentRun"]["progress"] == "60/60"


def test_etcd_and_apiserver_restarts_mid_run_lose_nothing(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    operator: Operator,
    tiny_model: Path,
) -> None:
    """etcd killed and restarted, then the apiserver, while the trainer runs: the operator's
    watches recover, status keeps following the run, and it finishes with its one Job."""
    ns, name = cluster_namespace, "restarts"
    changes = {"spec": {"training": {"maxSteps": 40, "saveSteps": 10},
                        "evaluation": {"samplePrompts": []}}}  # fmt: skip
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    wait_phase(cluster_api, ns, name, "Running", operator, 120)

    def step() -> int:
        return int((ftj(cluster_api, ns, name)["status"].get("currentRun") or {}).get("step") or 0)

    # A restarted apiserver refuses for a moment what its RBAC cache has not read back yet
    # ("role ... not found"); the operator retries, and nothing else may be refused.
    operator.forgive("RBAC: role.rbac.authorization.k8s.io")
    outages = {}
    for component in ("etcd", "kube-apiserver"):
        before = step()
        outages[component] = cluster.control_plane.restart(component, kill=True)
        # Status writes resume: a newer step (or the end) shows after the restart.
        wait_until(
            f"progress after the {component} restart",
            lambda before=before: (
                step() > before or ftj(cluster_api, ns, name)["status"].get("phase") == "Succeeded"
            ),
            120,
            interval=0.5,
            alive=operator.alive,
        )
    status = wait_phase(cluster_api, ns, name, "Succeeded", operator, 300)["status"]
    base = ch.base_name(status["currentRun"]["id"])
    assert labelled(cluster_api, ns, name) == {
        "jobs": [f"{base}-1"], "services": [base], "configmaps": [base]
    }  # fmt: skip
    assert status["currentRun"]["attempt"] == 1 and status["currentRun"]["progress"] == "40/40"
    assert all(seconds < 60 for seconds in outages.values()), outages
