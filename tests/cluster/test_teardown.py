"""Proof: tear-down leaves no process and no port behind: `down`, Ctrl-C, and even SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.cluster.controlplane import ControlPlane
from tests.cluster.node import RealNode
from tests.cluster.podrunner import RUN_LOCALLY_LABEL
from tests.cluster.procs import group_alive, port_is_free, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.cluster", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_with_a_running_pod(
    state_dir: Path, tmp_path: Path, *flags: str
) -> tuple[dict[str, Any], int]:
    """`up`, then a pod whose process records its pid and sleeps; returns (state, pod pid)."""
    result = _cli("up", "--state-dir", str(state_dir), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads((state_dir / "state.json").read_text())
    core = client.CoreV1Api(config.new_client_from_config(state["kubeconfig"]))
    pid_file = tmp_path / "pod.pid"
    program = textwrap.dedent(
        f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # must be SIGKILLed
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(600)
        """
    )
    pod = {
        "metadata": {"name": "stubborn", "labels": {RUN_LOCALLY_LABEL: "true"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "x", "command": ["python", "-c", program]}],
        },
    }
    core.create_namespaced_pod("default", pod)
    pid = wait_until(
        "pod pid file", lambda: pid_file.exists() and int(pid_file.read_text() or 0), 60
    )
    return state, pid


def _assert_nothing_left(state: dict[str, Any], pod_pid: int) -> None:
    # Generous waits: what is checked is that nothing is left, not how fast; on a loaded
    # 2-core machine the shutdown (pod grace period, then the control plane) can take a while.
    wait_until("pod process gone", lambda: not _alive(pod_pid), 90)
    wait_until(
        "control-plane process groups gone",
        lambda: not any(map(group_alive, state["process_groups"])),
        90,
    )
    wait_until("supervisor exited", lambda: not _alive(state["pid"]), 90)
    held = [p for p in state["ports"].values() if not port_is_free(p)]
    assert not held, f"ports still held: {held}"


def test_down_stops_everything(tmp_path: Path) -> None:
    """With the real node (`up` brings it when the images are built): its kubelet,
    containerd and CoreDNS go too, and what the kubelet changed on the host is undone."""
    state_dir = tmp_path / "state"
    state, pod_pid = _start_with_a_running_pod(state_dir, tmp_path)
    assert _alive(pod_pid)
    assert state["real_node"] == "real-0", (state_dir / "serve.log").read_text()[-3000:]

    result = _cli("down", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no process or port left" in result.stdout
    _assert_nothing_left(state, pod_pid)
    assert _cli("status", "--state-dir", str(state_dir)).returncode == 3
    work = state_dir / "cluster" / "real-0"
    node = RealNode(ControlPlane(work_dir=work), work)
    assert node.leftovers() == []
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if str(work).encode() in _read(p)], "a node process is left"  # fmt: skip


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state, pod_pid = _start_with_a_running_pod(state_dir, tmp_path, "--no-real-node")
    os.kill(state["pid"], signal.SIGINT)
    _assert_nothing_left(state, pod_pid)


def test_sigkilled_harness_leaves_no_process(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state, pod_pid = _start_with_a_running_pod(state_dir, tmp_path, "--no-real-node")
    os.kill(state["pid"], signal.SIGKILL)  # no handler runs: only pdeathsig can clean up
    _assert_nothing_left(state, pod_pid)
