"""What follows a status change: the Event about it, the operator's counters, and the
deletion of a finished FineTuneJob once its ttlSecondsAfterFinished has passed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from kubetune.api.spec import GROUP, KIND, PLURAL, VERSION
from kubetune.controller import children as ch
from kubetune.controller import status as st
from kubetune.controller.metrics import OperatorMetrics
from kubetune.controller.sync import REQUEST_TIMEOUT

Obj = dict[str, Any]
log = logging.getLogger("kubetune.operator")


def post_event(api: client.ApiClient, meta: Mapping[str, Any], event: st.Transition) -> None:
    """A Kubernetes Event about the FineTuneJob (posted here, not by kopf: reconciles
    also run outside kopf's handlers)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body: Any = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1000],
        "source": {"component": "kubetune-operator"},
        "reportingComponent": "kubetune.io/operator",
        "firstTimestamp": stamp[:19] + "Z",
        "lastTimestamp": stamp[:19] + "Z",
        "count": 1,
    }
    try:
        client.CoreV1Api(api).create_namespaced_event(
            meta["namespace"], body, _request_timeout=REQUEST_TIMEOUT
        )
    except client.ApiException as err:  # an Event is never worth a failed reconcile
        log.warning("cannot post the Event %s: HTTP %s %s", event.reason, err.status, err.body)


def count(metrics: OperatorMetrics, meta: Mapping[str, Any], previous: Obj, status: Obj) -> None:
    """The operator's run counters and time-to-running, on a phase change."""
    before, after = previous.get("phase"), status["phase"]
    if before == after:
        return
    if after == "Succeeded":
        metrics.runs_succeeded.inc()
    elif after == "Failed":
        metrics.runs_failed.inc()
    elif after == "Running" and before in (None, "Pending", "Queued"):
        created = st.parse_time(meta.get("creationTimestamp"))
        if created is not None:
            metrics.time_to_running.observe((datetime.now(UTC) - created).total_seconds())


def expire(
    api: client.ApiClient,
    body: Mapping[str, Any],
    job: Any,
    owner: ch.Owner,
    status: Obj,
    now: datetime,
) -> None:
    """ttlSecondsAfterFinished: delete the FineTuneJob (never its outputs) that long after
    it became Succeeded or Failed (its condition's transition, so a revert to a run that
    finished long ago is not deleted at once)."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    if ttl is None or status["phase"] not in st.TERMINAL:
        return
    condition = next(c for c in status["conditions"] if c["type"] == status["phase"])
    finished = st.parse_time(condition.get("lastTransitionTime"))
    if finished is None or (now - finished).total_seconds() < ttl:
        return
    log.info("%s/%s: ttlSecondsAfterFinished passed, deleting", owner.namespace, owner.name)
    # Preconditions: this very object, unchanged since we read it (an edit of the TTL a
    # moment ago is honoured on the next reconcile).
    version = body["metadata"].get("resourceVersion")
    options = client.V1DeleteOptions(
        preconditions=client.V1Preconditions(uid=owner.uid, resource_version=version)
    )
    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, owner.namespace, PLURAL, owner.name, body=options,
            _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
    except client.ApiException as err:
        if err.status not in (404, 409):
            raise
