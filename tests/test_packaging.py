"""The operator's install (extra `operator`) has no torch: it installs and runs without it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    assert Path(found).exists(), "uv is installed by `make venv`"
    return found


@pytest.mark.slow
def test_operator_extra_installs_and_runs_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    subprocess.run([uv(), "venv", "-q", "-p", "3.11", str(venv)], check=True, env=env)
    subprocess.run(
        [uv(), "pip", "install", "-q", "-p", str(python), "-e", f"{REPO}[operator]"],
        check=True,
        env=env,
    )
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
    assert subprocess.run([python, "-c", probe], check=False).returncode == 0, "torch came in"
    result = subprocess.run(
        [
            venv / "bin" / "kubetune",
            "validate",
            "--spec-only",
            REPO / "examples" / "quickstart.yaml",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "spec is valid" in result.stdout
