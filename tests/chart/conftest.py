"""The operator tests' fixtures the chart tests share: the CRD installed from crds/ and the
tiny model."""

from tests.controller.conftest import ftj_crd_installed, tiny_model

__all__ = ["ftj_crd_installed", "tiny_model"]
