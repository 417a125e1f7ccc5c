"""Fixtures for operator tests: the CRD installed in the test control plane, and the
operator (`kubetune operator`) running as a real process against it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.crd import install_crd
from tests.cluster.procs import free_port
from tests.controller.rbac import service_account_kubeconfig
from tests.tiny import tiny_causal_lm

REPO = Path(__file__).resolve().parents[2]
KUBETUNE = str(Path(sys.executable).parent / "kubetune")
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


@pytest.fixture(scope="session")
def ftj_crd_installed(cluster_api: client.ApiClient) -> str:
    """crds/finetunejob.yaml applied and served."""
    return install_crd(cluster_api, REPO / "crds" / "finetunejob.yaml")


@dataclass
class Operator:
    """`kubetune operator` watching one namespace, as a child process (logs in `log`)."""

    kubeconfig: Path
    namespace: str
    log: Path
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=lambda: [KUBETUNE])
    """How to start `kubetune` (a test may start a patched one, e.g. a simulated upgrade)."""
    all_namespaces: bool = False
    """Watch the whole cluster (`--all-namespaces`) instead of `namespace`."""
    run_locally: bool = True
    """Label the training pods for the pod runner (False: kwok plays them, Succeeded at once)."""
    forgiven: list[str] = field(default_factory=list)
    """Refusals a test expects (see `forgive`)."""

    def start(self) -> Operator:
        argv = [
            *self.command, "operator",
            *(["--all-namespaces"] if self.all_namespaces else ["--namespace", self.namespace]),
            "--metrics-port", str(self.metrics_port), "--health-port", str(free_port()),
            *(["--pod-label", "kubetune.io/run-locally=true"] if self.run_locally else []),
            # All pods share loopback here, and other tests run beside us: no fixed ports.
            "--trainer-metrics-port", str(free_port()), "--rendezvous-port", str(free_port()),
            "--reconcile-interval", "2", "--status-interval", "1", "--verbose", *self.extra,
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a node loss would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"operator exited {self.process.returncode}:\n{self.tail()}"
        return None

    def forgive(self, text: str) -> None:
        """Refusals naming `text` are expected (an apiserver just restarted)."""
        self.forgiven.append(text)

    def assert_permitted(self) -> None:
        """Nothing the operator (or kopf) tried was refused by RBAC (a 403 of a quota is not
        RBAC's: it names no user)."""
        refused = [
            line for line in self.log.read_text(errors="replace").splitlines()
            if ("Not enough permissions" in line or "cannot post the Event" in line
                or ("system:serviceaccount:" in line and "cannot" in line))
            and not any(text in line for text in self.forgiven)
        ]  # fmt: skip
        assert not refused, "\n".join(refused[:10])

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def operator_kubeconfig(
    cluster_api: client.ApiClient, cluster_kubeconfig: Path, cluster_namespace: str, tmp_path: Path
) -> Path:
    """Logs in as a ServiceAccount bound to exactly the operator's RBAC rules (a Role in the
    test's namespace): every operator test runs under least privilege."""
    return service_account_kubeconfig(
        cluster_api, cluster_kubeconfig, [cluster_namespace], tmp_path / "operator.kubeconfig"
    )


@pytest.fixture
def operator(
    operator_kubeconfig: Path, cluster_namespace: str, ftj_crd_installed: str, tmp_path: Path
) -> Iterator[Operator]:
    running = Operator(operator_kubeconfig, cluster_namespace, tmp_path / "operator.log").start()
    yield running
    running.stop()
    running.assert_permitted()


@pytest.fixture
def kwok_operator(
    operator_kubeconfig: Path, cluster_namespace: str, ftj_crd_installed: str, tmp_path: Path
) -> Iterator[Operator]:
    """The operator with its training pods left to kwok's GPU nodes: Running and, being owned
    by a Job, Succeeded at once, so a run takes seconds (for what does not need a trainer)."""
    running = Operator(
        operator_kubeconfig, cluster_namespace, tmp_path / "operator.log", run_locally=False
    ).start()
    yield running
    running.stop()
    running.assert_permitted()


@contextlib.contextmanager
def kwok_operator_in_own_namespace(
    cluster: Any, api: client.ApiClient, admin_kubeconfig: Path, tmp_path: Path, prefix: str
) -> Iterator[tuple[str, Operator]]:
    """A fresh namespace and a kwok-played operator watching it under its least-privilege
    ServiceAccount, for tests that change the namespace itself (labels, deletion)."""
    with cluster.namespace(prefix) as ns:
        kubeconfig = service_account_kubeconfig(
            api, admin_kubeconfig, [ns], tmp_path / "sa.kubeconfig"
        )
        running = Operator(kubeconfig, ns, tmp_path / "op.log", run_locally=False).start()
        try:
            yield ns, running
        finally:
            running.stop()


def ftj(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return found


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")
