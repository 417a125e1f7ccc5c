"""The pod runner: a TEST STAND-IN for kubelet + container runtime, not part of the product.

It registers its own nodes (``kubetune-runner-N``, labelled ``kubetune.io/pod-runner=true``,
tainted ``kubetune.io/pod-runner=true:NoSchedule``, with the same GPU capacity and labels as the
kwok GPU nodes), keeps them Ready through node Leases, and runs every pod the real scheduler binds
to them as local processes (podspec.py), reporting status through pods/status as a kubelet does.
A MutatingAdmissionPolicy (real apiserver machinery) steers pods labelled
``kubetune.io/run-locally=true`` to these nodes; kwok manages only nodes with its own label, so
the two never touch each other's pods. It also provisions PVCs of the ``kubetune-local``
StorageClass as hostPath PVs under its root directory, which the PV controller then binds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.cluster import podspec
from tests.cluster.podexec import PodWorker
from tests.cluster.podspec import Obj

log = logging.getLogger("kubetune.podrunner")

RUNNER_LABEL = "kubetune.io/pod-runner"
RUN_LOCALLY_LABEL = "kubetune.io/run-locally"
STORAGE_CLASS = "kubetune-local"
PROVISIONER = "kubetune.io/test-local"
# The generated client defaults PATCH to JSON Patch; these bodies are merge patches.
MERGE_PATCH = "application/merge-patch+json"
GPU_LABELS = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.memory": "81559",
    "nvidia.com/gpu.count": "8",
}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_manifest(name: str, labels: dict[str, str], gpus: int, taints: list[Obj]) -> Obj:
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def steering_policy(
    label: str = RUN_LOCALLY_LABEL,
    node_label: str = RUNNER_LABEL,
    selector: str = "objectSelector",
    name: str = "kubetune-test-run-locally",
) -> tuple[Obj, Obj]:
    """MutatingAdmissionPolicy + binding: pods labelled ``label`` (or, with selector
    "namespaceSelector", pods in namespaces so labelled) get the nodeSelector ``node_label=true``
    and a toleration for the taint of the same key."""
    toleration = f'Object.spec.tolerations{{key: "{node_label}", operator: "Exists"}}'
    selector_key = node_label.replace("/", "~1")
    expression = f"""
      (has(object.spec.tolerations)
        ? [JSONPatch{{op: "add", path: "/spec/tolerations/-", value: {toleration}}}]
        : [JSONPatch{{op: "add", path: "/spec/tolerations", value: [{toleration}]}}])
      + (has(object.spec.nodeSelector)
        ? [JSONPatch{{op: "add", path: "/spec/nodeSelector/{selector_key}", value: "true"}}]
        : [JSONPatch{{op: "add", path: "/spec/nodeSelector", value: {{"{node_label}": "true"}}}}])
    """
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ],
                selector: {"matchLabels": {label: "true"}},
            },
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": expression}}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name},
    }
    return policy, binding


@dataclass
class PodRunner:
    """Runs pods bound to its nodes; ``start()``/``stop()``; thread-based, one API client."""

    api_client: client.ApiClient
    root: Path
    nodes: int = 4
    gpus_per_node: int = 8
    node_prefix: str = "kubetune-runner"
    python: str = field(default_factory=lambda: os.environ.get("KUBETUNE_POD_PYTHON", ""))
    # image (with or without tag) -> argv, for containers that rely on the image's ENTRYPOINT
    entrypoints: dict[str, list[str]] = field(default_factory=dict)
    api_server: tuple[str, int] | None = None
    kill_grace_cap: float = 30.0

    def __post_init__(self) -> None:
        import sys

        self.python = self.python or sys.executable
        self.core = client.CoreV1Api(self.api_client)
        self.node_names = [f"{self.node_prefix}-{i}" for i in range(self.nodes)]
        self.workers: dict[str, PodWorker] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PodRunner:
        self.root.mkdir(parents=True, exist_ok=True)
        self._install_cluster_objects()
        self._register_nodes()
        for target in (self._heartbeat_loop, self._pod_loop, self._claim_loop):
            t = threading.Thread(target=target, name=f"podrunner{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Kills every pod process (SIGTERM, SIGKILL after ``grace``) and stops the loops."""
        self._stop.set()
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.terminate(grace, confirm_deletion=False)
        for w in workers:
            w.join(grace + 10)
        for t in self._threads:
            t.join(timeout=1)

    def running_pids(self) -> list[int]:
        with self._lock:
            return [pid for w in self.workers.values() for pid in w.pids()]

    def pod_dir(self, namespace: str, name: str) -> Path | None:
        """Local root of a pod's files (logs/<container>.log, volumes/, termination/)."""
        with self._lock:
            for w in self.workers.values():
                if (w.namespace, w.name) == (namespace, name):
                    return w.pod_root
        return None

    # -- cluster objects ---------------------------------------------------------------------

    def _install_cluster_objects(self) -> None:
        storage = client.StorageV1Api(self.api_client)
        sc = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "Immediate",
        }
        create_ok_if_exists(lambda: storage.create_storage_class(sc))
        adm = client.AdmissionregistrationV1Api(self.api_client)
        policy, binding = steering_policy()
        create_ok_if_exists(lambda: adm.create_mutating_admission_policy(policy))
        create_ok_if_exists(lambda: adm.create_mutating_admission_policy_binding(binding))

    def _register_nodes(self) -> None:
        taint = {"key": RUNNER_LABEL, "value": "true", "effect": "NoSchedule"}
        labels = {
            RUNNER_LABEL: "true",
            **GPU_LABELS,
            "nvidia.com/gpu.count": str(self.gpus_per_node),
        }
        for name in self.node_names:
            node = node_manifest(name, labels, self.gpus_per_node, [taint])
            create_ok_if_exists(lambda node=node: self.core.create_node(node))
            self._report_node_ready(name)

    def _report_node_ready(self, name: str) -> None:
        t = now()
        conditions = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{ok}", "message": ok,
             "lastHeartbeatTime": t, "lastTransitionTime": t}
            for kind, ok in (("MemoryPressure", "SufficientMemory"),
                             ("DiskPressure", "NoDiskPressure"), ("PIDPressure", "SufficientPID"))
        ]  # fmt: skip
        conditions.append(
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "kubetune pod runner (test stand-in for a kubelet) is ready",
             "lastHeartbeatTime": t, "lastTransitionTime": t}
        )  # fmt: skip
        status = {
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": podspec.POD_IP},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                **dict.fromkeys(("bootID", "kernelVersion", "kubeProxyVersion"), ""),
                **dict.fromkeys(("machineID", "osImage", "systemUUID"), ""),
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "kubetune-podrunner",
                "containerRuntimeVersion": "kubetune-podrunner://local-process",
            },
        }
        self.core.patch_node_status(name, {"status": status}, _content_type=MERGE_PATCH)

    def _heartbeat_loop(self) -> None:
        """Renews each node's Lease every 10 s (what the node lifecycle controller watches)."""
        coord = client.CoordinationV1Api(self.api_client)
        last_status = time.monotonic()
        while not self._stop.wait(10):
            try:
                for name in self.node_names:
                    self._renew_lease(coord, name)
                if time.monotonic() - last_status > 60:
                    for name in self.node_names:
                        self._report_node_ready(name)
                    last_status = time.monotonic()
            except Exception:
                log.debug("heartbeat failed", exc_info=True)

    def _renew_lease(self, coord: client.CoordinationV1Api, name: str) -> None:
        t = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": t}
        try:
            coord.patch_namespaced_lease(
                name, "kube-node-lease", {"spec": spec}, _content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            lease = {"metadata": {"name": name, "namespace": "kube-node-lease"}, "spec": spec}
            create_ok_if_exists(lambda: coord.create_namespaced_lease("kube-node-lease", lease))

    # -- pods --------------------------------------------------------------------------------

    def _pod_loop(self) -> None:
        for event_type, pod in self._watch(self.core.list_pod_for_all_namespaces):
            if pod.get("spec", {}).get("nodeName") in self.node_names:
                try:
                    self._on_pod(event_type, pod)
                except Exception:
                    log.exception("handling pod %s", pod["metadata"].get("name"))

    def _on_pod(self, event_type: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self.workers.get(uid)
            if worker is None and event_type != "DELETED":
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    worker = None  # finished before this runner started; nothing to run
                elif not pod["metadata"].get("deletionTimestamp"):
                    worker = PodWorker(self, pod)
                    self.workers[uid] = worker
                    worker.start()
        deleting = pod["metadata"].get("deletionTimestamp")
        if event_type == "DELETED":
            if worker is not None:
                worker.terminate(0, confirm_deletion=False)
                self.forget(uid)
        elif deleting:
            grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
            if worker is not None:
                worker.terminate(min(grace, self.kill_grace_cap), confirm_deletion=True)
            else:
                self.confirm_deletion(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)

    def confirm_deletion(self, namespace: str, name: str, uid: str) -> None:
        """What a kubelet does once a pod's containers are gone: delete with grace 0."""
        body = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
        )
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(name, namespace, body=body, grace_period_seconds=0)

    def forget(self, uid: str) -> None:
        with self._lock:
            self.workers.pop(uid, None)

    def report_status(self, namespace: str, name: str, status: Obj) -> None:
        """Writes pod status through the pods/status subresource (merge patch: lists whole)."""
        self.core.patch_namespaced_pod_status(
            name, namespace, {"status": status}, _content_type=MERGE_PATCH
        )

    # -- object source for podspec -----------------------------------------------------------

    def configmap(self, namespace: str, name: str) -> Obj | None:
        return self._get(
            lambda: self.core.read_namespaced_config_map(name, namespace, _preload_content=False)
        )

    def secret(self, namespace: str, name: str) -> Obj | None:
        return self._get(
            lambda: self.core.read_namespaced_secret(name, namespace, _preload_content=False)
        )

    def service_account_token(self, namespace: str, sa: str, audience: str | None) -> str:
        spec = {"audiences": [audience]} if audience else {}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        result = self.core.create_namespaced_service_account_token(sa, namespace, body)
        return str(result.status.token)

    def headless_services(self, namespace: str) -> list[str]:
        services = self.core.list_namespaced_service(namespace).items
        return [s.metadata.name for s in services if s.spec.cluster_ip in (None, "None")]

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """A PVC's directory: the hostPath of the PV it is bound to (provisioned below)."""
        pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
        if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
            raise podspec.ConfigError(f'persistentvolumeclaim "{claim}" is not bound')
        pv = self.core.read_persistent_volume(pvc.spec.volume_name)
        if pv.spec.host_path is None:
            raise podspec.ConfigError(f"volume {pv.metadata.name} is not a local (hostPath) volume")
        path = Path(pv.spec.host_path.path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _get(call: Callable[[], Any]) -> Obj | None:
        import json

        try:
            resp = call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        result: Obj = json.loads(resp.data)
        return result

    # -- PVC provisioning ---------------------------------------------------------------------

    def _claim_loop(self) -> None:
        for event_type, pvc in self._watch(
            self.core.list_persistent_volume_claim_for_all_namespaces
        ):
            spec, meta = pvc.get("spec", {}), pvc["metadata"]
            if event_type == "DELETED" or spec.get("storageClassName") != STORAGE_CLASS:
                continue
            if spec.get("volumeName") or pvc.get("status", {}).get("phase") == "Bound":
                continue
            try:
                self._provision(meta, spec)
            except Exception:
                log.exception("provisioning %s/%s", meta["namespace"], meta["name"])

    def _provision(self, meta: Obj, spec: Obj) -> None:
        path = self.root / "volumes" / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        path.mkdir(parents=True, exist_ok=True)
        # World-writable, as kind's local-path-provisioner makes its volumes: a pod on the real
        # node runs as its image's non-root user and has no fsGroup unless the operator sets one.
        path.chmod(0o777)
        size = (spec.get("resources", {}).get("requests") or {}).get("storage", "1Gi")
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": STORAGE_CLASS,
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        create_ok_if_exists(lambda: self.core.create_persistent_volume(pv))

    # -- watching ----------------------------------------------------------------------------

    def _watch(self, list_call: Callable[..., Any]) -> Iterator[tuple[str, Obj]]:
        """List then watch forever (relisting after errors/expiry) until ``stop()``."""
        while not self._stop.is_set():
            try:
                import json

                listed = json.loads(list_call(_preload_content=False).data)
                for item in listed["items"]:
                    yield "ADDED", item
                version = listed["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    for event in watch.Watch().stream(
                        list_call, resource_version=version, timeout_seconds=5,
                        allow_watch_bookmarks=True,
                    ):  # fmt: skip
                        obj = event["raw_object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            yield event["type"], obj
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.debug("watch restarts after %s", exc)
                self._stop.wait(0.5)


def create_ok_if_exists(create: Callable[[], Any]) -> None:
    try:
        create()
    except ApiException as exc:
        if exc.status != 409:
            raise
