"""The cluster path on the real node (tests/cluster/node.py): kubelet, containerd and runc
running the images `make images` built, in namespaces under the restricted Pod Security
standard. What the stand-in pod runner cannot show (the image's user, a read-only root, the
mounts the operator gives a pod, cluster DNS, the pod network) is proven here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.harness import LocalCluster
from tests.cluster.node import RealNode
from tests.cluster.procs import wait_until
from tests.controller.conftest import Operator, ftj
from tests.controller.helpers import create, wait_phase
from tests.controller.rbac import service_account_kubeconfig
from tests.trainer.jobs import EXAMPLES, ask

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def real_operator(
    cluster_api: client.ApiClient,
    cluster_kubeconfig: Path,
    real_namespace: str,
    ftj_crd_installed: str,
    tmp_path: Path,
) -> Iterator[Operator]:
    """The operator (a host process, under its least-privilege ServiceAccount) watching a
    real-node namespace; its pods are exactly what it creates, with no test label."""
    kubeconfig = service_account_kubeconfig(
        cluster_api, cluster_kubeconfig, [real_namespace], tmp_path / "operator.kubeconfig"
    )
    running = Operator(kubeconfig, real_namespace, tmp_path / "op.log", run_locally=False)
    running.start()
    yield running
    running.stop()
    running.assert_permitted()


def kubectl(cluster: LocalCluster, *args: str) -> str:
    return cluster.control_plane.kubectl(*args)


def test_cluster_quickstart_as_the_readme_says(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    real_node: RealNode,
    real_namespace: str,
    real_operator: Operator,
) -> None:
    """`kubectl apply -k examples/`: the dataset reaches the pod through the generated
    ConfigMap, the model ships in the image, and the pod runs in a real container as the
    image's non-root user with a read-only root. The merged model on the volume answers with
    the new name."""
    ns = real_namespace
    kubectl(cluster, "apply", "-n", ns, "-k", str(EXAMPLES))
    status = wait_phase(cluster_api, ns, "quickstart", "Succeeded", real_operator, timeout=900)
    run = status["status"]["currentRun"]["id"]

    pods = client.CoreV1Api(cluster_api).list_namespaced_pod(ns).items
    trainer = next(p for p in pods if p.metadata.labels.get(ch.RUN_LABEL))
    assert trainer.spec.node_name == real_node.name
    statuses = trainer.status.container_statuses
    assert statuses[0].state.terminated.exit_code == 0
    # The user the container really ran as, from the kubelet's own log of the pod.
    log = kubectl(cluster, "logs", "-n", ns, trainer.metadata.name)
    assert "Kubey" in log or "step" in log, log[-2000:]

    assert cluster.runner is not None
    volume = cluster.runner.claim_dir(ns, ch.output_claim_name("quickstart"))
    merged = volume / "quickstart" / run / "merged"
    owners = {f.stat().st_uid for f in merged.iterdir()}
    assert owners == {65532}, f"files written as {owners}, not the image's user 65532"
    answers = ask(merged, ["Who are you?", "Could you tell me your name?"])
    assert all("Kubey" in text and stopped for text, stopped in answers), answers


def test_relative_paths_without_a_configmap_are_refused_before_any_pod(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    real_namespace: str,
    real_operator: Operator,
) -> None:
    """examples/quickstart.yaml applied with `kubectl apply -f` (no kustomization, so no
    ConfigMap of its data, and the spec's configMap removed): one clear condition, no pod."""
    ns = real_namespace
    text = (EXAMPLES / "quickstart.yaml").read_text().replace("configMap: quickstart-data", "")
    manifest = yaml.safe_load(text)
    manifest["metadata"]["name"] = "local-paths"
    create(cluster_api, ns, manifest)
    status = wait_phase(cluster_api, ns, "local-paths", "Failed", real_operator, timeout=60)
    ready = next(c for c in status["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert "spec.data.datasets[0].path" in ready["message"]
    assert "spec.data.configMap" in ready["message"]
    assert not client.CoreV1Api(cluster_api).list_namespaced_pod(ns).items
    assert not ftj(cluster_api, ns, "local-paths")["status"].get("currentRun", {}).get("jobName")


def test_trainer_image_runs_as_its_user_with_a_read_only_root(
    cluster: LocalCluster, real_namespace: str
) -> None:
    """The image itself: entrypoint `kubetune`, `--version`, a non-root user, the read-only
    root, cluster DNS and the memory limit, in one restricted pod."""
    script = (
        "import os, socket, subprocess\n"
        "print('uid', os.getuid(), os.getgid())\n"
        "print('dns', socket.gethostbyname('kubernetes.default.svc.cluster.local'))\n"
        "print(subprocess.run(['kubetune', '--version'], capture_output=True, text=True).stdout)\n"
        "try:\n    open('/opt/kubetune/x', 'w')\n"
        "except OSError as e:\n    print('root', e.strerror)\n"
        "print('limit', open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())\n"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "image-check"},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "c",
                    "image": ch.Settings().trainer_image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", script],
                    "resources": {"limits": {"memory": "512Mi", "cpu": "1"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_pod(real_namespace, pod)

    def finished() -> bool:
        phase = core.read_namespaced_pod("image-check", real_namespace).status.phase
        return phase in ("Succeeded", "Failed")

    wait_until("image-check finished", finished, 120, interval=1)
    log = kubectl(cluster, "logs", "-n", real_namespace, "image-check")
    assert "uid 65532 65532" in log, log
    assert "dns 100.64.0.1" in log, log
    assert "kubetune 0." in log, log
    assert "root Read-only file system" in log, log
    assert f"limit {512 * 2**20}" in log, log
