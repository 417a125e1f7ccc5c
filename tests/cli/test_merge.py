"""`kubetune merge` on a tiny real Llama and a peft LoRA adapter with non-zero weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kubetune.cli import main
from tests.tiny import family_tokenizer, tiny_causal_lm, tiny_lora_adapter

PROMPT = "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lora_adapter(base, tmp_path_factory.mktemp("run") / "adapter")


def _logits(model: Any) -> torch.Tensor:
    ids = family_tokenizer("chatml")(PROMPT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits.float()


def _base_model(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def _no_leftovers(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if ".partial" in p.name]


def test_merged_model_computes_what_base_plus_adapter_computes(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    output = tmp_path / "merged"
    args = ["merge", str(adapter), "--base", str(base), "-o", str(output)]
    assert main([*args, "--max-shard-size", "200KB"]) == 0
    assert "merge check (float32)" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    unmerged = PeftModel.from_pretrained(_base_model(base), adapter).eval()
    expected = _logits(unmerged)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)
    # The adapter changes what the model computes, so the comparison above means something.
    assert (_logits(_base_model(base)) - expected).abs().max() > 1e-2

    shards = sorted(p.name for p in output.glob("*.safetensors"))
    assert len(shards) > 1 and (output / "model.safetensors.index.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert "<|im_start|>" in tokenizer.chat_template
    stops = GenerationConfig.from_pretrained(output).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    _no_leftovers(tmp_path)


def test_base_defaults_to_the_one_recorded_in_the_adapter(
    base: Path, adapter: Path, tmp_path: Path
) -> None:
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(["merge", str(adapter), "-o", str(tmp_path / "merged"), "--dtype", "bf16"]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_base_given_as_a_package_file(
    base: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "tinymodels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "llama").symlink_to(base, target_is_directory=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    output = tmp_path / "merged"
    assert main(["merge", str(adapter), "--base", "pkg:tinymodels/llama", "-o", str(output)]) == 0
    assert (output / "config.json").exists()


def test_missing_package_is_named(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "merged"
    args = ["merge", str(adapter), "--base", "pkg:no_such_pkg/m.gguf", "-o", str(output)]
    assert main(args) == 2
    assert "--base pkg:no_such_pkg/m.gguf: Python package 'no_such_pkg' is not installed" in (
        capsys.readouterr().err
    )
    assert not output.exists()


def test_existing_output_is_never_overwritten(
    adapter: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert main(["merge", str(adapter), "--base", str(base), "-o", str(output)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_failed_merge_check_leaves_no_output(
    adapter: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "adapter_model.safetensors")
    output = tmp_path / "merged"

    assert main(["merge", str(broken), "--base", str(base), "-o", str(output)]) == 1

    assert "merged model differs from base + adapter" in capsys.readouterr().err
    assert not output.exists()
    _no_leftovers(tmp_path)


def test_a_directory_without_an_adapter_is_named(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "merged"
    assert main(["merge", str(base), "-o", str(output)]) == 2
    assert f"{base}: no adapter_config.json there" in capsys.readouterr().err
    assert not output.exists()


def test_a_failure_while_writing_leaves_no_output(
    adapter: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "merged"
    args = ["merge", str(adapter), "--base", str(base), "-o", str(output)]
    assert main([*args, "--max-shard-size", "lots"]) == 2
    assert "lots" in capsys.readouterr().err
    assert not output.exists()
    _no_leftovers(tmp_path)
