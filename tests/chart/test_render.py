"""The chart rendered by the real `helm` (lint, template, schema): every documented values
combination renders, bad values are refused naming the value, and what the chart installs
is exactly what the Python sources say (the CRD, the RBAC rules, the version)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import __version__
from kubetune.api.crd import render_crd
from kubetune.controller import rbac
from tests.chart.helm import CHART, REPO, find, helm, render, set_args

COMBINATIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "ha": {"replicaCount": 2, "podDisruptionBudget": {"enabled": True}},
    "ha-namespaced": {"replicaCount": 2, "watchNamespaces": ["team-a"]},
    "network-policy": {"networkPolicy": {"enabled": True,
                                         "metricsFrom": [{"namespaceSelector": {}}]}},
    "no-crd-no-rbac": {"crds": {"install": False}, "rbac": {"create": False},
                       "serviceAccount": {"create": False, "name": "ops"}},
    "openshift": {"trainer": {"fsGroup": None, "podLabels": {"kueue.x-k8s.io/queue-name": "gpu"}}},
    "standalone": {"peering": {"enabled": False}, "rbac": {"aggregateToDefaultRoles": False}},
}  # fmt: skip


@pytest.mark.parametrize("name", COMBINATIONS)
def test_each_documented_combination_lints_and_renders(name: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(COMBINATIONS[name]))
    linted = helm("lint", str(CHART), "--strict", f"--values={values}")
    assert "0 chart(s) failed" in linted.stdout
    objects = render(COMBINATIONS[name])
    [deployment] = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == COMBINATIONS[name].get("replicaCount", 1)


def test_the_operator_pod_is_restricted_and_runs_this_version() -> None:
    [deployment] = find(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == f"ghcr.io/kubetune/operator:{__version__}"
    assert pod["securityContext"] == {"runAsNonRoot": True,
                                      "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    args = container["args"]
    assert args[:2] == ["operator", "--all-namespaces"]
    assert f"--trainer-image=ghcr.io/kubetune/trainer:{__version__}" in args
    assert "--pod-fs-group=65532" in args
    assert "--peering=kubetune" in args  # peered by default, so scaling up needs no restart
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one replica
    root = render({"trainer": {"fsGroup": 0}})
    assert "--pod-fs-group=0" in find(root, "Deployment")[0]["spec"]["template"]["spec"][
        "containers"][0]["args"]  # fmt: skip
    [hook] = find(render(), "Pod")
    assert hook["metadata"]["labels"]["app.kubernetes.io/component"] == "test"


def test_chart_version_is_kubetune_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__


SCHEMA, TEMPLATE = "schema", "template"


@pytest.mark.parametrize(
    ("values", "named", "by"),
    [
        ({"replicas": 2}, "replicas", SCHEMA),  # a typo of replicaCount
        ({"image": {"tagg": "x"}}, "tagg", SCHEMA),
        ({"replicaCount": "two"}, "replicaCount", SCHEMA),
        ({"operator": {"logFormat": "xml"}}, "logFormat", SCHEMA),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces", SCHEMA),
        ({"trainer": {"metricsPort": 70000}}, "metricsPort", SCHEMA),
        ({"replicaCount": 2, "peering": {"enabled": False}}, "replicaCount > 1 needs peering",
         TEMPLATE),
        ({"operator": {"healthPort": 8080}}, "operator.metricsPort and operator.healthPort",
         TEMPLATE),
        ({"podDisruptionBudget": {"enabled": True}},
         "podDisruptionBudget.enabled needs replicaCount >= 2", TEMPLATE),
        ({"replicaCount": 2, "podDisruptionBudget": {"enabled": True, "minAvailable": 2}},
         "podDisruptionBudget.minAvailable (2) must be below replicaCount (2)", TEMPLATE),
    ],
)  # fmt: skip
def test_bad_values_are_refused_naming_the_value(
    values: dict[str, Any], named: str, by: str
) -> None:
    # `helm lint` reports a template's fail() as information only; the schema it enforces.
    for command in ("template", "lint") if by == SCHEMA else ("template",):
        args = [command, *(["kubetune"] if command == "template" else []), str(CHART)]
        refused = helm(*args, *set_args(values), check=False)
        assert refused.returncode != 0, f"helm {command} accepted {values}"
        assert named in refused.stderr + refused.stdout, refused.stderr + refused.stdout


def _strip(crd: dict[str, Any]) -> dict[str, Any]:
    crd["metadata"].pop("labels", None)
    crd["metadata"].pop("annotations", None)
    return crd


def test_the_chart_installs_the_generated_crd() -> None:
    """One source of truth: the chart's copy is byte for byte the generated CRD, and what it
    renders equals it apart from labels and annotations."""
    generated = render_crd()
    assert (CHART / "files" / "finetunejob.crd.yaml").read_text() == generated, "run make crd"
    assert (REPO / "crds" / "finetunejob.yaml").read_text() == generated, "run make crd"
    crd_name = "finetunejobs.kubetune.io"
    [crd] = find(render(), "CustomResourceDefinition", crd_name)
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert _strip(crd) == yaml.safe_load(generated)
    [kept_off] = find(render({"crds": {"keep": False}}), "CustomResourceDefinition", crd_name)
    assert "annotations" not in kept_off["metadata"]
    assert not find(render({"crds": {"install": False}}), "CustomResourceDefinition", crd_name)


def _rules(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(rule) for rule in obj["rules"]]


def test_rbac_is_exactly_the_operators_rules() -> None:
    """Cluster-wide: one ClusterRole with rbac.py's rules. Namespaced: a Role per namespace
    and no namespaced resource in the ClusterRole. Peering adds kopf's rules in scope."""
    assert (CHART / "files" / "rbac-rules.yaml").read_text() == rbac.render_rules(), "make crd"
    objects = render()
    [cluster_role] = find(objects, "ClusterRole", "kubetune")
    assert _rules(cluster_role) == rbac.cluster_role("x", peering=True)["rules"]
    assert not find(objects, "Role")

    objects = render({"watchNamespaces": ["team-a", "team-b"]})
    [cluster_role] = find(objects, "ClusterRole", "kubetune")
    assert _rules(cluster_role) == rbac.cluster_role("x", namespaced_mode=True)["rules"]
    roles = find(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(_rules(r) == rbac.role("x", "team-a", peering=True)["rules"] for r in roles)
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]

    standalone = {"peering": {"enabled": False}}
    [cluster_role] = find(render(standalone), "ClusterRole", "kubetune")
    assert _rules(cluster_role) == rbac.cluster_role("x")["rules"]
    roles = find(render({**standalone, "watchNamespaces": ["team-a"]}), "Role")
    assert _rules(roles[0]) == rbac.role("x", "team-a")["rules"]


def test_finetunejobs_join_the_default_user_roles() -> None:
    edit = find(render(), "ClusterRole", "kubetune-edit")[0]
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert "create" in edit["rules"][0]["verbs"]
    view = find(render(), "ClusterRole", "kubetune-view")[0]
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert not find(render({"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole",
                    "kubetune-view")  # fmt: skip


def test_several_replicas_peer_in_the_scope_they_watch() -> None:
    objects = render({"replicaCount": 2})
    [deployment] = find(objects, "Deployment")
    # What the next upgrade compares to choose between a rolling update and Recreate.
    assert deployment["metadata"]["annotations"]["kubetune.io/peering-scope"] == "kubetune@*"
    [scoped] = find(render({"replicaCount": 2, "watchNamespaces": ["a", "b"]}), "Deployment")
    assert scoped["metadata"]["annotations"]["kubetune.io/peering-scope"] == "kubetune@a,b"
    assert "--peering=kubetune" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}  # peering: one works
    assert [o["metadata"]["name"] for o in find(objects, "ClusterKopfPeering")] == ["kubetune"]
    crds = {o["metadata"]["name"] for o in find(objects, "CustomResourceDefinition")}
    assert {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= crds  # in crds/

    objects = render({"replicaCount": 2, "watchNamespaces": ["a", "b"]})
    peerings = find(objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["a", "b"]
    assert not find(objects, "ClusterKopfPeering")
    standalone = render({"peering": {"enabled": False}})
    assert not find(standalone, "KopfPeering") and not find(standalone, "ClusterKopfPeering")


def test_the_values_table_is_current() -> None:
    checked = subprocess.run([sys.executable, str(CHART.parent / "values_table.py"), "--check"],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_helm_package_makes_a_versioned_archive(tmp_path: Path) -> None:
    helm("package", str(CHART), "--destination", str(tmp_path))
    archive = tmp_path / f"kubetune-{__version__}.tgz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"kubetune/values.schema.json", "kubetune/files/finetunejob.crd.yaml"} <= names
