"""Run identity and ownership on the real control plane.

- An operator upgrade (a new CRD field with a default, a changed Python default) restarts
  nothing: a Succeeded job is not trained again, a Running one keeps its Job and pods; an
  edit of a "next run only" field (sample prompts) keeps the run too.
- A GitOps revert A -> B -> A returns to A's run and its result, and a run superseded
  before it finished records its outcome when it becomes current again.
- A FineTuneJob deleted and created again under the same name neither adopts the old one's
  Job nor fails on the finished output: it reports the finished run as reused.
- With the operator stopped, a FineTuneJob and its namespace are deleted (no finalizer; an
  old operator's finalizer is removed on the first event).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.crd import install_crd
from tests.cluster.harness import LocalCluster
from tests.cluster.procs import wait_until
from tests.controller.conftest import (
    GROUP,
    PLURAL,
    REPO,
    VERSION,
    Operator,
    ftj,
    kwok_operator_in_own_namespace,
)
from tests.controller.helpers import create, labelled, quickstart, wait_phase
from tests.controller.test_operator_lifecycle import digest
from tests.controller.test_operator_policies import ON_KWOK, patch
from tests.controller.upgraded_operator import NEW_FIELD

pytestmark = pytest.mark.cluster
CRD = REPO / "crds" / "finetunejob.yaml"


def jobs_by_uid(api: client.ApiClient, ns: str, name: str) -> dict[str, str]:
    items = client.BatchV1Api(api).list_namespaced_job(ns, label_selector=f"{ch.JOB_LABEL}={name}")
    return {j.metadata.name: j.metadata.uid for j in items.items}


def reconciles(operator: Operator) -> float:
    """The operator's count of successful reconciles, from its /metrics."""
    from urllib.request import urlopen

    url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    with urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('kubetune_operator_reconcile_total{result="success"}'):
                return float(line.split()[-1])
    return 0.0


def gone(api: client.ApiClient, ns: str, name: str) -> bool:
    try:
        ftj(api, ns, name)
    except client.ApiException as err:
        return err.status == 404
    return False


@pytest.fixture
def upgraded_crd(
    cluster_api: client.ApiClient, ftj_crd_installed: str, tmp_path: Path
) -> Iterator[None]:
    """The CRD of a later release: spec.training gains a field with a default."""
    manifest = yaml.safe_load(CRD.read_text())
    version = manifest["spec"]["versions"][0]
    training = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    training["properties"][NEW_FIELD[0]] = {"type": "integer", "default": NEW_FIELD[1]}
    path = tmp_path / "upgraded-crd.yaml"
    path.write_text(yaml.safe_dump(manifest))
    try:
        install_crd(cluster_api, path)
        yield
    finally:
        path.unlink(missing_ok=True)
        install_crd(cluster_api, CRD)


@pytest.mark.slow
def test_an_operator_upgrade_restarts_nothing(
    cluster_api: client.ApiClient,
    cluster_kubeconfig: Path,
    cluster_namespace: str,
    operator: Operator,
    tiny_model: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    ns = cluster_namespace
    create(cluster_api, ns, quickstart(tiny_model, "done"))
    done = wait_phase(cluster_api, ns, "done", "Succeeded", operator, 300)["status"]
    # One after the other: the pod runner's pods share the host's ports.
    endless = {"spec": {"training": {"maxSteps": 100000, "saveSteps": 100000},
                        "evaluation": {"samplePrompts": []}}}  # fmt: skip
    create(cluster_api, ns, quickstart(tiny_model, "busy", endless))
    busy = wait_phase(cluster_api, ns, "busy", "Running", operator, 300)["status"]
    before = {name: jobs_by_uid(cluster_api, ns, name) for name in ("done", "busy")}
    pods_before = client.CoreV1Api(cluster_api).list_namespaced_pod(
        ns, label_selector=f"{ch.JOB_LABEL}=busy"
    )
    busy_pods = {p.metadata.uid for p in pods_before.items}

    # The release: the operator stops, the new CRD is applied, the new operator starts.
    operator.stop()
    request.getfixturevalue("upgraded_crd")
    assert ftj(cluster_api, ns, "done")["spec"]["training"][NEW_FIELD[0]] == NEW_FIELD[1]
    upgraded = Operator(
        operator.kubeconfig, ns, tmp_path / "upgraded.log",
        command=[sys.executable, "-m", "tests.controller.upgraded_operator"],
    ).start()  # fmt: skip
    try:
        # Nothing may change, so wait until it has reconciled both a few times.
        wait_until("4 reconciles", lambda: reconciles(upgraded) >= 4, 60, alive=upgraded.alive)
        after_done = ftj(cluster_api, ns, "done")["status"]
        after_busy = ftj(cluster_api, ns, "busy")["status"]
        assert after_done["phase"] == "Succeeded", upgraded.tail()
        assert after_done["currentRun"]["id"] == done["currentRun"]["id"]
        assert [r["id"] for r in after_done["runs"]] == [done["currentRun"]["id"]]
        assert after_busy["phase"] == "Running", upgraded.tail()
        assert after_busy["currentRun"]["id"] == busy["currentRun"]["id"]
        assert after_busy["currentRun"]["attempt"] == 1, after_busy
        assert {n: jobs_by_uid(cluster_api, ns, n) for n in ("done", "busy")} == before
        pods = client.CoreV1Api(cluster_api).list_namespaced_pod(
            ns, label_selector=f"{ch.JOB_LABEL}=busy"
        )
        assert {p.metadata.uid for p in pods.items} == busy_pods

        # An edit of a "next run only" field is observed and keeps the run.
        patch(cluster_api, ns, "busy", {"spec": {"evaluation": {"samplePrompts": ["Hi?"]}}})
        wait_until(
            "observedGeneration 2",
            lambda: ftj(cluster_api, ns, "busy")["status"].get("observedGeneration") == 2,
            30,
            alive=upgraded.alive,
        )
        status = ftj(cluster_api, ns, "busy")["status"]
        assert status["phase"] == "Running"
        assert status["currentRun"]["id"] == busy["currentRun"]["id"]
        assert jobs_by_uid(cluster_api, ns, "busy") == before["busy"]
    finally:
        client.CustomObjectsApi(cluster_api).delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "busy"
        )
        upgraded.stop()


def test_a_revert_returns_to_the_earlier_run_and_records_every_outcome(
    cluster_api: client.ApiClient, cluster_namespace: str, kwok_operator: Operator, tiny_model: Path
) -> None:
    ns, name = cluster_namespace, "revert"
    a = quickstart(tiny_model, name, {"spec": ON_KWOK})
    b_training = {"learningRate": 5.0e-4}
    create(cluster_api, ns, a)
    run_a = wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 60)["status"]
    a_id = run_a["currentRun"]["id"]

    def settled(run: str, generation: int) -> dict[str, Any] | None:
        status = ftj(cluster_api, ns, name).get("status") or {}
        ok = (status.get("observedGeneration") == generation and status.get("phase")
              == "Succeeded" and status["currentRun"]["id"] == run)  # fmt: skip
        return status if ok else None

    patch(cluster_api, ns, name, {"spec": {"training": b_training}})

    def settled_other() -> dict[str, Any] | None:
        status = ftj(cluster_api, ns, name).get("status") or {}
        ok = status.get("phase") == "Succeeded" and status["currentRun"]["id"] != a_id
        return status if ok and status.get("observedGeneration") == 2 else None

    run_b = wait_until("run B Succeeded", settled_other, 60, alive=kwok_operator.alive)
    b_id = run_b["currentRun"]["id"]

    # Back to A (GitOps revert): A's run and result again, no training.
    patch(cluster_api, ns, name, {"spec": {"training": {"learningRate": 1.0e-3}}})
    back = wait_until("back on A", lambda: settled(a_id, 3), 60, alive=kwok_operator.alive)
    history = [(r["id"], r["phase"]) for r in back["runs"]]
    assert history == [(a_id, "Succeeded"), (b_id, "Succeeded")]
    assert back["outputs"] == run_a["outputs"]
    time.sleep(3)
    assert labelled(cluster_api, ns, name)["jobs"] == [], "a finished run is not trained again"

    # A run superseded before it finished (C, suspended), then current again: it runs, and
    # its outcome is recorded instead of the old "Superseded".
    patch(cluster_api, ns, name, {"spec": {"training": {"learningRate": 2.0e-3},
                                           "runPolicy": {"suspend": True}}})  # fmt: skip
    c_id = wait_until(
        "run C suspended",
        lambda: (lambda s: s["currentRun"]["id"] if s.get("phase") == "Suspended" else None)(
            ftj(cluster_api, ns, name)["status"]
        ),
        60,
        alive=kwok_operator.alive,
    )
    patch(cluster_api, ns, name, {"spec": {"training": {"learningRate": 1.0e-3},
                                           "runPolicy": {"suspend": False}}})  # fmt: skip
    wait_until("back on A", lambda: settled(a_id, 5), 60, alive=kwok_operator.alive)
    patch(cluster_api, ns, name, {"spec": {"training": {"learningRate": 2.0e-3}}})
    final = wait_until("C Succeeded", lambda: settled(c_id, 6), 60, alive=kwok_operator.alive)
    phases = [(r["id"], r["phase"]) for r in final["runs"]]
    assert phases == [(a_id, "Succeeded"), (b_id, "Succeeded"), (c_id, "Succeeded")], phases


@pytest.mark.slow
def test_a_recreated_job_reuses_the_finished_run_and_never_adopts_old_children(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "again"
    manifest = quickstart(tiny_model, name)
    create(cluster_api, ns, copy.deepcopy(manifest))
    first = wait_phase(cluster_api, ns, name, "Succeeded", operator, 300)
    run = first["status"]["currentRun"]["id"]
    assert cluster.runner is not None
    run_dir = cluster.runner.claim_dir(ns, ch.output_claim_name(name)) / name / run
    trained = digest(run_dir)

    # Deleted and applied again at once (as a GitOps tool would after a TTL deletion): the
    # old Job is still there, Complete, waiting for the garbage collector.
    client.CustomObjectsApi(cluster_api).delete_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name
    )
    wait_until("deleted", lambda: gone(cluster_api, ns, name), 30)
    create(cluster_api, ns, copy.deepcopy(manifest))
    second = wait_phase(cluster_api, ns, name, "Succeeded", operator, 300)
    uid = second["metadata"]["uid"]
    assert uid != first["metadata"]["uid"]
    status = second["status"]
    assert status["currentRun"]["id"] == run
    assert "reused" in status["message"], status["message"]
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Succeeded"] == [
        "OutputReused"
    ]
    job = client.BatchV1Api(cluster_api).read_namespaced_job(ch.job_name(run, 1), ns)
    assert [r.uid for r in job.metadata.owner_references] == [uid]
    assert digest(run_dir) == trained, "the finished run was not touched"


def test_deletion_never_waits_for_the_operator(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    cluster_kubeconfig: Path,
    ftj_crd_installed: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(cluster_api)
    with kwok_operator_in_own_namespace(
        cluster, cluster_api, cluster_kubeconfig, tmp_path, "del"
    ) as (ns, running):
        try:
            create(cluster_api, ns, quickstart(tiny_model, "plain", {"spec": ON_KWOK}))
            # As an earlier operator (with a timer) left it: kopf's finalizer on the object.
            legacy = quickstart(tiny_model, "legacy", {"spec": ON_KWOK})
            legacy["metadata"]["finalizers"] = ["kubetune.io/finalizer"]
            create(cluster_api, ns, legacy)
            for name in ("plain", "legacy"):
                wait_phase(cluster_api, ns, name, "Succeeded", running, 60)
            wait_until(
                "no finalizers",
                lambda: (
                    not any(
                        ftj(cluster_api, ns, n)["metadata"].get("finalizers")
                        for n in ("plain", "legacy")
                    )
                ),
                30,
                alive=running.alive,
            )
        finally:
            running.stop()
        # The operator is gone: the objects and the namespace still go.
        client.CustomObjectsApi(cluster_api).delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "plain"
        )
        wait_until("plain deleted", lambda: gone(cluster_api, ns, "plain"), 30)
        core.delete_namespace(ns)

        def namespace_gone() -> bool:
            try:
                core.read_namespace(ns)
            except client.ApiException as err:
                return err.status == 404
            return False

        wait_until("namespace deleted", namespace_gone, 30, interval=0.5)


def test_orphaned_children_are_adopted_by_a_recreated_job(
    cluster_api: client.ApiClient, cluster_namespace: str, kwok_operator: Operator, tiny_model: Path
) -> None:
    """Deleted with --cascade=orphan (the garbage collector strips the owner references), then
    applied again: the unfinished Job is adopted, not duplicated, and completes."""
    ns, name = cluster_namespace, "orphan"
    paused = quickstart(tiny_model, name, {"spec": {**ON_KWOK, "runPolicy": {"suspend": True}}})
    create(cluster_api, ns, copy.deepcopy(paused))
    run = wait_phase(cluster_api, ns, name, "Suspended", kwok_operator, 60)["status"]
    job_name = ch.job_name(run["currentRun"]["id"], 1)
    batch = client.BatchV1Api(cluster_api)
    original = batch.read_namespaced_job(job_name, ns).metadata.uid
    client.CustomObjectsApi(cluster_api).delete_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, propagation_policy="Orphan"
    )
    wait_until(
        "the Job orphaned",
        lambda: (
            gone(cluster_api, ns, name)
            and not batch.read_namespaced_job(job_name, ns).metadata.owner_references
        ),
        30,
    )
    resumed = copy.deepcopy(paused)
    resumed["spec"]["runPolicy"]["suspend"] = False
    create(cluster_api, ns, resumed)
    done = wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 90)
    job = batch.read_namespaced_job(job_name, ns)
    assert job.metadata.uid == original, "adopted, not created again"
    assert [r.uid for r in job.metadata.owner_references] == [done["metadata"]["uid"]]
    assert labelled(cluster_api, ns, name)["jobs"] == [job_name]
