"""Each seed recipe's example trains on a tiny random-weight model of its architecture.

No checkpoint of these families can be downloaded here, so the test builds one from the
architecture's real transformers config class with small sizes, next to a tokenizer carrying
the family's special tokens (tests/tiny.py). What is real: the modelling code, the template,
the masking, the LoRA/QLoRA/full paths, the merge and the export. ChatGLM3 and InternLM2
publish remote modelling code; their stand-ins are transformers' native ports of the same
designs (GLM for ChatGLM, Llama for InternLM2, whose weights convert to it one to one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import tiny_causal_lm
from tests.trainer.jobs import job_file, train

pytestmark = pytest.mark.slow
ARCHITECTURES = {"glm4": "glm", "chatglm3": "glm", "internlm2": "llama"}


SEEDS = {
    "glm4-lora-alpaca-history.yaml": "glm4",
    "glm4-trl-messages.yaml": "glm4",
    "internlm2-qlora-xtuner.yaml": "internlm2",
    "chatglm3-base-multiturn-lora.yaml": "chatglm3",
    "chatglm3-base-multiturn-full.yaml": "chatglm3",
}


def cpu_sized(model: Path) -> dict[str, Any]:
    """What changes to run a GPU recipe for three steps on a CPU: the model, the step count,
    and the GPU-only settings (bf16, paged optimizers, DeepSpeed: tested on their own)."""
    return {
        "spec": {
            "model": {"path": str(model), "hfRepo": None, "tokenSecret": None},
            "data": {"cutoffLength": 256},
            "training": {
                "maxSteps": 3,
                "epochs": None,
                "batchSizePerDevice": 2,
                "gradientAccumulationSteps": 1,
                "precision": "auto",
                "optimizer": "adamw",
                "loggingSteps": 1,
            },
            "evaluation": {"everySteps": 2, "everyFraction": None, "maxNewTokens": 8},
            "distributed": {"nodes": 1, "gpusPerNode": 1, "deepspeed": None},
        }
    }


@pytest.mark.parametrize("example", sorted(SEEDS))
def test_seed_example_trains_and_exports_a_model_that_reloads(example: str, tmp_path: Path) -> None:
    family = SEEDS[example]
    changes = cpu_sized(tiny_causal_lm(tmp_path / "model", family, ARCHITECTURES[family]))
    if "qlora" in example:
        changes["spec"]["method"] = {"quantization": {"computeDtype": "auto"}}
    result = train(job_file(tmp_path, example, changes), tmp_path / "out", "--run-id", "r")
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "out" / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["phase"] == "Succeeded"
    merged = run / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.pad_token_id not in _eos(merged)
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|observation|>")}
    if family in ("glm4", "chatglm3"):  # a GLM answer ends where the next role token begins
        assert stops <= set(_eos(merged))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


def _eos(model_dir: Path) -> list[int]:
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]
