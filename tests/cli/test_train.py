"""`kubetune train` on bad input: a clear one-line error naming the culprit, exit code 2, and
nothing at the run's final output path (a finished run already there stays untouched)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.cli import main
from tests.tiny import tiny_causal_lm
from tests.trainer.jobs import job_file


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def run_train(
    tmp_path: Path, changes: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    manifest = job_file(tmp_path, "quickstart.yaml", changes)
    code = main(["train", str(manifest), "--output-dir", str(tmp_path / "out"), "--run-id", "r"])
    return code, capsys.readouterr().err


def assert_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not (out / "r").exists()
    assert not (out / ".r.partial").exists()


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    code, err = run_train(tmp_path, {"spec": {"model": {"path": str(missing)}}}, capsys)
    assert code == 2
    assert "spec.model" in err and str(missing) in err
    assert_nothing_written(tmp_path)


def test_unloadable_model(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for tokenizer_file in tiny_model.glob("*"):
        if tokenizer_file.suffix != ".safetensors" and tokenizer_file.name != "config.json":
            (broken / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    code, err = run_train(tmp_path, {"spec": {"model": {"path": str(broken)}}}, capsys)
    assert code == 2
    assert "spec.model" in err and str(broken) in err
    assert_nothing_written(tmp_path)


def test_dataset_without_trainable_tokens(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "questions.jsonl"
    record = {"messages": [{"role": "user", "content": "Who are you?"}]}
    data.write_text("\n".join(json.dumps(record) for _ in range(5)) + "\n")
    changes = {
        "spec": {
            "model": {"path": str(tiny_model)},
            "data": {"datasets": [{"path": str(data), "format": "messages"}]},
        }
    }
    code, err = run_train(tmp_path, changes, capsys)
    assert code == 2
    assert "questions.jsonl" in err and "trainable" in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"learningRate": -1.0}, "spec.training.learningRate"),
        ({"batchSizePerDevice": 0}, "spec.training.batchSizePerDevice"),
        ({"warmupRatio": 2.0}, "spec.training.warmupRatio"),
    ],
)
def test_out_of_range_hyper_parameters(
    tmp_path: Path, training: dict[str, Any], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_train(tmp_path, {"spec": {"training": training}}, capsys)
    assert code == 2
    assert field in err and "quickstart.yaml" in err
    assert_nothing_written(tmp_path)


def test_output_that_holds_a_finished_run_is_not_touched(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finished = tmp_path / "out" / "r"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text('{"phase": "Succeeded"}')
    code, err = run_train(tmp_path, {"spec": {"model": {"path": str(tiny_model)}}}, capsys)
    assert code == 2
    assert str(finished) in err and "never overwrites" in err
    assert [p.name for p in finished.iterdir()] == ["summary.json"]
    assert (finished / "summary.json").read_text() == '{"phase": "Succeeded"}'
