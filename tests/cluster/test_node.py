"""The real node's own parts that need no running node: the runtime versions it accepts and
the sandbox image it writes. (The node at work: tests/controller/test_real_node.py, and its
tear-down: test_teardown.py.)"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.cluster import node
from tests.cluster.pause_image import PAUSE_IMAGE, write_pause_archive


def test_runtimes_at_other_versions_than_pinned_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert node._unpinned_runtimes() == []  # this host's, as pinned in go/versions.env
    pinned = {"CONTAINERD_VERSION": "0.0.1", "RUNC_VERSION": "0.0.2"}
    monkeypatch.setattr(node, "read_versions", lambda: pinned)
    containerd, runc = node._unpinned_runtimes()
    assert containerd.startswith("containerd 0.0.1 (found ") and "versions.env" in containerd
    assert runc.startswith("runc 0.0.2 (found ")


def test_the_sandbox_image_archive_is_deterministic(tmp_path: Path) -> None:
    first = write_pause_archive(tmp_path / "a.oci.tar").read_bytes()
    second = write_pause_archive(tmp_path / "b.oci.tar").read_bytes()
    assert first == second
    with tarfile.open(tmp_path / "a.oci.tar") as tar:
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        [entry] = json.load(index_file)["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == PAUSE_IMAGE
    assert (tmp_path / "a.id").read_text().startswith("sha256:")
