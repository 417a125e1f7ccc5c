"""Manifests are accepted or rejected with messages that name file, line, field and the
allowed values; the CEL rules are evaluated from the CRD's own expressions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonschema import Draft4Validator

from kubetune.api import SpecError, load_manifest, parse_manifest
from kubetune.api.crd import openapi_schema
from tests.conftest import EXAMPLES
from tests.trainer.jobs import example_manifests

QUICKSTART = (EXAMPLES / "quickstart.yaml").read_text()


def _mutated(**changes: object) -> str:
    document = yaml.safe_load(QUICKSTART)
    for dotted, value in changes.items():
        target = document
        *parents, leaf = dotted.split("__")
        for part in parents:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return yaml.safe_dump(document, sort_keys=False)


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_manifest(text, source=Path("job.yaml"))
    return str(caught.value).splitlines()


def test_quickstart_is_valid_and_defaults_are_applied() -> None:
    job = load_manifest(EXAMPLES / "quickstart.yaml")
    assert job.name == "quickstart"
    assert job.spec.method.type == "lora"
    assert job.spec.run_policy.backoff_limit == 3
    assert job.spec.model.trust_remote_code is False
    assert job.source == EXAMPLES / "quickstart.yaml"


INVALID = [
    (
        {"spec__method__type": "lorax"},
        "spec.method.type: got 'lorax'; allowed: 'lora', 'qlora' or 'full'",
    ),
    ({"spec__training__learningRate": -1}, "spec.training.learningRate: got -1"),
    (
        {"spec__data__cutofLength": 5},
        "spec.data.cutofLength: unknown field; allowed fields here: chatTemplate, configMap, "
        "cutoffLength",
    ),
    (
        {"spec__method__type": "qlora"},
        "spec.method.quantization: type qlora needs quantization settings",
    ),
    (
        {"spec__data__packing": True, "spec__data__cutoffLength": None},
        "spec.data.cutoffLength: packing needs cutoffLength",
    ),
    (
        {"spec__distributed__nodes": 2, "spec__distributed__gpusPerNode": 0},
        "spec.distributed.gpusPerNode: gpusPerNode must be greater than 0 when nodes > 1",
    ),
    (
        {"spec__output__claimName": "models"},
        "spec.output: set exactly one of claimName or claimTemplate",
    ),
    ({"spec__model__url": "https://example.com/m.gguf"}, "spec.model: exactly one of path"),
    ({"metadata__name": "Bad_Name"}, "metadata.name: got 'Bad_Name'; allowed: lower-case"),
    ({"apiVersion": "kubetune.io/v1"}, "apiVersion: got 'kubetune.io/v1'; allowed"),
    ({"spec__data__template": "custom"}, "spec.data.chatTemplate: chatTemplate is required"),
    (
        {"spec__distributed__deepspeed": {"offload": "cpu"}},
        "spec.distributed.deepspeed.offload: offload needs zeroStage 2 or 3",
    ),
    ({"spec__model": None}, "spec.model: required field is missing"),
    (
        {"spec__env": [{"name": "RANK", "value": "3"}]},
        "spec.env[0].name: is set by the distributed launch",
    ),
    (
        {
            "spec__model": {"hfRepo": "org/m", "tokenSecret": {"name": "hub"}},
            "spec__env": [{"name": "HF_TOKEN", "value": "x"}],
        },
        "spec.env: HF_TOKEN comes from model.tokenSecret",
    ),
]


@pytest.mark.parametrize(("changes", "expected"), INVALID)
def test_invalid_manifest_message(changes: dict[str, object], expected: str) -> None:
    problems = _problems(_mutated(**changes))
    assert any(expected in line for line in problems), problems


def test_problem_names_the_line_in_the_users_file() -> None:
    text = QUICKSTART.replace("type: lora", "type: lorax")
    line = text.splitlines().index("    type: lorax") + 1
    assert _problems(text) == [
        f"job.yaml:{line}: spec.method.type: got 'lorax'; allowed: 'lora', 'qlora' or 'full'"
    ]


def test_every_problem_is_reported_at_once() -> None:
    text = _mutated(spec__method__type="lorax", spec__training__seed=-5)
    problems = _problems(text)
    assert len(problems) == 2


def test_yaml_syntax_error_names_line() -> None:
    problems = _problems("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec: [\n")
    assert problems[0].startswith("job.yaml:")
    assert "not valid YAML" in problems[0]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_manifest(tmp_path / "nope.yaml")


def test_structural_schema_agrees_with_python_on_types() -> None:
    """The generated schema (checked by jsonschema, as a stand-in for the apiserver's
    structural validation) accepts the examples and rejects the same type errors."""
    validator = Draft4Validator(openapi_schema())
    for example in example_manifests():
        document = yaml.safe_load(example.read_text())
        assert not list(validator.iter_errors(document)), example
    bad = yaml.safe_load(_mutated(spec__method__type="lorax"))
    assert list(validator.iter_errors(bad))
