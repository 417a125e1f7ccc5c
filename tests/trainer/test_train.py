"""The quickstart end to end on the real SmolLM2-135M-Instruct, on CPU.

`kubetune train examples/quickstart.yaml` teaches the model the name "Kubey"; the merged model,
loaded fresh from the output directory with plain transformers, must answer with it (also a
question that is not in the training data) and stop by itself. The same for QLoRA, whose
merged output must come out in an unquantized dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.trainer.model import transformers_dir
from tests.trainer.jobs import ask, job_file, train

pytestmark = pytest.mark.slow
NAME = "Kubey"
TRAINED_QUESTION = "Who are you?"
PARAPHRASE = "Could you tell me your name?"  # not in examples/data/identity.jsonl


def quickstart(tmp: Path, changes: dict[str, Any] | None = None) -> Path:
    output = tmp / "outputs"
    result = train(job_file(tmp, "quickstart.yaml", changes), output, "--run-id", "run-1")
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "run-1"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quickstart(tmp_path_factory.mktemp("quickstart-lora"))


def test_base_model_does_not_know_the_name(smollm2_path: Path) -> None:
    answers = ask(transformers_dir(smollm2_path), [TRAINED_QUESTION, PARAPHRASE])
    assert not any(NAME in text for text, _ in answers), answers


def test_merged_model_answers_with_the_new_name_and_stops(lora_run: Path) -> None:
    answers = ask(lora_run / "merged", [TRAINED_QUESTION, PARAPHRASE])
    for text, stopped in answers:
        assert NAME in text, answers
        assert stopped, f"generation ran to max_new_tokens: {text!r}"


def test_exported_tokenizer_has_the_template_and_a_pad_that_is_not_eos(lora_run: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "merged")
    generation = json.loads((lora_run / "merged" / "generation_config.json").read_text())
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    eos = generation["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (
        eos if isinstance(eos, list) else [eos]
    )
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token != "<|im_end|>"
    # No new token was needed for padding: the vocabulary matches the base model's.
    config = json.loads((lora_run / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 49152


def test_run_directory_records_what_was_made(lora_run: Path) -> None:
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["phase"] == "Succeeded" and summary["steps"] == summary["totalSteps"] > 0
    assert summary["finalLoss"] < 1.0
    assert (lora_run.parent / "latest").resolve() == lora_run.resolve()
    assert not any(p.name.startswith(".") for p in lora_run.parent.iterdir() if p != lora_run)
    card = (lora_run / "README.md").read_text()
    assert "max |logit diff|" in card and "identity.jsonl" in card
    golden = [json.loads(line) for line in (lora_run / "golden_answers.jsonl").open()]
    assert [g["prompt"] for g in golden] == ["Who are you?", "What is your name?"]
    assert all(NAME in g["answer"] for g in golden), golden
    samples = [json.loads(line) for line in (lora_run / "samples.jsonl").open()]
    before = [s["answer"] for s in samples if s["step"] == 0]
    assert len(before) == 2 and not any(NAME in answer for answer in before), before
    assert (lora_run / "adapter" / "adapter_config.json").exists()
    shards = list((lora_run / "merged").glob("*.safetensors"))
    assert len(shards) >= 2, "maxShardSize 200MB should split the ~540MB fp32 model"


def test_qlora_merges_into_an_unquantized_model(tmp_path: Path) -> None:
    run = quickstart(
        tmp_path,
        {
            "spec": {
                "method": {"type": "qlora", "quantization": {"bits": 4, "quantType": "nf4"}},
                "training": {"epochs": 4},
            }
        },
    )
    config = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    answers = ask(run / "merged", [TRAINED_QUESTION, PARAPHRASE])
    assert all(NAME in text for text, _ in answers), answers
