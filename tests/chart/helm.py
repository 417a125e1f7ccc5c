"""The real `helm` binary (tests/cluster/go/build.sh builds it from its Go module) on the
chart in charts/kubetune."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import ensure_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = [str(ensure_binaries() / "helm"), *args]
    if kubeconfig is not None:
        argv.append(f"--kubeconfig={kubeconfig}")
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


def set_args(values: dict[str, Any]) -> list[str]:
    """Values as `--set-json key=json`, the way a user passes one value on the command line."""
    import json

    return [f"--set-json={key}={json.dumps(value)}" for key, value in values.items()]


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm template` of the chart: every object it would install (test hooks included)."""
    out = helm("template", "kubetune", str(chart), "--namespace", "kubetune-system",
               "--include-crds", *set_args(values or {})).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
