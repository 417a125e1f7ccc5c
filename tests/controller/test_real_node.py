"""The cluster path on the real node (tests/cluster/node.py): kubelet, containerd and runc
running the images `make images` built, in namespaces under the restricted Pod Security
standard. What the stand-in pod runner cannot show (the image's user, a read-only root, the
mounts the operator gives a pod, cluster DNS, the pod network) is proven here."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.harness import LocalCluster
from tests.cluster.node import NODE_IP
from tests.cluster.procs import wait_until
from tests.controller.conftest import Operator, ftj
from tests.controller.helpers import create, quickstart, wait_phase
from tests.controller.rbac import service_account_kubeconfig
from tests.trainer.jobs import EXAMPLES, merged

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


def statuses_until(
    api: client.ApiClient, ns: str, name: str, phase: str, operator: Operator, timeout: float
) -> list[dict[str, Any]]:
    """Every distinct status seen (polled each half second) until `phase`."""
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        status = ftj(api, ns, name).get("status") or {}
        if not seen or seen[-1] != status:
            seen.append(status)
        return status.get("phase") == phase

    try:
        wait_until(f"{name} {phase}", reached, timeout, interval=0.5, alive=operator.alive)
    except (TimeoutError, RuntimeError) as err:
        raise AssertionError(f"{err}\nstatus: {seen[-1:]}\n{operator.tail()}") from None
    return seen


def trainer_pods(api: client.ApiClient, ns: str, name: str) -> list[Any]:
    """Every attempt's training pods of FineTuneJob `name`."""
    selector = f"{ch.JOB_LABEL}={name}"
    return list(client.CoreV1Api(api).list_namespaced_pod(ns, label_selector=selector).items)


def model_volume(cluster: LocalCluster, api: client.ApiClient, ns: str, model: Path) -> str:
    """A PVC holding `model`, as a user would provision one for their weights."""
    core = client.CoreV1Api(api)
    claim = {
        "metadata": {"name": "models"},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    core.create_namespaced_persistent_volume_claim(ns, claim)
    wait_until(
        "models bound",
        lambda: core.read_namespaced_persistent_volume_claim("models", ns).status.phase == "Bound",
        60,
    )
    assert cluster.runner is not None
    target = cluster.runner.claim_dir(ns, "models") / "tiny"
    shutil.copytree(model, target)
    # Readable by the image's user (65532), as files on a shared model volume must be.
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
    return "models"


def data_config_map(api: client.ApiClient, ns: str) -> str:
    """The quickstart's dataset in a ConfigMap, as `kubectl create configmap --from-file`."""
    text = (EXAMPLES / "data" / "identity.jsonl").read_text()
    body = {"metadata": {"name": "identity"}, "data": {"identity.jsonl": text}}
    client.CoreV1Api(api).create_namespaced_config_map(ns, body)
    return "identity"


def tiny_job(name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """The quickstart on the tiny model from the `models` volume, with its data from the
    `identity` ConfigMap: only what pods on any cluster can read."""
    base = {
        "spec": {
            "model": {"path": "/models/tiny"},
            "data": {"configMap": "identity"},
            "volumes": [{"name": "models", "claimName": "models", "mountPath": "/models"}],
        }
    }
    body = quickstart(Path("/models/tiny"), name, merged(base, changes))
    body["spec"]["data"]["datasets"] = [{"path": "data/identity.jsonl", "format": "messages"}]
    return body


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


def test_two_pods_meet_through_cluster_dns_and_an_eviction_restarts_the_attempt_whole(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    real_namespace: str,
    real_operator: Operator,
    tiny_model: Path,
) -> None:
    """nodes: 2 with ZeRO-2 (gloo on CPU): two pods of one Indexed Job in their own network
    namespaces; rank 1 reaches rank 0 at `<job>-0.<service>`, resolved by CoreDNS from the
    headless Service, with no hostname rewriting. Mid-run, rank 1 is evicted (the Eviction
    API, as a node drain does): the operator stops the whole attempt and starts it again from
    the newest checkpoint, and with backoffLimit 0 the run still succeeds (no retry spent)."""
    ns, name = real_namespace, "two-pods"
    model_volume(cluster, cluster_api, ns, tiny_model)
    data_config_map(cluster_api, ns)
    changes = {
        "spec": {
            "distributed": {"nodes": 2, "gpusPerNode": 1, "deepspeed": {"zeroStage": 2}},
            "training": {"batchSizePerDevice": 2, "maxSteps": 24, "saveSteps": 4},
            "runPolicy": {"backoffLimit": 0, "terminationGracePeriodSeconds": 60},
        }
    }
    create(cluster_api, ns, tiny_job(name, changes))
    core, batch = client.CoreV1Api(cluster_api), client.BatchV1Api(cluster_api)

    def past_a_checkpoint() -> bool:
        run = ftj(cluster_api, ns, name).get("status", {}).get("currentRun") or {}
        return int(run.get("step") or 0) >= 6

    wait_until("step 6", past_a_checkpoint, 600, interval=0.5, alive=real_operator.alive)
    [first] = batch.list_namespaced_job(ns).items
    rank1 = next(p for p in trainer_pods(cluster_api, ns, name) if index_of(p) == "1")
    eviction = {"metadata": {"name": rank1.metadata.name, "namespace": ns}}
    core.create_namespaced_pod_eviction(rank1.metadata.name, ns, eviction)

    seen = statuses_until(cluster_api, ns, name, "Succeeded", real_operator, 600)
    reasons = [c["reason"] for s in seen for c in s.get("conditions", []) if c["type"] == "Ready"]
    assert "AttemptDisrupted" in reasons, reasons
    status = seen[-1]
    assert status["currentRun"]["attempt"] == 1, status
    [again] = batch.list_namespaced_job(ns).items
    assert again.metadata.name == first.metadata.name and again.metadata.uid != first.metadata.uid
    pods = [p for p in trainer_pods(cluster_api, ns, name)
            if p.metadata.owner_references[0].uid == again.metadata.uid]  # fmt: skip
    assert len(pods) == 2 and len({p.status.pod_ip for p in pods}) == 2
    rank0 = next(p for p in pods if index_of(p) == "0")
    new_rank1 = next(p for p in pods if index_of(p) == "1")
    master = (
        f"{ch.job_name(status['currentRun']['id'], 1)}-0.{ch.base_name(status['currentRun']['id'])}"
    )
    assert master in " ".join(new_rank1.spec.containers[0].command)
    log = kubectl(cluster, "logs", "-n", ns, rank0.metadata.name)
    assert "resuming from" in log and "checkpoint-" in log, log[-3000:]
    assert "Traceback" not in kubectl(cluster, "logs", "-n", ns, new_rank1.metadata.name)


def index_of(pod: Any) -> str:
    return str(pod.metadata.annotations["batch.kubernetes.io/job-completion-index"])


def test_a_memory_limit_too_small_is_reported_as_oom_and_retried(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    real_namespace: str,
    real_operator: Operator,
    tiny_model: Path,
) -> None:
    """runc enforces the limit: the container is OOMKilled (exit 137), the FineTuneJob says so
    in its status and an Event, and the next attempt follows the retry rules (a crash, not bad
    input: retried until backoffLimit)."""
    ns, name = real_namespace, "too-small"
    model_volume(cluster, cluster_api, ns, tiny_model)
    data_config_map(cluster_api, ns)
    changes = {"spec": {"resources": {"memory": "200Mi"}, "runPolicy": {"backoffLimit": 1}}}
    create(cluster_api, ns, tiny_job(name, changes))
    status = wait_phase(cluster_api, ns, name, "Failed", real_operator, 300)["status"]
    assert status["currentRun"]["attempt"] == 2, status
    assert "OOMKilled" in status["message"], status
    events = client.CoreV1Api(cluster_api).list_namespaced_event(ns).items
    assert any("OOMKilled" in (e.message or "") for e in events if e.involved_object.name == name)
    pods = trainer_pods(cluster_api, ns, name)
    reasons = {p.status.container_statuses[0].state.terminated.reason for p in pods}
    assert reasons == {"OOMKilled"}, reasons


def test_a_token_secret_reaches_the_trainer_and_nowhere_else(
    cluster: LocalCluster,
    cluster_api: client.ApiClient,
    real_namespace: str,
    real_operator: Operator,
) -> None:
    """model.tokenSecret for a gated Hub repository: the trainer, in its pod, sends the token
    to the Hub (a recording server on the node's address stands in for huggingface.co, which
    is unreachable here) and the value is in no ConfigMap, status, Event, pod spec, pod log
    or operator log."""
    ns, name, token = real_namespace, "gated", "hf_" + "s3cr3t" * 4
    core = client.CoreV1Api(cluster_api)
    core.create_namespaced_secret(ns, {"metadata": {"name": "hub"}, "stringData": {"token": token}})
    data_config_map(cluster_api, ns)
    with recording_hub() as (endpoint, seen):
        body = quickstart(Path("/unused"), name, {"spec": {"data": {"configMap": "identity"}}})
        body["spec"]["data"]["datasets"] = [{"path": "data/identity.jsonl", "format": "messages"}]
        body["spec"]["model"] = {
            "hfRepo": "kubetune-test/gated-model",
            "tokenSecret": {"name": "hub", "key": "token"},
        }
        body["spec"]["env"] = [{"name": "HF_ENDPOINT", "value": endpoint}]
        create(cluster_api, ns, body)
        status = wait_phase(cluster_api, ns, name, "Failed", real_operator, 300)["status"]
    assert f"Bearer {token}" in seen, seen
    pod = trainer_pods(cluster_api, ns, name)[0]
    everywhere = "\n".join(
        [
            str(core.list_namespaced_config_map(ns).items),
            str(status),
            str(core.list_namespaced_event(ns).items),
            str(pod.spec),
            real_operator.log.read_text(errors="replace"),
            kubectl(cluster, "logs", "-n", ns, pod.metadata.name),
        ]
    )
    assert token not in everywhere


@contextlib.contextmanager
def recording_hub() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on the node's address that records each request's Authorization header
    and answers 401, as the Hub does for a gated repository without access."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _deny(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _deny

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((NODE_IP, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{NODE_IP}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
