"""What the API server's admission does to a run, on the real control plane (kwok plays the
pods): the training pods pass the `restricted` Pod Security standard where it is enforced,
and a ResourceQuota that refuses the Job shows in status and Events (Reconciling, not
Stalled: a quota frees up) until it is lifted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.cluster.crd import install_crd
from tests.cluster.harness import LocalCluster
from tests.cluster.procs import wait_until
from tests.controller.conftest import Operator, ftj, kwok_operator_in_own_namespace
from tests.controller.helpers import create, quickstart, wait_phase
from tests.controller.test_operator_policies import ON_KWOK, events

pytestmark = pytest.mark.cluster
CRD = Path(__file__).resolve().parents[2] / "crds" / "finetunejob.yaml"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def conditions(status: dict[str, object]) -> dict[str, tuple[str, str]]:
    listed = status.get("conditions") or []
    assert isinstance(listed, list)
    return {c["type"]: (c["status"], c["reason"]) for c in listed}


def test_training_pods_pass_restricted_pod_security(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    cluster_kubeconfig: Path,
    ftj_crd_installed: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(cluster_api)
    with kwok_operator_in_own_namespace(
        cluster, cluster_api, cluster_kubeconfig, tmp_path, "psa"
    ) as (ns, running):
        core.patch_namespace(ns, {"metadata": {"labels": RESTRICTED}})
        create(cluster_api, ns, quickstart(tiny_model, "strict", {"spec": ON_KWOK}))
        wait_phase(cluster_api, ns, "strict", "Succeeded", running, 90)
        pods = core.list_namespaced_pod(ns).items
        assert pods, "the Job created its pods under enforce=restricted"
        assert all(p.spec.security_context.run_as_non_root for p in pods)


def test_a_quota_that_refuses_the_job_shows_until_it_is_lifted(
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    kwok_operator: Operator,
    tiny_model: Path,
) -> None:
    ns, name = cluster_namespace, "quota"
    core = client.CoreV1Api(cluster_api)
    core.create_namespaced_resource_quota(
        ns, {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
    )
    # The quota controller must have counted usage before admission enforces it.
    wait_until(
        "quota counted",
        lambda: (core.read_namespaced_resource_quota("no-jobs", ns).status.used or {}) != {},
        30,
    )
    create(cluster_api, ns, quickstart(tiny_model, name, {"spec": ON_KWOK}))

    def refused() -> dict[str, object] | None:
        status = ftj(cluster_api, ns, name).get("status") or {}
        return status if conditions(status).get("Ready", ("", ""))[1] == "ExceededQuota" else None

    status = wait_until("ExceededQuota", refused, 60, alive=kwok_operator.alive)
    assert status["phase"] == "Pending"
    assert "exceeded quota" in str(status["message"])
    assert conditions(status)["Reconciling"][0] == "True"
    assert conditions(status)["Stalled"][0] == "False"
    assert ("Warning", "ExceededQuota") in events(cluster_api, ns, name)

    core.delete_namespaced_resource_quota("no-jobs", ns)
    wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 90)


def test_secrets_reach_the_pods_by_reference_and_nowhere_else(
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    kwok_operator: Operator,
    tiny_model: Path,
) -> None:
    """A Hub token and storage credentials, by reference: the pods get secretKeyRefs, and the
    value is in no ConfigMap, status, Event or operator log (the operator cannot even read
    Secrets: its RBAC has no rule for them)."""
    ns, name, value = cluster_namespace, "gated", "hf_s3cr3tT0kenValue"
    core = client.CoreV1Api(cluster_api)
    core.create_namespaced_secret(
        ns, {"metadata": {"name": "hub"}, "stringData": {"token": value, "id": value}}
    )
    changes = {
        "spec": {
            **ON_KWOK,
            "model": {"path": None, "hfRepo": "org/gated-model", "tokenSecret": {"name": "hub"}},
            "env": [{"name": "AWS_ACCESS_KEY_ID",
                     "valueFrom": {"secretKeyRef": {"name": "hub", "key": "id"}}}],
            "envFrom": [{"secretRef": "hub", "prefix": "STORAGE_"}],
        }
    }  # fmt: skip
    create(cluster_api, ns, quickstart(tiny_model, name, changes))
    done = wait_phase(cluster_api, ns, name, "Succeeded", kwok_operator, 90)
    pod = core.list_namespaced_pod(ns, label_selector=f"kubetune.io/job-name={name}").items[0]
    env = {e.name: e for e in pod.spec.containers[0].env}
    assert env["HF_TOKEN"].value_from.secret_key_ref.name == "hub"
    assert env["AWS_ACCESS_KEY_ID"].value_from.secret_key_ref.key == "id"
    assert pod.spec.containers[0].env_from[0].secret_ref.name == "hub"
    places = {
        "configmaps": str([c.data for c in core.list_namespaced_config_map(ns).items]),
        "status": str(done["status"]),
        "events": str([e.message for e in core.list_namespaced_event(ns).items]),
        "operator log": kwok_operator.log.read_text(errors="replace"),
    }
    assert [where for where, text in places.items() if value in text] == []


def test_an_object_stored_before_a_stricter_crd_stalls_with_the_reason(
    cluster_api: client.ApiClient,
    cluster_namespace: str,
    kwok_operator: Operator,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """An object the current CRD would refuse (stored under a looser, older CRD): Failed
    `InvalidSpec`, Stalled, naming the field and what is allowed; no Job."""
    ns, name = cluster_namespace, "older"
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    template = schema["properties"]["spec"]["properties"]["data"]["properties"]["template"]
    del template["enum"]  # as if an older release accepted any template name
    looser = tmp_path / "older-crd.yaml"
    looser.write_text(yaml.safe_dump(crd))
    try:
        install_crd(cluster_api, looser)
        body = quickstart(tiny_model, name, {"spec": {**ON_KWOK, "data": {"template": "mistral"}}})
        create(cluster_api, ns, body)
    finally:
        install_crd(cluster_api, CRD)
    status = wait_phase(cluster_api, ns, name, "Failed", kwok_operator, 60)["status"]
    assert conditions(status)["Stalled"] == ("True", "InvalidSpec")
    assert "spec.data.template" in status["message"] and "chatml" in status["message"], status
    assert not client.BatchV1Api(cluster_api).list_namespaced_job(ns).items
