"""Proof: the FineTuneJob CRD is served by a real apiserver: schema + CEL validation, status."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.crd import install_crd

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
# KUBETUNE_TEST_CRD tries a candidate CRD file against the real apiserver before it lands.
CRD = Path(os.environ.get("KUBETUNE_TEST_CRD") or REPO / "crds" / "finetunejob.yaml")
QUICKSTART = REPO / "examples" / "quickstart.yaml"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
MERGE_PATCH = "application/merge-patch+json"


@pytest.fixture(scope="module")
def ftj_crd(cluster_api: client.ApiClient) -> Iterator[str]:
    """Installs crds/finetunejob.yaml and waits for Established (and for it to be served)."""
    yield install_crd(cluster_api, CRD)


def quickstart() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    return manifest


def create(api: client.ApiClient, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    objects = client.CustomObjectsApi(api)
    result: dict[str, Any] = objects.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, body
    )
    return result


def test_crd_is_established_with_short_name(cluster_api: client.ApiClient, ftj_crd: str) -> None:
    crd = client.ApiextensionsV1Api(cluster_api).read_custom_resource_definition(ftj_crd)
    assert crd.spec.names.kind == "FineTuneJob"
    assert "ftj" in crd.spec.names.short_names
    assert crd.spec.versions[0].subresources.status is not None


def test_quickstart_example_is_accepted(
    cluster_api: client.ApiClient, ftj_crd: str, cluster_namespace: str
) -> None:
    created = create(cluster_api, cluster_namespace, quickstart())
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["method"]["type"] == "lora"
    assert created["spec"]["distributed"]["nodes"] == 1


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = obj["spec"]
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = obj["spec"]
        for key in parents:
            node = node[key]
        node.pop(leaf, None)

    return mutate


def _all(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        for m in mutations:
            m(obj)

    return mutate


# (id, mutation of the quickstart, field path the apiserver must name, part of the message)
INVALID = [
    (
        "method-type-enum",
        _set("method.type", "prefix-tuning"),
        "spec.method.type",
        'Unsupported value: "prefix-tuning"',
    ),
    (
        "zero-nodes",
        _set("distributed.nodes", 0),
        "spec.distributed.nodes",
        "should be greater than or equal to 1",
    ),
    (
        "qlora-without-quantization",
        _all(_set("method.type", "qlora"), _delete("method.quantization")),
        "spec.method.quantization",
        "type qlora needs quantization settings",
    ),
    (
        "packing-without-cutoff",
        _all(_set("data.packing", True), _delete("data.cutoffLength")),
        "spec.data.cutoffLength",
        "packing needs cutoffLength",
    ),
    (
        "negative-learning-rate",
        _set("training.learningRate", -0.001),
        "spec.training.learningRate",
        "should be greater than 0",
    ),
    (
        "warmup-ratio-and-steps",
        _set("training.warmupSteps", 10),
        "spec.training.warmupSteps",
        "set warmupRatio or warmupSteps, not both",
    ),
    (
        "output-claim-name-and-template",
        _set("output.claimName", "existing-pvc"),
        "spec.output",
        "set exactly one of claimName or claimTemplate",
    ),
    (
        "env-overrides-the-launch",
        _set("env", [{"name": "NODE_RANK", "value": "0"}]),
        "spec.env[0].name",
        "is set by the distributed launch",
    ),
    (
        "hub-token-twice",
        _all(
            _set("model", {"hfRepo": "org/model", "tokenSecret": {"name": "hub"}}),
            _set("env", [{"name": "HF_TOKEN", "value": "x"}]),
        ),
        "spec.env",
        "HF_TOKEN comes from model.tokenSecret",
    ),
    (
        "env-from-both",
        _set("envFrom", [{"secretRef": "a", "configMapRef": "b"}]),
        "spec.envFrom[0]",
        "set exactly one of secretRef or configMapRef",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_manifest_is_rejected_naming_the_field(
    cluster_api: client.ApiClient,
    ftj_crd: str,
    cluster_namespace: str,
    mutate: Callable[[dict[str, Any]], None],
    field: str,
    message: str,
) -> None:
    body = copy.deepcopy(quickstart())
    mutate(body)
    with pytest.raises(client.ApiException) as info:
        create(cluster_api, cluster_namespace, body)
    assert info.value.status == 422, info.value.body
    status = json.loads(info.value.body)
    text = status["message"]
    assert message in text, text
    causes = status.get("details", {}).get("causes", [])
    assert any(c.get("field") == field and message in c.get("message", "") for c in causes), causes


def test_status_is_written_only_through_the_status_subresource(
    cluster_api: client.ApiClient, ftj_crd: str, cluster_namespace: str
) -> None:
    objects = client.CustomObjectsApi(cluster_api)
    ns, name = cluster_namespace, "quickstart"
    create(cluster_api, ns, quickstart())

    # A merge patch of status through the main resource is silently dropped ...
    patched = objects.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        name,
        {"status": {"phase": "Running"}},
        _content_type=MERGE_PATCH,
    )
    assert "phase" not in (patched.get("status") or {})
    # ... and so is status in a full PUT of the main resource.
    current = objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    current["status"] = {"phase": "Succeeded", "observedGeneration": 7}
    replaced = objects.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, current)
    assert "phase" not in (replaced.get("status") or {})

    # The status subresource writes it, and does not bump the spec generation.
    written = objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, name, {"status": {"phase": "Running", "observedGeneration": 1}},
        _content_type=MERGE_PATCH,
    )  # fmt: skip
    assert written["status"]["phase"] == "Running"
    assert written["metadata"]["generation"] == 1
    # The status schema is enforced too.
    with pytest.raises(client.ApiException) as info:
        objects.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            name,
            {"status": {"phase": "Exploded"}},
            _content_type=MERGE_PATCH,
        )
    assert info.value.status == 422
    assert "status.phase" in info.value.body
    # A spec change through the main resource cannot touch status either.
    spec_patch = {"spec": {"training": {"epochs": 4}}, "status": {"phase": "Failed"}}
    after = objects.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, spec_patch, _content_type=MERGE_PATCH
    )
    assert after["metadata"]["generation"] == 2
    assert after["status"]["phase"] == "Running"
