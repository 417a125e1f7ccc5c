"""Rendering of a run's children: names, limits, run ids and the Indexed Job."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from kubetune.api import validate_object
from kubetune.api.pod_paths import MANIFEST_FILE
from kubetune.api.validation import FineTuneJob
from kubetune.controller import children as ch
from kubetune.controller import pods, runs
from tests.trainer.jobs import EXAMPLES, merged

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
OWNER_UID = "0b7c9a52-2f1e-4c55-9f0b-6f5a1c1d2e3f"


def job(changes: dict[str, Any] | None = None, name: str = "quickstart") -> FineTuneJob:
    manifest = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    manifest["metadata"]["name"] = name
    return validate_object(merged(manifest, changes or {}))


def owner(name: str = "quickstart") -> ch.Owner:
    return ch.Owner(name, "team-a", OWNER_UID)


@pytest.mark.parametrize("length", [1, 20, 40, 49, 50, 51, 58, 63])
def test_names_fit_kubernetes_limits_for_any_valid_name(length: int) -> None:
    name = ("a1-" * 30)[:length].strip("-") or "a"
    name = name if name[-1].isalnum() else name[:-1]
    run = runs.run_id(name, job(name=name).spec.to_wire())
    base = ch.base_name(run)
    assert DNS_1035.match(base) and len(base) <= ch.BASE_NAME_LIMIT
    for attempt in (1, 101):
        job_name = ch.job_name(run, attempt)
        hostname = f"{job_name}-511"  # the highest completion index (512 nodes)
        assert len(hostname) <= 63 and DNS_1035.match(hostname), hostname
    assert len(ch.output_claim_name(name)) <= 63


def test_long_names_are_shortened_with_a_hash_and_stay_distinct() -> None:
    a, b = "x" * 60 + "abc", "x" * 60 + "abd"
    assert ch.base_name(runs.run_id(a, job(name=a).spec.to_wire())) != ch.base_name(
        runs.run_id(b, job(name=b).spec.to_wire())
    )
    assert ch.output_claim_name(a) != ch.output_claim_name(b)


def test_a_name_starting_with_a_digit_still_gives_a_valid_service_name() -> None:
    assert DNS_1035.match(ch.base_name("7b-model-1234abcd"))


def test_single_node_job_runs_kubetune_train_directly() -> None:
    spec = job()
    rendered = pods.batch_job(spec, owner(), "quickstart-1234abcd", 1, ch.Settings())
    pod = rendered["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["kubetune", "train", "/etc/kubetune/finetunejob.yaml"]
    assert "--output-dir" in container["command"]
    assert container["command"][container["command"].index("--output-dir") + 1] == (
        "/output/quickstart"
    )
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert rendered["spec"]["completionMode"] == "Indexed"
    assert rendered["spec"]["completions"] == rendered["spec"]["parallelism"] == 1
    assert rendered["spec"]["backoffLimit"] == 0
    assert rendered["spec"]["suspend"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == ch.base_name("quickstart-1234abcd")
    claim = next(v for v in pod["volumes"] if v["name"] == "output")
    assert claim["persistentVolumeClaim"]["claimName"] == "quickstart-output"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    # Restricted Pod Security.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert rendered["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID
    assert rendered["metadata"]["ownerReferences"][0]["controller"] is True


def test_multi_node_job_wires_torchrun_to_pod_zero() -> None:
    spec = job({"spec": {"distributed": {"nodes": 4, "gpusPerNode": 8}}})
    run = "quickstart-1234abcd"
    settings = ch.Settings(master_port=29400)
    rendered = pods.batch_job(spec, owner(), run, 2, settings)
    assert rendered["spec"]["completions"] == rendered["spec"]["parallelism"] == 4
    command = rendered["spec"]["template"]["spec"]["containers"][0]["command"]
    base = ch.base_name(run)
    assert command[:7] == [
        "torchrun",
        "--nproc-per-node=8",
        "--nnodes=4",
        "--node-rank=$(NODE_RANK)",
        f"--master-addr={base}-2-0.{base}",
        "--master-port=29400",
        "--no-python",
    ]
    env = {e["name"]: e for e in rendered["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


def test_scheduling_fields_queue_and_pod_labels_are_passed_through() -> None:
    spec = job(
        {
            "spec": {
                "resources": {
                    "cpu": "8",
                    "memory": "64Gi",
                    "nodeSelector": {"pool": "h100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {}},
                    "priorityClassName": "high",
                    "schedulerName": "volcano",
                    "queueName": "team-a",
                    "serviceAccountName": "trainer",
                },
                "image": {"trainer": "registry.local/trainer:1", "pullSecrets": ["regcred"]},
                "volumes": [{"name": "data", "claimName": "datasets", "mountPath": "/data"}],
            }
        }
    )
    settings = ch.Settings(pod_labels={"kubetune.io/run-locally": "true"})
    rendered = pods.batch_job(spec, owner(), "quickstart-1234abcd", 1, settings)
    template = rendered["spec"]["template"]
    pod = template["spec"]
    assert rendered["metadata"]["labels"][ch.KUEUE_QUEUE_LABEL] == "team-a"
    assert rendered["spec"]["suspend"] is True  # Kueue admits it
    assert template["metadata"]["labels"]["kubetune.io/run-locally"] == "true"
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["priorityClassName"] == "high"
    assert pod["schedulerName"] == "volcano"
    assert pod["serviceAccountName"] == "trainer"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    container = pod["containers"][0]
    assert container["image"] == "registry.local/trainer:1"
    assert container["resources"]["limits"] == {
        "nvidia.com/gpu": "1",
        "cpu": "8",
        "memory": "64Gi",
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True


def test_config_map_holds_a_manifest_the_trainer_accepts() -> None:
    from kubetune.api import parse_manifest

    rendered = ch.config_map(job(), owner(), "quickstart-1234abcd")
    text = rendered["data"][MANIFEST_FILE]
    parsed = parse_manifest(text)
    assert parsed.name == "quickstart" and parsed.spec == job().spec


def test_output_claim_is_never_owned_by_the_job() -> None:
    claim = ch.output_claim(job(), owner())
    assert claim is not None
    assert "ownerReferences" not in claim["metadata"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    named = job({"spec": {"output": {"claimTemplate": None, "claimName": "models"}}})
    assert ch.output_claim(named, owner()) is None
    assert ch.claim_name(named) == "models"


def test_service_is_headless_and_selects_the_run() -> None:
    rendered = ch.service(owner(), "quickstart-1234abcd", ch.Settings())
    assert rendered["spec"]["clusterIP"] == "None"
    assert rendered["spec"]["publishNotReadyAddresses"] is True
    assert rendered["spec"]["selector"][ch.RUN_LABEL] == ch.base_name("quickstart-1234abcd")


def test_credentials_reach_the_pods_by_reference_only() -> None:
    spec = job(
        {
            "spec": {
                "model": {"path": None, "hfRepo": "org/gated", "tokenSecret": {"name": "hub"}},
                "env": [
                    {"name": "AWS_ACCESS_KEY_ID",
                     "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
                    {"name": "HF_HUB_OFFLINE", "value": "0"},
                ],
                "envFrom": [{"secretRef": "storage", "prefix": "S3_"}],
            }
        }
    )  # fmt: skip
    container = pods.batch_job(spec, owner(), "qs-1", 1, ch.Settings())["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hub", "key": "token"}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "id"}}
    assert env["HF_HUB_OFFLINE"]["value"] == "0"
    assert container["envFrom"] == [{"secretRef": {"name": "storage"}, "prefix": "S3_"}]


def test_pods_are_restricted_without_a_hard_coded_user() -> None:
    context = pods.batch_job(job(), owner(), "qs-1", 1, ch.Settings())["spec"]["template"]["spec"][
        "securityContext"
    ]
    assert context["runAsNonRoot"] is True and "runAsUser" not in context
    assert "fsGroup" not in context and context["fsGroupChangePolicy"] == "OnRootMismatch"
    chosen = ch.Settings(run_as_user=1001, fs_group=2000)
    context = pods.batch_job(job(), owner(), "qs-1", 1, chosen)["spec"]["template"]["spec"][
        "securityContext"
    ]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (1001, 1001, 2000)


def test_pods_get_a_read_only_root_and_only_these_writable_places() -> None:
    pod = pods.batch_job(job(), owner(), "qs-1", 1, ch.Settings())["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/output", "/dev/shm", "/tmp"}


def test_the_data_configmap_sits_next_to_the_manifest() -> None:
    """The quickstart's relative dataset path reads the same file in the pod as locally."""
    pod = pods.batch_job(job(), owner(), "qs-1", 1, ch.Settings())["spec"]["template"]["spec"]
    config = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config["projected"]["sources"] == [
        {"configMap": {"name": ch.base_name("qs-1")}},
        {
            "configMap": {
                "name": "quickstart-data",
                "items": [{"key": "identity.jsonl", "path": "data/identity.jsonl"}],
            }
        },
    ]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert mount == {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True}
