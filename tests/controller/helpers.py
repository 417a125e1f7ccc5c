"""Building and watching FineTuneJobs in operator tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from kubetune.controller import children as ch
from tests.cluster.procs import wait_until
from tests.controller.conftest import GROUP, PLURAL, VERSION, Operator, ftj
from tests.trainer.jobs import EXAMPLES, merged


def quickstart(
    model: Path, name: str = "quickstart", changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """examples/quickstart.yaml on a tiny random model, a few steps long, data paths absolute."""
    manifest = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    for source in manifest["spec"]["data"]["datasets"]:
        source["path"] = str((EXAMPLES / source["path"]).resolve())
    tiny = {
        "metadata": {"name": name},
        "spec": {
            "model": {"path": str(model)},
            "data": {"validationSplit": 0},
            "training": {"maxSteps": 4, "epochs": None, "saveSteps": 2, "loggingSteps": 1,
                         "batchSizePerDevice": 4},
            "evaluation": {"samplePrompts": ["Who are you?"], "everyFraction": None,
                           "maxNewTokens": 4},
            "output": {"claimTemplate": {"size": "1Gi"}},
        },
    }  # fmt: skip
    return merged(merged(manifest, tiny), changes or {})


def create(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )


def wait_phase(
    api: client.ApiClient, ns: str, name: str, phase: str, operator: Operator, timeout: float
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = ftj(api, ns, name)
        return obj if (obj.get("status") or {}).get("phase") == phase else None

    try:
        return wait_until(f"{name} {phase}", reached, timeout, interval=0.5, alive=operator.alive)
    except (TimeoutError, RuntimeError) as err:
        status = ftj(api, ns, name).get("status") or {}
        raise AssertionError(
            f"{err}\nstatus: {json.dumps(status, indent=1)}\n{operator.tail()}"
        ) from None


def labelled(api: client.ApiClient, ns: str, name: str) -> dict[str, list[str]]:
    selector = f"{ch.JOB_LABEL}={name}"
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    opts = {"label_selector": selector}
    return {
        "jobs": sorted(j.metadata.name for j in batch.list_namespaced_job(ns, **opts).items),
        "services": sorted(s.metadata.name for s in core.list_namespaced_service(ns, **opts).items),
        "configmaps": sorted(
            c.metadata.name for c in core.list_namespaced_config_map(ns, **opts).items
        ),
    }
