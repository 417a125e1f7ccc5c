"""Least privilege: the rules hold no wildcard, no deletecollection and never more than create
on claims (outputs are not the operator's); every operator test runs under a ServiceAccount
bound to exactly these rules in its namespace, and this test runs it cluster-wide under the
ClusterRole."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from kubetune.controller import rbac
from tests.controller.conftest import Operator
from tests.controller.helpers import create, quickstart, wait_phase
from tests.controller.rbac import service_account_kubeconfig
from tests.controller.test_operator_policies import ON_KWOK


def test_rules_are_explicit_and_never_touch_outputs() -> None:
    for rule in rbac.NAMESPACED_RULES + rbac.CLUSTER_RULES + rbac.NAMESPACE_WATCH_RULES:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "deletecollection" not in rule["verbs"], rule
    claims = [r for r in rbac.NAMESPACED_RULES if "persistentvolumeclaims" in r["resources"]]
    assert [r["verbs"] for r in claims] == [["create"]]
    secrets = [r for r in rbac.NAMESPACED_RULES if "secrets" in r["resources"]]
    assert secrets == []  # the Hub token reaches pods by secretKeyRef, never through us


@pytest.mark.cluster
def test_the_operator_runs_cluster_wide_under_its_cluster_role(
    cluster_api: client.ApiClient,
    cluster_kubeconfig: Path,
    cluster_namespace: str,
    ftj_crd_installed: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    kubeconfig = service_account_kubeconfig(
        cluster_api, cluster_kubeconfig, None, tmp_path / "cluster.kubeconfig"
    )
    running = Operator(
        kubeconfig, cluster_namespace, tmp_path / "op.log", run_locally=False, all_namespaces=True
    ).start()
    try:
        create(cluster_api, cluster_namespace, quickstart(tiny_model, "wide", {"spec": ON_KWOK}))
        wait_phase(cluster_api, cluster_namespace, "wide", "Succeeded", running, 90)
        assert "Forbidden" not in running.log.read_text(), running.tail()
    finally:
        running.stop()
