"""What a real kubelet and kube-proxy change on the host, and how the test node gives it back:
their iptables chains, the pod cgroups, the kernel settings the kubelet tunes, and the mounts
it and containerd leave.
Used by node.py at stop and by RealNode.leftovers() to check nothing is left.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from pathlib import Path

KUBELET_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)


def read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", *key.split(".")).read_text().strip()
    except OSError:
        return None


def write_sysctl(key: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", *key.split(".")).write_text(value)


TABLES = ("filter", "nat", "mangle")


def kube_chains(tool: str, table: str) -> list[str]:
    """The KUBE-* chains in a table: the kubelet's (KUBE-FIREWALL, KUBE-KUBELET-CANARY, ...)
    and kube-proxy's (KUBE-SERVICES, KUBE-SVC-*, ...). The real node is the only Kubernetes
    node on a test host (one per host, by its lock), so all of them are its own."""
    listed = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True)
    # Not kube-router's (KUBE-ROUTER-*), should a developer's machine run one.
    return [line.split()[1] for line in listed.stdout.splitlines()
            if line.startswith("-N KUBE-") and not line.startswith("-N KUBE-ROUTER-")]  # fmt: skip


def remove_kube_iptables() -> None:
    """Every KUBE-* chain and every rule that jumps to one, in IPv4 and IPv6 (what the kubelet
    and kube-proxy in iptables mode made; nothing else of the host's)."""
    for tool in ("iptables", "ip6tables"):
        for table in TABLES:
            chains = kube_chains(tool, table)
            if not chains:
                continue
            for chain in chains:  # first empty them, so none refers to another
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
            listed = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True)
            for rule in listed.stdout.splitlines():
                words = shlex.split(rule)
                if words[:1] == ["-A"] and set(words[2:]) & set(chains):
                    argv = [tool, "-t", table, "-D", *words[1:]]
                    subprocess.run(argv, capture_output=True, check=False)
            for chain in chains:
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)


def remove_cgroups(name: str) -> None:
    """The kubelet's pod cgroups (cgroup v1: one tree per controller), deepest first; only
    empty ones can go, which all are once every container has stopped."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / name
        if not top.is_dir():
            continue
        for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if directory.is_dir():
                with contextlib.suppress(OSError):
                    directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def unmount_under(root: Path) -> None:
    """Lazily unmount whatever the kubelet or containerd left mounted under root, deepest
    first (tmpfs for Secrets and emptyDirs, overlay root filesystems, netns bind mounts)."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
