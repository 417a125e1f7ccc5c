"""DeepSpeed ZeRO across two processes on CPU (DeepSpeed's CPU accelerator over gloo/shm).

The same `kubetune train` entrypoint runs under torchrun, as in a training pod. Both ranks
must finish, and the saved adapter, checkpoints and full weights must hold real tensors:
under ZeRO-3 each rank keeps only a shard, and saving without gathering writes empty ones.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny import tiny_causal_lm
from tests.trainer.jobs import KUBETUNE, job_file

pytestmark = pytest.mark.slow
RANK = 8


def torchrun(manifest: Path, output: Path) -> subprocess.Popen[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", KUBETUNE, "train", str(manifest)]
    return subprocess.Popen(
        [*command, "--output-dir", str(output), "--run-id", "r"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finished(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def manifest(tmp_path: Path, stage: int, method: str, steps: int) -> Path:
    model = tiny_causal_lm(tmp_path / "model")
    changes = {
        "spec": {
            "model": {"path": str(model)},
            "data": {"validationSplit": 0},
            "method": {"type": method, "lora": {"r": RANK, "alpha": 16}},
            "training": {"maxSteps": steps, "epochs": None, "saveSteps": 2, "loggingSteps": 1,
                         "batchSizePerDevice": 2},
            "evaluation": {"samplePrompts": [], "everyFraction": None},
            "distributed": {"nodes": 1, "gpusPerNode": 2, "deepspeed": {"zeroStage": stage}},
        }
    }  # fmt: skip
    return job_file(tmp_path, "quickstart.yaml", changes)


def assert_whole_adapter(adapter: dict[str, Any]) -> None:
    a_shapes = {tuple(t.shape) for k, t in adapter.items() if "lora_A" in k}
    assert a_shapes and all(shape[0] == RANK and shape[1] > 0 for shape in a_shapes)
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k), "untrained"


@pytest.mark.parametrize(("stage", "method"), [(2, "lora"), (3, "lora"), (3, "full")])
def test_zero_across_two_processes_saves_whole_tensors(
    stage: int, method: str, tmp_path: Path
) -> None:
    job = manifest(tmp_path, stage, method, steps=4)
    result = finished(torchrun(job, tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = tmp_path / "out" / "r"
    # Both ranks got to the end (each prints its summary).
    assert result.stdout.count('"phase": "Succeeded"') == 2

    config = AutoConfig.from_pretrained(tmp_path / "model")
    if method == "lora":
        assert_whole_adapter(load_file(run / "adapter" / "adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    embeddings = merged.get_input_embeddings().weight
    assert tuple(embeddings.shape) == (config.vocab_size, config.hidden_size)
    assert all(p.numel() > 0 for p in merged.parameters())


def test_zero3_preempted_checkpoint_is_whole_and_resumes(tmp_path: Path) -> None:
    job, steps = manifest(tmp_path, 3, "lora", steps=200), 200
    checkpoints = tmp_path / "out" / ".r.work" / "checkpoints"
    process = torchrun(job, tmp_path / "out")
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-2" / "COMPLETE").exists():
        assert process.poll() is None and time.monotonic() < deadline, finished(process).stderr
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    assert finished(process).returncode != 0
    newest = max(checkpoints.glob("*/COMPLETE"), key=lambda p: int(p.parent.name.split("-")[1]))
    assert_whole_adapter(load_file(newest.parent / "adapter_model.safetensors"))

    result = finished(torchrun(job, tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {newest.parent}" in result.stdout
    assert f'"steps": {steps}' in result.stdout
