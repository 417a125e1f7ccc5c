"""``python -m tests.cluster up|down|status|serve|build`` for working with the test cluster by hand.

``up`` starts a background supervisor (``serve``) that runs the control plane, kwok and the pod
runner, waits until it is ready and prints the kubeconfig; ``down`` stops it and checks that no
process and no port is left; ``status`` shows what runs. ``serve`` runs in the foreground
(Ctrl-C stops it). State lives in ``--state-dir`` (default ~/.cache/kubetune/cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.cluster.controlplane import BUILD_SCRIPT, bin_dir
from tests.cluster.procs import group_alive, port_is_free

DEFAULT_STATE = Path.home() / ".cache" / "kubetune" / "cluster"


def _state_file(state_dir: Path) -> Path:
    return state_dir / "state.json"


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(_state_file(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(state_dir: Path, real_node: bool = True) -> int:
    """Runs the cluster in this process until SIGTERM/SIGINT; writes state.json when ready."""
    from tests.cluster.harness import LocalCluster

    # A background job of a non-interactive shell (CI, `cmd &`) starts with SIGINT ignored,
    # and Python then never raises KeyboardInterrupt: restore Ctrl-C explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    state_dir.mkdir(parents=True, exist_ok=True)
    work = state_dir / "cluster"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir()
    cluster = LocalCluster(work_dir=work)
    node = None
    try:
        cluster.start()
        assert cluster.runner is not None
        node = _real_node(cluster) if real_node else None
        state = {
            "pid": os.getpid(),
            "kubeconfig": str(cluster.kubeconfig),
            "ports": cluster.control_plane.ports,
            "process_groups": [p.pid for p in cluster.control_plane.procs],
            "runner_root": str(cluster.runner.root),
            "bin_dir": str(cluster.control_plane.bins),
            "real_node": node.name if node else None,
        }
        tmp = _state_file(state_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(_state_file(state_dir))
        print(f"cluster ready; export KUBECONFIG={cluster.kubeconfig}", flush=True)
        while True:  # SIGTERM (-> SystemExit, see harness) or Ctrl-C ends the wait
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(OSError):
            _state_file(state_dir).unlink()
        if node is not None:
            node.stop()
        cluster.stop()
        print("cluster stopped; no process or port left", flush=True)


def _real_node(cluster: Any) -> Any:
    """The real node, with the images `make images` built (without them, none: said so)."""
    from tests.cluster.fixtures import IMAGES
    from tests.cluster.node import NodeUnavailable, RealNode, missing_host_parts

    archives = [IMAGES / f"{name}.oci.tar" for name in ("trainer", "operator")]
    missing = missing_host_parts() + [str(a) for a in archives if not a.exists()]
    if missing:
        print(f"no real node: missing {', '.join(missing)}", flush=True)
        return None
    node = RealNode(cluster.control_plane, cluster.work_dir / "real-0", image_archives=archives)
    try:
        node.start()
    except NodeUnavailable as err:
        print(f"no real node: {err}", flush=True)
        return None
    print(f"real node {node.name} ready (namespaces labelled kubetune.io/real-node=true)")
    return node


def up(state_dir: Path, timeout: float, real_node: bool = True) -> int:
    state = _read_state(state_dir)
    if state and _alive(state["pid"]):
        print(f"already up (pid {state['pid']}); export KUBECONFIG={state['kubeconfig']}")
        return 0
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / "serve.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.cluster",
            "serve",
            "--state-dir",
            str(state_dir),
            *([] if real_node else ["--no-real-node"]),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # survives this command and the terminal
        cwd=Path(__file__).resolve().parents[2],
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _read_state(state_dir)
        if state and state["pid"] == proc.pid:
            print(f"cluster up (supervisor pid {proc.pid}, logs in {state_dir})")
            print(f"export KUBECONFIG={state['kubeconfig']}")
            return 0
        if proc.poll() is not None:
            print(f"cluster failed to start; see {state_dir / 'serve.log'}", file=sys.stderr)
            return 1
        time.sleep(0.3)
    proc.terminate()
    print(f"cluster not ready after {timeout:.0f}s; see {state_dir / 'serve.log'}", file=sys.stderr)
    return 1


def down(state_dir: Path, timeout: float = 180.0) -> int:
    state = _read_state(state_dir)
    if state is None:
        print("not running")
        return 0
    pid = state["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            # Last resort; the control plane dies with it (setpriv --pdeathsig KILL).
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        _state_file(state_dir).unlink()
    left = [g for g in state["process_groups"] if group_alive(g)]
    held = [f"{k}:{p}" for k, p in state["ports"].items() if not port_is_free(p)]
    if left or held:
        print(f"left behind: process groups {left}, ports {held}", file=sys.stderr)
        return 1
    print("cluster down; no process or port left")
    return 0


def status(state_dir: Path) -> int:
    state = _read_state(state_dir)
    if state is None or not _alive(state["pid"]):
        print("not running")
        return 3
    print(json.dumps(state, indent=2))
    kubectl = [str(Path(state["bin_dir"]) / "kubectl"), f"--kubeconfig={state['kubeconfig']}"]
    subprocess.run([*kubectl, "get", "--raw", "/readyz"], check=False)
    print()
    return subprocess.run([*kubectl, "get", "nodes", "-o", "wide"], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "serve", "build"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--no-real-node",
        dest="real_node",
        action="store_false",
        help="only the control plane, kwok nodes and the pod runner (no kubelet, no images)",
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], check=False)
        print(bin_dir())
        return result.returncode
    if args.command == "serve":
        return serve(args.state_dir, args.real_node)
    if args.command == "up":
        return up(args.state_dir, args.timeout, args.real_node)
    if args.command == "down":
        return down(args.state_dir)
    return status(args.state_dir)


if __name__ == "__main__":
    sys.exit(main())
