"""What a real kubelet changes on the host, and how the test node gives it back: its iptables
chains, its pod cgroups, the kernel settings it tunes, and the mounts it and containerd leave.
Used by node.py at stop and by RealNode.leftovers() to check nothing is left.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from pathlib import Path

KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")
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


def remove_kubelet_iptables() -> None:
    """The kubelet's own chains (and the rules that jump to them); no other KUBE-* chain, so a
    host that also runs a real node keeps its kube-proxy's."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listed = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True)
            rules = listed.stdout.splitlines()
            for rule in rules:
                words = shlex.split(rule)
                if words[:1] == ["-A"] and set(words) & {*KUBELET_CHAINS}:
                    argv = [tool, "-t", table, "-D", *words[1:]]
                    subprocess.run(argv, capture_output=True, check=False)
            for chain in KUBELET_CHAINS:
                if f"-N {chain}" in rules:
                    subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
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
