"""The whole tier-3 test cluster: control plane + kwok GPU nodes + the pod runner.

``LocalCluster.start()`` brings everything up and waits until every node is Ready and the
``default`` namespace has its service account; ``stop()`` tears it all down and verifies that
no child process and no port is left. SIGTERM/SIGHUP while it runs become SystemExit so the
same tear-down runs (atexit covers a normal interpreter exit; Ctrl-C is KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config

from tests.cluster.controlplane import KWOK_NODE_LABEL, ControlPlane
from tests.cluster.podrunner import GPU_LABELS, PodRunner, node_manifest
from tests.cluster.procs import group_alive, port_is_free, wait_until

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass
class LocalCluster:
    gpu_nodes: int = 4
    gpus_per_node: int = 8
    runner_nodes: int = 4
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kubetune-k8s-")))
    keep_work_dir: bool = False

    def __post_init__(self) -> None:
        self.control_plane = ControlPlane(work_dir=self.work_dir, keep_work_dir=self.keep_work_dir)
        self.runner: PodRunner | None = None
        self.api_client: client.ApiClient | None = None
        self._previous_handlers: dict[int, object] = {}

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api())

    def api(self) -> client.ApiClient:
        assert self.api_client is not None, "cluster not started"
        return self.api_client

    def new_api_client(self) -> client.ApiClient:
        """A fresh client on the admin kubeconfig (one per thread or test, if wanted)."""
        return config.new_client_from_config(str(self.kubeconfig))

    # -- start -------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        self._install_signal_handlers()
        started = time.monotonic()
        try:
            self.control_plane.start()
            self.api_client = self.new_api_client()
            self._register_kwok_nodes()
            self.runner = PodRunner(
                self.new_api_client(),
                root=self.work_dir / "runner",
                nodes=self.runner_nodes,
                gpus_per_node=self.gpus_per_node,
                api_server=("127.0.0.1", self.control_plane.ports["apiserver"]),
            ).start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logging.getLogger("kubetune.cluster").info(
            "test cluster up in %.1fs: %s", time.monotonic() - started, self.kubeconfig
        )
        return self

    def _register_kwok_nodes(self) -> None:
        core = self.core
        labels = {KWOK_NODE_LABEL: "true", "type": "kwok", **GPU_LABELS}
        labels["nvidia.com/gpu.count"] = str(self.gpus_per_node)
        for i in range(self.gpu_nodes):
            core.create_node(
                node_manifest(f"kwok-gpu-{i}", labels, self.gpus_per_node, [GPU_TAINT])
            )
        # One untainted CPU node, so ordinary pods (the operator's Deployment in chart tests)
        # have somewhere to run; kwok plays them Running.
        cpu_labels = {KWOK_NODE_LABEL: "true", "type": "kwok"}
        core.create_node(node_manifest("kwok-cpu-0", cpu_labels, 0, []))

    def _wait_ready(self) -> None:
        core = self.core

        def all_nodes_ready() -> bool:
            nodes = core.list_node().items
            ready = [
                n
                for n in nodes
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
                and not any(t.key.startswith("node.kubernetes.io/") for t in n.spec.taints or [])
            ]
            return len(ready) == self.gpu_nodes + 1 + self.runner_nodes

        wait_until(
            "all nodes Ready and untainted",
            all_nodes_ready,
            120,
            interval=0.5,
            alive=self.control_plane.dead_component,
        )
        wait_until(
            "the default service account",
            lambda: core.read_namespaced_service_account("default", "default"),
            60,
            alive=self.control_plane.dead_component,
        )

    # -- helpers for tests ---------------------------------------------------------------------

    @contextlib.contextmanager
    def namespace(self, prefix: str = "t", labels: dict[str, str] | None = None) -> Iterator[str]:
        """A fresh namespace with its default service account; deleted afterwards."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        core = self.core
        core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        wait_until(
            f"service account default in {name}",
            lambda: core.read_namespaced_service_account("default", name),
            60,
        )
        try:
            yield name
        finally:
            with contextlib.suppress(Exception):
                core.delete_namespace(name)

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop runner, then control plane; raise if a process or a port is left behind."""
        pids: list[int] = []
        if self.runner is not None:
            pids = self.runner.running_pids()
            self.runner.stop()
            self.runner = None
        groups = [p.pid for p in self.control_plane.procs if p.pid]
        try:
            self.control_plane.stop()
        finally:
            self._restore_signal_handlers()
        left = [pid for pid in pids + groups if group_alive(pid)]
        if left:
            raise RuntimeError(f"process groups still alive after tear-down: {left}")

    def ports_free(self) -> bool:
        return all(port_is_free(p) for p in self.control_plane.ports.values())

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, _exit_on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()


def _exit_on_signal(signum: int, _frame: types.FrameType | None) -> None:
    # SystemExit unwinds through the fixtures' finalizers / the CLI's finally blocks.
    sys.exit(128 + signum)
