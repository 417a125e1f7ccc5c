"""Installing a CRD in the test control plane and waiting until it is served."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubernetes import client

from tests.cluster.procs import wait_until


def install_crd(api: client.ApiClient, path: Path) -> str:
    """Applies the CRD at `path` (created, or replaced when an older copy is there), waits for
    Established and for its resource to be served; returns the CRD's name."""
    ext = client.ApiextensionsV1Api(api)
    manifest = yaml.safe_load(path.read_text())
    name = str(manifest["metadata"]["name"])
    try:
        ext.create_custom_resource_definition(manifest)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        current = ext.read_custom_resource_definition(name)
        manifest["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(name, manifest)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(name)
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_until(f"CRD {name} Established", established, 60)
    spec = manifest["spec"]
    group, plural = spec["group"], spec["names"]["plural"]
    version = next(v["name"] for v in spec["versions"] if v.get("served"))
    objects = client.CustomObjectsApi(api)
    # Established can precede discovery by a moment; a list call proves the resource is served.
    wait_until(
        f"{plural} served",
        lambda: objects.list_cluster_custom_object(group, version, plural) or True,
        30,
    )
    return name
