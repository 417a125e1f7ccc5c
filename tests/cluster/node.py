"""A real node for the test cluster: kubelet, containerd, runc and the CNI bridge, plus CoreDNS.

What a pod does is proven here, not on the pod runner: the kubelet (built from the same
Kubernetes module as the apiserver) registers with the test control plane, the real scheduler
binds pods to it, and containerd runs them from the images that ``make images`` built, imported
from their OCI archives (no registry is reachable). Pods get addresses from the CNI bridge
plugin and resolve cluster names through CoreDNS; the apiserver reaches the kubelet for logs
and exec. Tests steer pods here by labelling their namespace ``kubetune.io/real-node=true``
(a MutatingAdmissionPolicy adds the node selector and toleration), so the pods themselves are
exactly what a user or the operator creates.

Host requirements (Debian packages, installed by ``.ci/run``): containerd, runc,
containernetworking-plugins, iproute2; root. What this host needed, found by probing:
``failCgroupV1: false`` (cgroup v1, hybrid), ``restrict_oom_score_adj`` in containerd's CRI
config (no CAP_SYS_RESOURCE, so a sandbox's negative oom_score_adj would kill runc's init), a
node IP that is not loopback (an extra /32 on ``lo``), and a self-built sandbox image.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.cluster import kubeproxy, pki
from tests.cluster.controlplane import NODE_IP, ControlPlane, bin_dir, read_versions
from tests.cluster.hoststate import (
    KUBELET_SYSCTLS,
    TABLES,
    kube_chains,
    read_sysctl,
    remove_cgroups,
    remove_kube_iptables,
    unmount_under,
    write_sysctl,
)
from tests.cluster.pause_image import PAUSE_IMAGE, write_pause_archive
from tests.cluster.podrunner import create_ok_if_exists, steering_policy
from tests.cluster.procs import LOOPBACK, ManagedProcess, free_port, wait_until

log = logging.getLogger("kubetune.node")

REAL_NODE_LABEL = "kubetune.io/real-node"
CLUSTER_DOMAIN = "cluster.local"
POD_CIDR = "100.96.0.0/24"
BRIDGE = "kubetune0"
CNI_BIN_DIR = Path("/usr/lib/cni")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip")
IMAGE_CACHE = Path.home() / ".cache" / "kubetune" / "containerd"
CONTAINERD_NAMESPACE = "k8s.io"
HOST_LOCK = Path("/run/kubetune-real-node.lock")


class NodeUnavailable(RuntimeError):
    """The host lacks what a real node needs; the message says what to install."""


def missing_host_parts() -> list[str]:
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if not missing:
        missing += _unpinned_runtimes()
    missing += [f"{CNI_BIN_DIR}/{p}" for p in ("bridge", "host-local", "loopback")
                if not (CNI_BIN_DIR / p).exists()]  # fmt: skip
    missing += [f"{bin_dir()}/{b}" for b in ("kubelet", "coredns") if not (bin_dir() / b).exists()]
    if os.geteuid() != 0:
        missing.append("root (a kubelet and containerd need it)")
    return missing


def _unpinned_runtimes() -> list[str]:
    """containerd and runc at the versions pinned in go/versions.env (Debian's packages)."""
    pinned = read_versions()
    wrong = []
    for tool, key in (("containerd", "CONTAINERD_VERSION"), ("runc", "RUNC_VERSION")):
        said = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"(\d+\.\d+\.\d+)", said.split("\n")[0].split(" ", 2)[-1])
        if found is None or found.group(1) != pinned[key]:
            version = found.group(1) if found else "unknown"
            wrong.append(f"{tool} {pinned[key]} (found {version}; see go/versions.env)")
    return wrong


@dataclass
class RealNode:
    control_plane: ControlPlane
    work_dir: Path
    name: str = "real-0"
    image_archives: list[Path] = field(default_factory=list)
    start_timeout: float = 120.0
    fake_gpus: int = 2
    """`nvidia.com/gpu` the node advertises with no GPU behind it (this machine has none), so
    that manifests written for GPU clusters schedule here unchanged; the trainer finds no CUDA
    and trains on the CPU. The only stand-in on this node."""

    def __post_init__(self) -> None:
        self.procs: list[ManagedProcess] = []
        self.ports: dict[str, int] = {}
        self._added_ip = False
        self._sysctls: dict[str, str | None] = {}
        self._lock: IO[str] | None = None
        self._api_client: client.ApiClient | None = None
        # Sockets need short paths (108 bytes); the work dir may be deep. Named after the work
        # dir, so a RealNode made for the same work dir (a check after `down`) finds it.
        digest = hashlib.sha256(str(self.work_dir.resolve()).encode()).hexdigest()[:10]
        self.run_dir = Path(f"/run/kubetune-node-{digest}")
        self.sock = self.run_dir / "containerd.sock"

    # -- start -------------------------------------------------------------------------------

    def start(self) -> RealNode:
        missing = missing_host_parts()
        if missing:
            raise NodeUnavailable("a real node needs: " + ", ".join(missing))
        self._lock_host()
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._add_node_ip()
            self._write_cni_config()
            self._start_containerd()
            self._import_images()
            self._grant_apiserver_kubelet_access()
            self._start_coredns()
            self._start_kubelet()
            self._start_kube_proxy()
            self._advertise_gpus()
            self._steer_labelled_namespaces()
        except BaseException:
            self.stop()
            raise
        log.info("real node %s up in %.1fs", self.name, time.monotonic() - started)
        return self

    def _add_node_ip(self) -> None:
        shown = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        # The address is this harness's own (a crashed run may have left it): removed at stop.
        if f" {NODE_IP}/" not in shown:
            subprocess.run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"], check=True)
        self._added_ip = True
        # The kubelet tunes these at start; they are given back at stop.
        self._sysctls = {key: read_sysctl(key) for key in KUBELET_SYSCTLS}

    def _write_cni_config(self) -> None:
        conf_dir = self.work_dir / "cni"
        conf_dir.mkdir(exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "kubetune",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    # Pods talk to each other and to this host; nothing leaves the machine.
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        # Through the bridge's gateway (this host): the node's IP, where
                        # CoreDNS listens, is not on the pods' subnet.
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.work_dir / "cni-ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        (conf_dir / "10-kubetune.conflist").write_text(json.dumps(conflist, indent=2))

    def _start_containerd(self) -> None:
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
# Image content and snapshots persist between runs, so imported images stay imported.
root = "{IMAGE_CACHE}"
state = "{self.run_dir / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  level = "warn"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj for the sandbox kills runc's init.
  restrict_oom_score_adj = true
  enable_selinux = false
  # Pods' network namespaces under this node's state directory, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.work_dir / "cni"}"
"""
        path = self.work_dir / "containerd.toml"
        path.write_text(config)
        proc = self._launch("containerd", ["containerd", f"--config={path}"])
        wait_until(
            "containerd socket",
            lambda: self._ctr("version", check=False).returncode == 0,
            self.start_timeout,
            alive=proc.exit_reason,
        )

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", f"--address={self.sock}", f"--namespace={CONTAINERD_NAMESPACE}", *args],
            capture_output=True,
            text=True,
            check=check,
        )

    def _import_images(self) -> None:
        """Import each archive unless containerd already holds that image ID (warm runs)."""
        present = self._ctr("images", "list").stdout
        pause = write_pause_archive(self.work_dir / "pause.oci.tar")
        for archive in [pause, *self.image_archives]:
            image_id = (
                archive.with_name(archive.name.replace(".oci.tar", ".id")).read_text().strip()
            )
            marker = IMAGE_CACHE / f"imported-{archive.name}.id"
            if marker.exists() and marker.read_text().strip() == image_id and image_id in present:
                continue
            started = time.monotonic()
            # Unpacked now, so a pod's start time is its own (6 GB for the trainer).
            self._ctr("images", "import", str(archive))
            marker.write_text(image_id)
            log.info("imported %s in %.1fs", archive.name, time.monotonic() - started)

    def tag_image(self, image: str, tag: str) -> None:
        """Another name for an image the node holds (as a registry would serve a new tag)."""
        self._ctr("images", "tag", "--force", image, tag)

    def untag_image(self, tag: str) -> None:
        self._ctr("images", "rm", tag, check=False)

    def _grant_apiserver_kubelet_access(self) -> None:
        rbac = client.RbacAuthorizationV1Api(self._api())
        binding = {
            "metadata": {"name": "kubetune-test:apiserver-kubelet-client"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:kubelet-api-admin",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": "kube-apiserver-kubelet-client",
                }
            ],
        }
        create_ok_if_exists(lambda: rbac.create_cluster_role_binding(binding))

    def _start_coredns(self) -> None:
        """Cluster DNS on the node's address, as a host process (no registry holds its image)."""
        corefile = self.work_dir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.control_plane.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        proc = self._launch("coredns", [str(bin_dir() / "coredns"), "-conf", str(corefile)])
        wait_until(
            "coredns answering",
            lambda: _dig(f"kubernetes.default.svc.{CLUSTER_DOMAIN}") is not None,
            self.start_timeout,
            alive=proc.exit_reason,
        )

    def _start_kubelet(self) -> None:
        d = self.work_dir / "kubelet"
        d.mkdir(exist_ok=True)
        ca = self.control_plane.ca
        identity = pki.issue(ca, d, "kubelet", pki.node_subject(self.name), None)
        serving = pki.issue(ca, d, "kubelet-serving", f"/CN={self.name}", [f"IP:{NODE_IP}"])
        kubeconfig = pki.write_kubeconfig(
            d / "kubelet.kubeconfig", self.control_plane.server, ca.cert, identity, self.name
        )
        port, healthz = free_port(), free_port()
        self.ports.update(kubelet=port, kubelet_healthz=healthz)
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK,
            "healthzPort": healthz,
            "tlsCertFile": str(serving.cert),
            "tlsPrivateKeyFile": str(serving.key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca.cert)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "cgroupDriver": "cgroupfs",
            # This host has cgroup v1 (hybrid); kubelet refuses it unless told otherwise.
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [NODE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": "",
            "podCIDR": POD_CIDR,
            "maxPods": 20,
            "serializeImagePulls": False,
            # The test images are imported, never pulled: never garbage-collect them, and do
            # not evict for a disk that is merely fuller than a production node's would be.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1Gi",
                "imagefs.available": "1Gi",
            },
            "nodeStatusReportFrequency": "10s",
            "shutdownGracePeriod": "0s",
        }
        config_path = d / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        proc = self._launch(
            "kubelet",
            [
                str(bin_dir() / "kubelet"),
                f"--config={config_path}",
                f"--kubeconfig={kubeconfig}",
                # Under the short run directory: the kubelet puts unix sockets there.
                f"--root-dir={self.run_dir / 'kubelet'}",
                f"--cert-dir={d / 'certs'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={REAL_NODE_LABEL}=true,type=real",
                f"--register-with-taints={REAL_NODE_LABEL}=true:NoSchedule",
                "--v=1",
            ],
        )
        wait_until(
            f"node {self.name} Ready",
            self._ready,
            self.start_timeout,
            interval=0.5,
            alive=proc.exit_reason,
        )

    def _start_kube_proxy(self) -> None:
        config = kubeproxy.write_config(
            self.control_plane, self.work_dir / "kube-proxy", self.name, POD_CIDR
        )
        proc = self._launch("kube-proxy", kubeproxy.argv(config))
        kubeproxy.wait_serving(proc, config, self.start_timeout)

    def _advertise_gpus(self) -> None:
        """An extended resource advertised by patching the node's status, as Kubernetes
        documents for resources without a device plugin; the kubelet keeps it."""
        if not self.fake_gpus:
            return
        amount = str(self.fake_gpus)
        patch = [
            {"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": amount},
        ]
        core = client.CoreV1Api(self._api())
        core.patch_node_status(self.name, patch)  # a list body: sent as a JSON patch

        def advertised() -> bool:
            node = core.read_node(self.name)
            return (node.status.allocatable or {}).get("nvidia.com/gpu") == amount

        wait_until("the fake GPU allocatable", advertised, 60, interval=0.5)

    def _steer_labelled_namespaces(self) -> None:
        """Pods in namespaces labelled kubetune.io/real-node=true go to this node (and only
        they: the node is tainted), so tests create pods exactly as a user would."""
        policy, binding = steering_policy(
            label=REAL_NODE_LABEL,
            node_label=REAL_NODE_LABEL,
            selector="namespaceSelector",
            name="kubetune-test-real-node",
        )
        adm = client.AdmissionregistrationV1Api(self._api())
        create_ok_if_exists(lambda: adm.create_mutating_admission_policy(policy))
        create_ok_if_exists(lambda: adm.create_mutating_admission_policy_binding(binding))

    def _ready(self) -> bool:
        with contextlib.suppress(ApiException):
            node = client.CoreV1Api(self._api()).read_node(self.name)
            return any(
                c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
            )
        return False

    # -- helpers -----------------------------------------------------------------------------

    def _api(self) -> client.ApiClient:
        if self._api_client is None:
            self._api_client = config.new_client_from_config(str(self.control_plane.kubeconfig))
        return self._api_client

    def _launch(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(f"{self.name}-{name}", argv, self.work_dir / f"{name}.log")
        self.procs.append(proc)
        proc.start()
        return proc

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every container, then kubelet, CoreDNS and containerd; remove what was added
        to the host (bridge, address, mounts). Idempotent."""
        procs, self.procs = self.procs, []
        by_name = {p.name.removeprefix(f"{self.name}-"): p for p in procs}
        if "kubelet" in by_name:
            if by_name["kubelet"].exit_reason() is None:
                self._drain()
            by_name["kubelet"].stop()
        if "containerd" in by_name and by_name["containerd"].exit_reason() is None:
            self._remove_containers()
        for proc in reversed(procs):
            proc.stop()
        unmount_under(self.work_dir)
        unmount_under(self.run_dir)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
        remove_kube_iptables()
        remove_cgroups("kubepods")
        for key, value in self._sysctls.items():
            if value is not None:
                write_sysctl(key, value)
        if self._added_ip:
            subprocess.run(["ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo"],
                           capture_output=True, check=False)  # fmt: skip
            self._added_ip = False
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _lock_host(self) -> None:
        """One real node per host: its address, bridge, port 53 and containerd root are the
        host's. A second one (another `make test`, `python -m tests.cluster up`) is refused."""
        self._lock = open(HOST_LOCK, "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise NodeUnavailable(f"a real node already runs on this host ({holder})") from None
        self._lock.truncate(0)
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()

    def _drain(self, timeout: float = 60) -> None:
        """Delete this node's pods and let the kubelet stop them as it would (CNI DEL for each
        sandbox, network namespaces and volumes unmounted) before it stops."""
        core = client.CoreV1Api(self._api())
        with contextlib.suppress(ApiException):
            for pod in core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.name}"
            ).items:
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(
                        pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
                    )
        # Tasks stop first; the sandbox's CNI DEL and the kubelet's unmounts follow, and the
        # kubelet removes a pod's directory last.
        pods_dir = self.run_dir / "kubelet" / "pods"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self._ctr("tasks", "list", "--quiet", check=False).stdout.split()
            if not tasks and not (pods_dir.is_dir() and any(pods_dir.iterdir())):
                return
            time.sleep(0.5)
        log.warning("node %s: tasks still running after draining %.0fs", self.name, timeout)

    def _remove_containers(self) -> None:
        """Kill and delete every task and container (pods' and sandboxes'), so no shim or
        container process outlives the node."""
        listed = self._ctr("containers", "list", "--quiet", check=False).stdout.split()
        for container in listed:
            self._ctr("tasks", "kill", "--signal", "SIGKILL", container, check=False)
        deadline = time.monotonic() + 30
        for container in listed:
            while time.monotonic() < deadline:
                if self._ctr("tasks", "delete", container, check=False).returncode == 0:
                    break
                if "not found" in self._ctr("tasks", "ps", container, check=False).stderr:
                    break
                time.sleep(0.2)
            self._ctr("containers", "delete", container, check=False)

    def leftovers(self) -> list[str]:
        """What stop() should have removed from the host and did not (empty when clean)."""
        found = [f"shim pid {pid}" for pid in self.leftover_shims()]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        found += [f"link {BRIDGE}"] if f" {BRIDGE}:" in links else []
        addresses = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"],
                                   capture_output=True, text=True).stdout  # fmt: skip
        found += [f"address {NODE_IP}"] if f" {NODE_IP}/" in addresses else []
        for tool in ("iptables", "ip6tables"):
            for table in TABLES:
                found += [f"{tool} -t {table} chain {c}" for c in kube_chains(tool, table)]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        roots = (str(self.work_dir), str(self.run_dir))
        found += [f"mount {m}" for m in mounts if m.startswith(roots)]
        found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/kubepods")]
        return found

    def leftover_shims(self) -> list[int]:
        """Shim processes that still serve this node's containerd (none after stop())."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if (
                    argv
                    and argv[0].endswith(b"containerd-shim-runc-v2")
                    and str(self.sock).encode() in b" ".join(argv)
                ):
                    pids.append(int(proc.name))
        return pids


def _dig(name: str) -> str | None:
    """Ask the node's CoreDNS for an A record (a raw UDP query: no resolver library)."""
    import random
    import socket
    import struct

    query_id = random.randrange(1 << 16)
    header = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    packet = header + qname + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        try:
            sock.sendto(packet, (NODE_IP, 53))
            reply = sock.recv(512)
        except OSError:
            return None
    answers = struct.unpack(">H", reply[6:8])[0]
    if answers == 0 or len(reply) < 4:
        return None
    return ".".join(str(b) for b in reply[-4:])
