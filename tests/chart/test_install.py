"""`helm install` on the test cluster, with the operator as a real pod on the real node: it
logs in with its own ServiceAccount through the `kubernetes` Service (kube-proxy), serves the
cluster quickstart, survives an upgrade that changes the CRD without restarting the run, and
an uninstall loses nothing. RBAC is checked with `kubectl auth can-i`; two replicas peer."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune import __version__
from kubetune.controller import children as ch
from tests.chart.helm import CHART, helm
from tests.chart.release import Release, adopt_crd
from tests.cluster.harness import LocalCluster
from tests.cluster.node import REAL_NODE_LABEL, RealNode
from tests.cluster.procs import wait_until
from tests.controller.conftest import ftj
from tests.controller.helpers import create, quickstart, wait_phase
from tests.controller.test_operator_policies import ON_KWOK
from tests.trainer.jobs import EXAMPLES, ask

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
ON_REAL_NODE = {REAL_NODE_LABEL: "true", **RESTRICTED}


@pytest.fixture
def ops_namespace(cluster: LocalCluster, real_node: RealNode) -> Iterator[str]:
    """Where the chart is installed; its pods run on the real node, restricted."""
    with cluster.namespace("ops", labels=ON_REAL_NODE) as name:
        yield name


def kubectl(cluster: LocalCluster, *args: str) -> str:
    return cluster.control_plane.kubectl(*args)


def release(cluster: LocalCluster, namespace: str, name: str, **values: Any) -> Release:
    return Release(name, namespace, cluster.kubeconfig, cluster.api(), values)


NEXT = "0.1.99"
"""The version of the simulated next release (chart, operator and trainer images)."""


def upgraded_chart(tmp_path: Path) -> Path:
    """The chart as the next release would ship it: its CRD gained a field, its version and
    appVersion moved (so the operator image and the default trainer image change too)."""
    chart = tmp_path / "kubetune"
    shutil.copytree(CHART, chart)
    crd_file = chart / "files" / "finetunejob.crd.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["futureKnob"] = {"type": "string", "description": f"Added in {NEXT}."}
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"] = meta["appVersion"] = NEXT
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return chart


@contextlib.contextmanager
def next_release_images(node: RealNode) -> Iterator[None]:
    """The images of the next release: today's, under its tag (no registry here)."""
    tags = [(f"ghcr.io/kubetune/{name}:{__version__}", f"ghcr.io/kubetune/{name}:{NEXT}")
            for name in ("operator", "trainer")]  # fmt: skip
    try:
        for image, tag in tags:
            node.tag_image(image, tag)
        yield
    finally:
        for _, tag in tags:
            node.untag_image(tag)


def test_install_quickstart_upgrade_uninstall_reinstall(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    real_node: RealNode,
    ops_namespace: str,
    tmp_path: Path,
) -> None:
    """The README's cluster path, end to end: helm install, `kubectl apply -k examples/`,
    a helm upgrade to the next version mid-run, helm uninstall, helm install again."""
    with cluster.namespace("team", labels=ON_REAL_NODE) as team, next_release_images(real_node):
        ops = release(cluster, ops_namespace, "kubetune", watchNamespaces=[team],
                      operator={"statusInterval": 1, "reconcileInterval": 2})  # fmt: skip
        adopt_crd(lambda *a: kubectl(cluster, *a), ops.name, ops_namespace)
        try:
            install_train_upgrade_and_reinstall(cluster, cluster_api, real_node, ops, team,
                                                tmp_path)  # fmt: skip
        finally:
            ops.uninstall(check=False)


def install_train_upgrade_and_reinstall(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    real_node: RealNode,
    ops: Release,
    team: str,
    tmp_path: Path,
) -> None:
    notes = ops.install()
    assert f"kubectl apply -n {team} -k examples/" in notes
    [pod] = ops.wait_ready(1)
    assert pod.spec.service_account_name == "kubetune"
    assert pod.spec.node_name == real_node.name
    tested = helm("test", ops.name, "-n", ops.namespace, "--logs", kubeconfig=ops.kubeconfig)
    assert "Phase:          Succeeded" in tested.stdout, tested.stdout

    kubectl(cluster, "apply", "-n", team, "-k", str(EXAMPLES))
    running = wait_phase(cluster_api, team, "quickstart", "Running", ops, 300)["status"]
    run = running["currentRun"]["id"]
    [job] = client.BatchV1Api(cluster_api).list_namespaced_job(team).items

    # The next release, mid-run: its CRD gains a field, the operator pod is replaced by one of
    # the new version, whose default trainer image is new too.
    ops.install(upgraded_chart(tmp_path), command="upgrade")
    crd = client.ApiextensionsV1Api(cluster_api).read_custom_resource_definition(
        "finetunejobs.kubetune.io"
    )
    schema = crd.spec.versions[0].schema.open_apiv3_schema.properties["spec"]
    assert "futureKnob" in schema.properties
    [upgraded] = ops.wait_ready(1)
    assert upgraded.metadata.uid != pod.metadata.uid
    assert upgraded.spec.containers[0].image == f"ghcr.io/kubetune/operator:{NEXT}"
    assert f"--trainer-image=ghcr.io/kubetune/trainer:{NEXT}" in upgraded.spec.containers[0].args

    done = wait_phase(cluster_api, team, "quickstart", "Succeeded", ops, 900)["status"]
    assert done["currentRun"]["id"] == run
    assert not done.get("runs") or [r["id"] for r in done["runs"]] == [run]
    [same] = client.BatchV1Api(cluster_api).list_namespaced_job(team).items
    assert same.metadata.uid == job.metadata.uid, "the upgrade restarted the run"
    assert_trained_on_the_real_node(cluster, cluster_api, team, run, real_node)
    ops.assert_permitted()

    ops.uninstall()
    assert_nothing_lost(cluster_api, team, run)
    assert kubectl(cluster, "get", "clusterrole", "-l", f"app.kubernetes.io/instance={ops.name}",
                   "-o", "name").strip() == ""  # fmt: skip

    ops.install()  # the CRD kept its ownership: the same release takes it back
    [again] = ops.wait_ready(1)
    wait_until(
        "the reinstalled operator counts the Succeeded job",
        lambda: 'kubetune_operator_jobs{phase="Succeeded"} 1.0' in ops.metrics(again),
        60,
        interval=1,
    )
    status = ftj(cluster_api, team, "quickstart")["status"]
    assert status["phase"] == "Succeeded" and status["currentRun"]["id"] == run
    [still] = client.BatchV1Api(cluster_api).list_namespaced_job(team).items
    assert still.metadata.uid == job.metadata.uid
    ops.assert_permitted()


def assert_trained_on_the_real_node(
    cluster: LocalCluster, api: client.ApiClient, ns: str, run: str, node: RealNode
) -> None:
    """The pod ran in a real container as the image's user with a read-only root, and the
    merged model on the volume answers with the new name."""
    pods = client.CoreV1Api(api).list_namespaced_pod(ns).items
    trainer = next(p for p in pods if p.metadata.labels.get(ch.RUN_LABEL))
    assert trainer.spec.node_name == node.name
    [container] = trainer.spec.containers
    assert container.security_context.read_only_root_filesystem is True
    assert trainer.spec.security_context.fs_group == 65532  # the chart's default
    assert trainer.status.container_statuses[0].state.terminated.exit_code == 0
    log = kubectl(cluster, "logs", "-n", ns, trainer.metadata.name)
    assert "Kubey" in log, log[-2000:]
    assert cluster.runner is not None
    volume = cluster.runner.claim_dir(ns, ch.output_claim_name("quickstart"))
    merged = volume / "quickstart" / run / "merged"
    owners = {f.stat().st_uid for f in merged.iterdir()}
    assert owners == {65532}, f"files written as {owners}, not the image's user 65532"
    answers = ask(merged, ["Who are you?", "Could you tell me your name?"])
    assert all("Kubey" in text and stopped for text, stopped in answers), answers


def assert_nothing_lost(api: client.ApiClient, ns: str, run: str) -> None:
    ext, core = client.ApiextensionsV1Api(api), client.CoreV1Api(api)
    crd = ext.read_custom_resource_definition("finetunejobs.kubetune.io")
    assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
    status = ftj(api, ns, "quickstart")["status"]
    assert status["phase"] == "Succeeded" and status["currentRun"]["id"] == run
    claim = core.read_namespaced_persistent_volume_claim(ch.output_claim_name("quickstart"), ns)
    assert claim.status.phase == "Bound"
    assert core.read_namespace(ns).status.phase == "Active"


# -- RBAC --------------------------------------------------------------------------------------

MUST = [
    ("list", "finetunejobs.kubetune.io"), ("watch", "finetunejobs.kubetune.io"),
    ("patch", "finetunejobs.kubetune.io/status"), ("update", "finetunejobs.kubetune.io/finalizers"),
    ("create", "jobs.batch"), ("delete", "jobs.batch"), ("watch", "pods"),
    ("create", "configmaps"), ("create", "services"), ("create", "persistentvolumeclaims"),
    ("create", "events"),
]  # fmt: skip
MUST_NOT = [
    ("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("delete", "pods"),
    ("delete", "persistentvolumeclaims"), ("get", "persistentvolumeclaims"),
    ("create", "finetunejobs.kubetune.io"), ("update", "finetunejobs.kubetune.io"),
    ("deletecollection", "jobs.batch"), ("create", "rolebindings.rbac.authorization.k8s.io"),
]  # fmt: skip
CRDS = "customresourcedefinitions.apiextensions.k8s.io"
CLUSTER_MUST_NOT = [
    ("delete", "namespaces"), ("create", CRDS), ("patch", CRDS), ("list", "nodes"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
]  # fmt: skip


def can_i(cluster: LocalCluster, user: str, verb: str, resource: str, ns: str | None) -> bool:
    where = ["-n", ns] if ns else []
    resource, _, subresource = resource.partition("/")  # "x/status": a subresource, not a name
    sub = [f"--subresource={subresource}"] if subresource else []
    argv = [cluster.control_plane.binary("kubectl"), f"--kubeconfig={cluster.kubeconfig}",
            "auth", "can-i", verb, resource, *sub, f"--as={user}", *where]  # fmt: skip
    answer = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


def test_rbac_is_least_privilege_cluster_wide_and_per_namespace(
    cluster: LocalCluster, ftj_crd_installed: str
) -> None:
    """`kubectl auth can-i --as` the chart's ServiceAccount: what the operator needs, and
    nothing of a list of things it must never do; with watchNamespaces, only there."""
    with cluster.namespace("rbac") as home, cluster.namespace("a") as a, \
            cluster.namespace("b") as b:  # fmt: skip
        # Not on the real node: kwok plays these operator pods, so none of them acts.
        no_crd = {"crds": {"install": False}}
        wide = Release("wide", home, cluster.kubeconfig, cluster.api(), no_crd)
        narrow = Release("narrow", home, cluster.kubeconfig, cluster.api(),
                         {**no_crd, "watchNamespaces": [a]})  # fmt: skip
        try:
            for rel in (wide, narrow):
                rel.install(wait=False)
            for name, allowed_in, denied_in in (("wide-kubetune", [a, b], []),
                                                ("narrow-kubetune", [a], [b, home])):  # fmt: skip
                user = f"system:serviceaccount:{home}:{name}"
                wrong = [(verb, res, ns) for ns in allowed_in for verb, res in MUST
                         if not can_i(cluster, user, verb, res, ns)]  # fmt: skip
                wrong += [(verb, res, ns) for ns in [a, b] for verb, res in MUST_NOT
                          if can_i(cluster, user, verb, res, ns)]  # fmt: skip
                wrong += [(verb, res, ns) for ns in denied_in for verb, res in MUST
                          if can_i(cluster, user, verb, res, ns)]  # fmt: skip
                wrong += [(verb, res, None) for verb, res in CLUSTER_MUST_NOT
                          if can_i(cluster, user, verb, res, None)]  # fmt: skip
                assert can_i(cluster, user, "watch", CRDS, None)
                assert not wrong, f"{name}: wrong answers (verb, resource, namespace): {wrong}"
        finally:
            for rel in (wide, narrow):
                rel.uninstall(check=False)


# -- high availability -------------------------------------------------------------------------


def peers(api: client.ApiClient, ns: str, name: str) -> dict[str, int]:
    """The live peers of a KopfPeering: identity (the pod name) -> priority."""
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "kopf.dev", "v1", ns, "kopfpeerings", name
    )
    return {pid: int(info["priority"]) for pid, info in (obj.get("status") or {}).items()
            if info and info.get("lifetime", 0) > 0}  # fmt: skip


def test_two_replicas_one_active_and_a_hand_over_within_30s(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    ops_namespace: str,
    ftj_crd_installed: str,
    tiny_model: Path,
) -> None:
    """replicaCount 2: distinct priorities, one replica works; deleting it hands over to the
    other within 30 s, and no FineTuneJob gets a second Job."""
    with cluster.namespace("work") as work:
        ops = release(cluster, ops_namespace, "ha", replicaCount=2, watchNamespaces=[work],
                      crds={"install": False})  # fmt: skip
        try:
            ops.install()
            hand_over(cluster_api, ops, work, tiny_model)
        finally:
            ops.uninstall(check=False)


def hand_over(api: client.ApiClient, ops: Release, work: str, tiny_model: Path) -> None:
    ops.wait_ready(2)
    peering = "ha-kubetune"
    wait_until("both replicas peered", lambda: len(peers(api, work, peering)) == 2,
               60, interval=0.5)  # fmt: skip
    priorities = peers(api, work, peering)
    assert len(set(priorities.values())) == 2, priorities
    active = max(priorities, key=lambda pid: priorities[pid])

    create(api, work, quickstart(tiny_model, "first", {"spec": ON_KWOK}))
    wait_phase(api, work, "first", "Succeeded", ops, 60)
    client.CoreV1Api(api).delete_namespaced_pod(active, ops.namespace)
    deleted = time.monotonic()
    wait_until("the active replica left the peering", lambda: active not in peers(api, work,
               peering), 30, interval=0.5)  # fmt: skip
    create(api, work, quickstart(tiny_model, "second", {"spec": ON_KWOK}))
    wait_phase(api, work, "second", "Succeeded", ops, 30)
    handed_over = time.monotonic() - deleted
    assert handed_over < 30, handed_over
    jobs = client.BatchV1Api(api).list_namespaced_job(work).items
    owners = sorted(j.metadata.labels[ch.JOB_LABEL] for j in jobs)
    assert owners == ["first", "second"], owners
    ops.assert_permitted()
