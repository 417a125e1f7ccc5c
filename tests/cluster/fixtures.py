"""Session-scoped pytest fixtures for the tier-3 test cluster.

Enable with ``pytest_plugins = ["tests.cluster.fixtures"]`` in tests/conftest.py.

- ``cluster``: the running ``LocalCluster`` (control plane, kwok GPU nodes, pod runner); started
  once per session on first use (~10-20 s once the binaries are built; builds them if missing).
- ``cluster_api``: a ``kubernetes.client.ApiClient`` on the admin kubeconfig.
- ``cluster_kubeconfig``: path of the admin kubeconfig (for kubectl, helm, kopf subprocesses).
- ``cluster_namespace``: a fresh namespace per test (with its default ServiceAccount), deleted
  after the test.
- ``real_node``: a real kubelet + containerd node with the built images (node.py), started on
  first use; ``real_namespace``: a fresh namespace whose pods run there, under the restricted
  Pod Security standard.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.cluster.harness import LocalCluster
from tests.cluster.node import REAL_NODE_LABEL, RealNode


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    logging.getLogger("kubetune.podrunner").setLevel(logging.INFO)
    local = LocalCluster()
    # addfinalizer before start(): a failed or interrupted start is torn down too.
    request.addfinalizer(local.stop)
    local.start()
    yield local


@pytest.fixture(scope="session")
def cluster_api(cluster: LocalCluster) -> client.ApiClient:
    return cluster.api()


@pytest.fixture(scope="session")
def cluster_kubeconfig(cluster: LocalCluster) -> Path:
    return cluster.kubeconfig


@pytest.fixture
def cluster_namespace(cluster: LocalCluster) -> Iterator[str]:
    with cluster.namespace() as name:
        yield name


IMAGES = Path(__file__).resolve().parents[2] / "dist" / "images"


@pytest.fixture(scope="session")
def real_node(cluster: LocalCluster) -> Iterator[RealNode]:
    """A real kubelet + containerd node joined to the session's cluster, holding the images
    that `make images` built; started on first use (about 10 s warm, plus a minute or two
    for each image imported for the first time)."""
    archives = [IMAGES / f"{name}.oci.tar" for name in ("trainer", "operator")]
    missing = [str(a) for a in archives if not a.exists()]
    if missing:
        pytest.fail(f"the real node needs the images: run `make images` ({', '.join(missing)})")
    node = RealNode(cluster.control_plane, cluster.work_dir / "real-0", image_archives=archives)
    try:
        node.start()
        yield node
    finally:
        node.stop()
    left = node.leftovers()
    assert not left, f"the real node left on the host: {left}"


@pytest.fixture
def real_namespace(cluster: LocalCluster, real_node: RealNode) -> Iterator[str]:
    """A fresh namespace whose pods run on the real node, under the restricted Pod Security
    standard (enforced, not only warned)."""
    labels = {REAL_NODE_LABEL: "true", "pod-security.kubernetes.io/enforce": "restricted"}
    with cluster.namespace("real", labels=labels) as name:
        yield name
