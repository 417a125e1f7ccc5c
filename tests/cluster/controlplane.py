"""A real Kubernetes control plane on loopback for tier-3 tests.

Starts etcd, kube-apiserver (self-signed PKI, service-account key, RBAC), kube-controller-manager
(Job controller, garbage collector, PV binder, ...), kube-scheduler and kwok, all built from
upstream Go modules by ``tests/cluster/go/build.sh``. kwok keeps fake GPU nodes Ready and plays
their pods; pods that must really run go to the pod runner's nodes (see podrunner.py and
README.md). Start-up waits on readiness endpoints only; ``stop()`` kills every process group
and checks that every port is free again.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster import pki
from tests.cluster.procs import LOOPBACK, ManagedProcess, free_port, port_is_free, wait_until

GO_DIR = Path(__file__).resolve().parent / "go"
BUILD_SCRIPT = GO_DIR / "build.sh"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
# Cluster addresses live only on this machine; none is in a private range (10/8, 172.16/12,
# 192.168/16), so no test traffic can look as if it targets a real network. Shared CGNAT space:
# Services 100.64.0.0/16, real nodes' IPs 100.72.0.0/16, their pods 100.96.0.0/16.
SERVICE_CIDR = "100.64.0.0/16"
NODE_IP = "100.72.0.1"
"""The real node's address (an extra /32 on ``lo`` while it runs); the apiserver advertises
it, so the `kubernetes` Service leads pods to the apiserver through kube-proxy."""
KWOK_NODE_LABEL = "kubetune.io/kwok-node"  # kwok manages exactly the nodes with this label


def read_versions() -> dict[str, str]:
    """The pinned versions from tests/cluster/go/versions.env (the single place they live)."""
    versions: dict[str, str] = {}
    for line in (GO_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key] = value
    return versions


def bin_dir() -> Path:
    root = os.environ.get("KUBETUNE_BIN_CACHE") or str(Path.home() / ".cache/kubetune/bin")
    return Path(root) / read_versions()["K8S_VERSION"]


def ensure_binaries() -> Path:
    """Build the binaries when any is missing (idempotent, minutes only the first time)."""
    directory = bin_dir()
    wanted = [*BINARIES, "kwok-stages.yaml"]
    if not all((directory / name).exists() for name in wanted):
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)
    return directory


@dataclass
class ControlPlane:
    """One cluster; ``start()`` then ``stop()`` (also registered with atexit)."""

    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kubetune-k8s-")))
    start_timeout: float = 180.0
    keep_work_dir: bool = False
    bins: Path = field(default_factory=bin_dir)
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[ManagedProcess] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (group system:masters) for the tests and the harness."""
        return self.work_dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.ports['apiserver']}"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    def binary(self, name: str) -> str:
        return str(self.bins / name)

    # -- start -------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        ensure_binaries()
        atexit.register(self.stop)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._make_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._start_scheduler()
            self._start_kwok()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_pki(self) -> None:
        d = self.work_dir / "pki"
        d.mkdir(exist_ok=True)
        self.ca = pki.make_ca(d)
        sans = [f"IP:{LOOPBACK}", f"IP:{NODE_IP}", "DNS:localhost", "IP:100.64.0.1"]
        sans += [f"DNS:kubernetes{s}" for s in ("", ".default", ".default.svc")]
        self.serving = pki.issue(self.ca, d, "apiserver", "/CN=kube-apiserver", sans)
        self.sa = pki.make_sa_key(d)
        self._clients = {
            "admin": pki.issue(self.ca, d, "admin", pki.ADMIN, None),
            "controller-manager": pki.issue(self.ca, d, "cm", pki.CONTROLLER_MANAGER, None),
            "scheduler": pki.issue(self.ca, d, "scheduler", pki.SCHEDULER, None),
        }
        # The apiserver's identity towards kubelets (logs, exec, port-forward).
        self.kubelet_client = pki.issue(self.ca, d, "kubelet-client", pki.KUBELET_CLIENT, None)

    def _launch(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.log_dir / f"{name}.log")
        with self._lock:
            self.procs.append(proc)
        proc.start()
        return proc

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.ports.update(etcd=client, etcd_peer=peer)
        url, peer_url = f"http://{LOOPBACK}:{client}", f"http://{LOOPBACK}:{peer}"
        proc = self._launch(
            "etcd",
            [
                self.binary("etcd"),
                "--name=kubetune",
                f"--data-dir={self.work_dir / 'etcd'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetune={peer_url}",
                # A test cluster's data is disposable; fsync on every write only costs time.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        wait_until(
            "etcd /health",
            lambda: b'"health":"true"' in _http_get(f"{url}/health"),
            self.start_timeout,
            alive=proc.exit_reason,
        )

    def _start_apiserver(self) -> None:
        port = self.ports["apiserver"] = free_port()
        proc = self._launch(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://{LOOPBACK}:{self.ports['etcd']}",
                # All addresses, as kubeadm's default: the test clients use loopback, pods the
                # node's address (the `kubernetes` Service's endpoint). Nothing is anonymous
                # beyond what any apiserver serves (/healthz, /version).
                "--bind-address=0.0.0.0",
                f"--advertise-address={NODE_IP}",
                f"--secure-port={port}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.cert}",
                f"--service-account-key-file={self.sa.cert}",
                f"--service-account-signing-key-file={self.sa.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # As on a kubeadm cluster: real kubelets are confined to their own node's
                # objects (Node authorizer + NodeRestriction); everything else is RBAC.
                "--authorization-mode=Node,RBAC",
                # As on hardened clusters: setting blockOwnerDeletion needs update on the
                # owner's finalizers (the operator's RBAC is tested against it).
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement,NodeRestriction",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                # Real nodes register a non-loopback InternalIP; no hostname resolves here.
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        ctx = self.ssl_context()
        wait_until(
            "kube-apiserver /readyz",
            lambda: _http_get(f"{self.server}/readyz", ctx) == b"ok",
            self.start_timeout,
            alive=proc.exit_reason,
        )
        for user in self._clients:
            pki.write_kubeconfig(
                self.work_dir / f"{user}.kubeconfig",
                self.server,
                self.ca.cert,
                self._clients[user],
                user,
            )

    def _start_controller_manager(self) -> None:
        port = self.ports["controller-manager"] = free_port()
        kubeconfig = self.work_dir / "controller-manager.kubeconfig"
        proc = self._launch(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={port}",
                f"--cert-dir={self.work_dir / 'pki' / 'cm-serving'}",
                f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.ca.cert}",
                f"--cluster-signing-cert-file={self.ca.cert}",
                f"--cluster-signing-key-file={self.ca.key}",
                # Each controller acts as its own service account, as in a real cluster.
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        wait_until(
            "kube-controller-manager /healthz",
            lambda: _http_get(f"https://{LOOPBACK}:{port}/healthz", _insecure()) == b"ok",
            self.start_timeout,
            alive=proc.exit_reason,
        )

    def _start_scheduler(self) -> None:
        port = self.ports["scheduler"] = free_port()
        kubeconfig = self.work_dir / "scheduler.kubeconfig"
        proc = self._launch(
            "kube-scheduler",
            [
                self.binary("kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={port}",
                f"--cert-dir={self.work_dir / 'pki' / 'scheduler-serving'}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        wait_until(
            "kube-scheduler /readyz",
            lambda: _http_get(f"https://{LOOPBACK}:{port}/readyz", _insecure()) == b"ok",
            self.start_timeout,
            alive=proc.exit_reason,
        )

    def _start_kwok(self) -> None:
        port = self.ports["kwok"] = free_port()
        proc = self._launch(
            "kwok",
            [
                self.binary("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={self.bins / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL}=true",
                # Fake pod IPs from the loopback range: nothing ever connects to them, and no
                # address outside loopback appears in the cluster's state.
                "--cidr=127.10.0.1/16",
                f"--node-ip={LOOPBACK}",
                "--node-lease-duration-seconds=40",
                f"--server-address={LOOPBACK}:{port}",
            ],
        )
        wait_until(
            "kwok /healthz",
            lambda: _http_get(f"http://{LOOPBACK}:{port}/healthz") == b"ok",
            self.start_timeout,
            alive=proc.exit_reason,
        )

    # -- use ---------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the apiserver and presents the admin client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        admin = self._clients["admin"]
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        return ctx

    def healthy(self) -> bool:
        with contextlib.suppress(Exception):
            return _http_get(f"{self.server}/readyz", self.ssl_context()) == b"ok"
        return False

    def dead_component(self) -> str | None:
        """The exit text of the first component that died, if any."""
        for proc in self.procs:
            reason = proc.exit_reason()
            if reason:
                return reason
        return None

    def restart(self, name: str, kill: bool = False) -> float:
        """Stop one component (SIGTERM, or SIGKILL with `kill`, as a crash) and start it again
        with the same arguments, ports and data; returns the seconds until it served again."""
        [proc] = [p for p in self.procs if p.name == name]
        started = time.monotonic()
        if kill and proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.stop()
        proc.start()
        healthy = {
            "etcd": lambda: (
                b'"health":"true"' in _http_get(f"http://{LOOPBACK}:{self.ports['etcd']}/health")
            ),
            "kube-apiserver": lambda: (
                _http_get(f"{self.server}/readyz", self.ssl_context()) == b"ok"
            ),
        }[name]
        wait_until(f"{name} serving again", healthy, self.start_timeout, alive=proc.exit_reason)
        return time.monotonic() - started

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        out = subprocess.run(
            [self.binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop components in reverse order; idempotent. Raises if a port stays held."""
        with self._lock:
            procs, self.procs = self.procs, []
        for proc in reversed(procs):
            proc.stop()
        atexit.unregister(self.stop)
        held = [f"{name}:{port}" for name, port in self.ports.items() if not port_is_free(port)]
        if not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if held:
            raise RuntimeError(f"ports still held after stopping the control plane: {held}")


def _http_get(url: str, ctx: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
        body: bytes = resp.read()
        return body.strip()


def _insecure() -> ssl.SSLContext:
    """Components' own serving certs are self-signed at start-up; only /healthz is read."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
