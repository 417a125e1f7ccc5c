"""Which paths a pod cannot read, and how the data ConfigMap's files are laid out in a pod."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.api import validate_object
from kubetune.api.pod_paths import config_map_items, local_only_paths
from kubetune.api.spec import FineTuneJobSpec
from tests.trainer.jobs import EXAMPLES, merged


def spec(changes: dict[str, Any]) -> FineTuneJobSpec:
    manifest = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    return validate_object(merged(manifest, {"spec": changes})).spec


def datasets(*paths: str) -> dict[str, Any]:
    return {"datasets": [{"path": p, "format": "messages"} for p in paths]}


def test_the_quickstart_is_readable_in_a_pod() -> None:
    quickstart = spec({})
    assert local_only_paths(quickstart) == []
    assert config_map_items(quickstart) == [
        {"key": "identity.jsonl", "path": "data/identity.jsonl"}
    ]


def test_a_relative_dataset_without_a_configmap_is_named_with_the_way_out() -> None:
    [problem] = local_only_paths(spec({"data": {"configMap": None}}))
    assert problem.startswith("spec.data.datasets[0].path: 'data/identity.jsonl' is relative")
    assert "--from-file=data/identity.jsonl" in problem and "spec.data.configMap" in problem


def test_a_relative_model_path_never_works_in_a_pod() -> None:
    [problem] = local_only_paths(spec({"model": {"path": "models/smol.gguf"}}))
    assert problem.startswith("spec.model.path: 'models/smol.gguf' is relative")


@pytest.mark.parametrize(
    "paths",
    [
        ("/data/a.jsonl",),  # on a volume
        ("https://example.org/a.jsonl",),
    ],
)
def test_absolute_paths_and_urls_are_left_to_the_pod(paths: tuple[str, ...]) -> None:
    data = datasets(*paths) if paths[0].startswith("/") else {"datasets": [{"url": paths[0]}]}
    assert local_only_paths(spec({"data": data})) == []


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (("../up.jsonl",), "leaves the manifest's directory"),
        (("finetunejob.yaml",), "where pods find the manifest itself"),
        (("data/a b.jsonl",), "cannot be a ConfigMap key"),
        (("x/a.jsonl", "y/a.jsonl"), "have the same file name"),
    ],
)
def test_relative_paths_a_configmap_cannot_carry(paths: tuple[str, ...], expected: str) -> None:
    problems = local_only_paths(spec({"data": datasets(*paths)}))
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_same_file_written_two_ways_is_one_item() -> None:
    one = spec({"data": datasets("./data/a.jsonl", "data/a.jsonl")})
    assert local_only_paths(one) == []
    assert config_map_items(one) == [{"key": "a.jsonl", "path": "data/a.jsonl"}]
