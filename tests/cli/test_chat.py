"""`kubetune chat`: one answer per input line, from a base, base + adapter or merged model."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.cli import main
from tests.tiny import tiny_causal_lm, tiny_lora_adapter

TOKENS = 6
INPUTS = "Hello!\n\nWho are you?\n/reset\nWhat is 2+2?\n"
PROMPTS = [["Hello!", "Who are you?"], ["What is 2+2?"]]  # conversations, split by /reset


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    base = tiny_causal_lm(root / "base")
    adapter = tiny_lora_adapter(base, root / "adapter")
    merged = root / "merged"
    assert main(["merge", str(adapter), "--base", str(base), "-o", str(merged)]) == 0
    return {"base": base, "adapter": adapter, "merged": merged}


def _expected(
    model_dir: Path, adapter: Path | None, system: list[dict[str, str]] | None = None
) -> list[str]:
    """The answers, computed without the chat command: plain transformers and peft loading,
    the trainer's generate.answer, and the history kept turn by turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.data.templates import from_tokenizer
    from kubetune.trainer.generate import answer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    template = from_tokenizer(tokenizer)
    answers = []
    for conversation in PROMPTS:
        history = list(system or [])
        for prompt in conversation:
            (reply,) = answer(model, tokenizer, template, [prompt], TOKENS, history)
            history += [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": reply},
            ]
            answers.append(reply)
    return answers


def _chat(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stdin: str,
    *args: str,
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *args, "--max-new-tokens", str(TOKENS)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("mode", ["base", "adapter", "merged"])
def test_one_answer_per_input_line(
    models: dict[str, Path],
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = models["merged" if mode == "merged" else "base"]
    adapter = models["adapter"] if mode == "adapter" else None
    args = [str(model), *(["--adapter", str(adapter)] if adapter else [])]
    expected = _expected(model, adapter)

    code, out, _ = _chat(monkeypatch, capsys, INPUTS, *args)

    assert code == 0
    assert len(expected) == 3  # blank lines and /reset get no answer
    assert out == "".join(f"{reply}\n" for reply in expected)


def test_merged_model_answers_as_base_plus_adapter(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = ["--adapter", str(models["adapter"])]
    _, unmerged, _ = _chat(monkeypatch, capsys, INPUTS, str(models["base"]), *adapter)
    _, merged, _ = _chat(monkeypatch, capsys, INPUTS, str(models["merged"]))
    _, base, _ = _chat(monkeypatch, capsys, INPUTS, str(models["base"]))
    assert merged == unmerged
    assert base != unmerged  # the adapter is not a no-op, so the equality above means something


def test_exit_stops_reading(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _chat(monkeypatch, capsys, "Hello!\n/exit\nWho are you?\n", str(models["base"]))
    assert code == 0
    assert out == f"{_expected(models['base'], None)[0]}\n"


def test_system_prompt_opens_every_conversation(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    system = "You are terse."
    code, out, _ = _chat(monkeypatch, capsys, INPUTS, str(models["base"]), "--system", system)
    expected = _expected(models["base"], None, [{"role": "system", "content": system}])
    assert code == 0 and out == "".join(f"{reply}\n" for reply in expected)


def test_a_model_without_a_template_needs_one(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in models["base"].iterdir():
        if item.name != "chat_template.jinja":
            (bare / item.name).write_bytes(item.read_bytes())

    code, out, err = _chat(monkeypatch, capsys, "Hello!\n", str(bare))
    assert code == 2 and out == ""
    assert f"{bare}: the tokenizer has no chat template; pass --template" in err

    code, out, _ = _chat(monkeypatch, capsys, "Hello!\n", str(bare), "--template", "chatml")
    assert code == 0 and len(out.splitlines()) >= 1


def test_unknown_template_is_named(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _chat(monkeypatch, capsys, "", str(models["base"]), "--template", "vicuna")
    assert code == 2
    assert "--template vicuna: neither a built-in template" in err


def test_piped_through_a_real_process(models: dict[str, Path]) -> None:
    command = [
        sys.executable,
        "-c",
        "import sys; from kubetune.cli import main; sys.exit(main())",
        "chat",
        str(models["merged"]),
        "--max-new-tokens",
        str(TOKENS),
    ]
    result = subprocess.run(
        command, input=INPUTS, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{reply}\n" for reply in _expected(models["merged"], None))
