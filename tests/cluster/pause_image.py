"""The real node's sandbox ("pause") image, written as an OCI archive without a builder.

No registry is reachable here, so the sandbox image is made from the `pause` binary that
tests/cluster/go/pause builds; the name only has to match what containerd's CRI config asks
for (node.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from tests.cluster.controlplane import bin_dir

PAUSE_IMAGE = "registry.k8s.io/pause:kubetune"


def write_pause_archive(path: Path) -> Path:
    """The sandbox image as an OCI archive: one layer holding the pause binary built from
    tests/cluster/go/pause. Written byte-for-byte deterministically (fixed times and owners), so
    its ID, stored next to it like the images' IDs, changes only when the binary does."""
    binary = (bin_dir() / "pause").read_bytes()
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = len(binary), 0o755, 0
        tar.addfile(info, io.BytesIO(binary))
    layer_bytes = layer.getvalue()
    config = _json_bytes(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer_bytes)]},
        }
    )
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar", layer_bytes)],
        }
    )
    manifest_ref = _descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
    manifest_ref["annotations"] = {"org.opencontainers.image.ref.name": PAUSE_IMAGE}
    index = _json_bytes({"schemaVersion": 2, "manifests": [manifest_ref]})
    files = {"oci-layout": _json_bytes({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for blob in (layer_bytes, config, manifest):
        files["blobs/sha256/" + _digest(blob).removeprefix("sha256:")] = blob
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    path.with_name(path.name.replace(".oci.tar", ".id")).write_text(_digest(config))
    return path


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}
