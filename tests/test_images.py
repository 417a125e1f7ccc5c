"""The OCI archives `make images` writes (dist/images): what the images declare, read from
the archives themselves; and that a clean rebuild gives the same image. What the images do
when run is proven on the real node (tests/controller/test_real_node.py)."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kubetune import __version__

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "dist" / "images"


def image_config(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index entry, image config) of dist/images/<name>.oci.tar."""
    archive = IMAGES / f"{name}.oci.tar"
    if not archive.exists():
        pytest.fail(f"{archive} is missing: run `make images`")
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> dict[str, Any]:
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None
            loaded: dict[str, Any] = json.load(member)
            return loaded

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        entry = json.load(index_file)["manifests"][0]
        manifest = blob(entry["digest"])
        return entry, blob(manifest["config"]["digest"])


@pytest.mark.parametrize("name", ["trainer", "operator"])
def test_image_runs_kubetune_as_a_fixed_non_root_user(name: str) -> None:
    entry, config = image_config(name)
    ref = entry["annotations"]["org.opencontainers.image.ref.name"]
    assert ref == f"ghcr.io/kubetune/{name}:{__version__}"
    run = config["config"]
    # Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
    assert run["User"] == "65532:65532"
    assert run["Entrypoint"] == ["kubetune"]
    env = dict(item.split("=", 1) for item in run["Env"])
    # Every cache a run writes points into /tmp, the one writable place besides the volumes.
    for key in ("HOME", "HF_HOME", "KUBETUNE_CACHE", "TRITON_CACHE_DIR"):
        assert env[key].startswith("/tmp"), (key, env[key])
    # Build settings stay build settings.
    assert not {k for k in env if k.startswith("UV_") or k == "SOURCE_DATE_EPOCH"}
    assert config["created"].startswith("1970-01-01"), "image time not fixed: not reproducible"


def test_operator_image_has_no_pytorch() -> None:
    """The operator image installs images/lock/operator.txt: no torch, no CUDA."""
    _, config = image_config("operator")
    steps = " ".join(h.get("created_by", "") for h in config["history"])
    assert "operator.txt" in steps and "trainer.txt" not in steps
    lock = (REPO / "images" / "lock" / "operator.txt").read_text()
    assert "torch==" not in lock and "nvidia-" not in lock


@pytest.mark.slow
def test_a_clean_rebuild_gives_the_same_image() -> None:
    """Same inputs, same digest: the operator image rebuilt without buildah's layer cache
    has the image ID of the cached one (the trainer's install is the same recipe, but takes
    minutes)."""
    result = subprocess.run(
        [str(REPO / "images" / "build.sh"), "--check-reproducible", "operator"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean rebuild" in result.stdout
