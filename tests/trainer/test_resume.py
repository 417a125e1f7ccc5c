"""Checkpoints, resumption and preemption, on a real `kubetune train` process.

A run killed after a checkpoint and started again continues from that checkpoint (never from
a half-written one) and ends with the same steps and, step for step, the same losses as a run
that was never interrupted: optimizer, scheduler, RNG and data position are all restored.
SIGTERM (eviction, preemption) saves a checkpoint and exits with code 75 within seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.tiny import tiny_causal_lm
from tests.trainer.jobs import KUBETUNE, job_file, train

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY = 120, 10
EXIT_PREEMPTED = 75


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart on a tiny random Llama, long enough to be interrupted."""
    directory = tmp_path_factory.mktemp("resume")
    model = tiny_causal_lm(directory / "model")
    changes = {
        "spec": {
            "model": {"path": str(model)},
            "data": {"validationSplit": 0},
            "training": {"maxSteps": STEPS, "epochs": None, "saveSteps": SAVE_EVERY,
                         "loggingSteps": 1, "batchSizePerDevice": 4},
            "evaluation": {"samplePrompts": [], "everyFraction": None},
            "output": {"merge": False},
        }
    }  # fmt: skip
    return job_file(directory, "quickstart.yaml", changes)


def losses(run: Path) -> dict[int, float]:
    history = [json.loads(line) for line in (run / "history.jsonl").open()]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    output = tmp_path_factory.mktemp("uninterrupted")
    result = train(manifest, output, "--run-id", "r")
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(output / "r")


def start(manifest: Path, output: Path, *extra: str) -> subprocess.Popen[str]:
    command = [KUBETUNE, "train", str(manifest), "--output-dir", str(output), "--run-id", "r"]
    return subprocess.Popen(
        [*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exited {process.returncode} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)


def test_killed_run_resumes_from_the_newest_complete_checkpoint(
    manifest: Path, uninterrupted: dict[int, float], tmp_path: Path
) -> None:
    checkpoints = tmp_path / ".r.work" / "checkpoints"
    process = start(manifest, tmp_path)
    wait_for(checkpoints / f"checkpoint-{2 * SAVE_EVERY}" / "COMPLETE", process)
    process.kill()
    process.wait()
    done = sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("*/COMPLETE"))
    assert done and done[-1] < STEPS
    # A checkpoint cut off mid-write (no COMPLETE marker) must never be resumed from.
    (checkpoints / f"checkpoint-{STEPS - 1}").mkdir()

    result = train(manifest, tmp_path, "--run-id", "r")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / f'checkpoint-{done[-1]}'}" in result.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    resumed = losses(tmp_path / "r")
    assert sorted(resumed) == sorted(uninterrupted)
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}"


def test_sigterm_saves_a_checkpoint_and_exits_75(manifest: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / ".r.work" / "checkpoints"
    termination_log = tmp_path / "termination-log"
    process = start(manifest, tmp_path, "--termination-log", str(termination_log))
    wait_for(checkpoints / f"checkpoint-{SAVE_EVERY}" / "COMPLETE", process)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    assert time.monotonic() - sent < 30
    summary = json.loads(termination_log.read_text())
    assert summary["phase"] == "Preempted"
    newest = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("*/COMPLETE"))
    assert newest == summary["steps"] > SAVE_EVERY
    assert not (tmp_path / "r").exists()
