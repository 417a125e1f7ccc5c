"""Making a run's children exist, and removing other runs' — by owner UID, never by name alone.

A 409 on create is success only when the existing object is this FineTuneJob's. An orphan
that carries this job's labels (its owner was deleted with `--cascade=orphan`) is adopted, as
Kubernetes' ControllerRefManager does; one held by another owner (a FineTuneJob of the same
name deleted moments ago, its children not yet garbage-collected) is waited for; anything
else is a conflict a person must resolve.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from kubernetes import client

from kubetune.api.pod_paths import config_map_items
from kubetune.controller import children as ch
from kubetune.controller import pods
from kubetune.controller import status as st
from kubetune.controller.metrics import OperatorMetrics

Obj = dict[str, Any]
log = logging.getLogger("kubetune.operator")
REQUEST_TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds of every API call: a half-open connection costs one timeout, never
a reconcile lock held for ever."""


class DataNotReady(Exception):
    """The ConfigMap that `spec.data.configMap` names is missing or lacks a dataset's file:
    no Job is created (its pods would wait on the mount for ever); checked again at every
    reconcile, so creating or fixing the ConfigMap lets the run start."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ChildConflict(Exception):
    """A child's name is taken by an object that is not this FineTuneJob's."""

    def __init__(self, message: str, resolves: bool) -> None:
        super().__init__(message)
        self.resolves = resolves
        """True when the garbage collector will free the name (another owner holds it)."""

    @property
    def reason(self) -> str:
        return "ChildNameTaken" if self.resolves else "ChildNameConflict"


def owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


class Children:
    """The API calls that create, adopt, suspend and delete a FineTuneJob's children."""

    def __init__(
        self, api: client.ApiClient, settings: ch.Settings, metrics: OperatorMetrics
    ) -> None:
        self.api, self.settings, self.metrics = api, settings, metrics

    def create_run(
        self,
        job: Any,
        owner: ch.Owner,
        run: str,
        attempt: int,
        token: str | None,
        recreated: bool = False,
    ) -> Obj:
        """The run's claim, ConfigMap, Service and the attempt's Job; returns the Job (as
        created, or as rendered when it existed already). `recreated`: the same attempt again
        after a disruption (counted apart from first tries and retries)."""
        core, batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        ns = owner.namespace
        self._check_data(job, ns)
        # The client takes plain dicts (typed as its models); Any says so.
        claim: Any = ch.output_claim(job, owner)
        if claim is not None:
            # Never owned: an earlier FineTuneJob's claim of the same name is this one's too.
            self._create(partial(core.create_namespaced_persistent_volume_claim, ns, claim))
        config_map: Any = ch.config_map(job, owner, run)
        service: Any = ch.service(owner, run, self.settings)
        name = config_map["metadata"]["name"]
        self._create(
            partial(core.create_namespaced_config_map, ns, config_map),
            partial(core.read_namespaced_config_map, name, ns),
            partial(core.patch_namespaced_config_map, name, ns),
            owner,
        )
        self._create(
            partial(core.create_namespaced_service, ns, service),
            partial(core.read_namespaced_service, name, ns),
            partial(core.patch_namespaced_service, name, ns),
            owner,
        )
        body: Any = pods.batch_job(job, owner, run, attempt, self.settings, token)
        job_name = body["metadata"]["name"]
        created = self._create(
            partial(batch.create_namespaced_job, ns, body),
            partial(batch.read_namespaced_job, job_name, ns),
            partial(batch.patch_namespaced_job, job_name, ns),
            owner,
            partial(batch.delete_namespaced_job, job_name, ns, propagation_policy="Background"),
        )
        if created is None:
            return dict(body)  # ours already (HTTP 409); the index shows it soon
        kind = "recreated" if recreated else "first" if attempt == 1 else "retry"
        self.metrics.attempts.labels(kind=kind).inc()
        if attempt == 1 and not recreated:
            self.metrics.runs_started.inc()
        log.info("%s/%s: created Job %s", ns, owner.name, job_name)
        return created

    def _create(
        self,
        create: Callable[..., Any],
        read: Callable[..., Any] | None = None,
        adopt: Callable[..., Any] | None = None,
        owner: ch.Owner | None = None,
        delete: Callable[..., Any] | None = None,
    ) -> Obj | None:
        """Create; the object as created, or None if it already existed (HTTP 409) and is
        (now) ours. ChildConflict if another owner holds it."""
        try:
            return self.plain(create(_request_timeout=REQUEST_TIMEOUT))
        except client.ApiException as err:
            if err.status != 409:
                raise
        if read is None or adopt is None or owner is None:
            return None
        existing = self.plain(read(_request_timeout=REQUEST_TIMEOUT))
        if owned_by(existing, owner.uid):
            return None
        meta = existing["metadata"]
        holders = [r.get("uid") for r in meta.get("ownerReferences") or []]
        kind, name = existing.get("kind") or "object", meta["name"]
        labels = meta.get("labels") or {}
        finished_badly = st.job_state(existing) in ("failed", "rejected", "deadline")
        if not holders and labels.get(ch.JOB_LABEL) == owner.name and finished_badly:
            # A failed orphan would spend an attempt of this object's: delete it, wait.
            if delete is not None:
                _ignore_missing(partial(delete, _request_timeout=REQUEST_TIMEOUT))
            raise ChildConflict(f"{kind} {name}: deleting a failed orphan", resolves=True)
        if not holders and labels.get(ch.JOB_LABEL) == owner.name:
            # An orphan of this job's name (owner deleted with --cascade=orphan), unfinished
            # or complete: adopt it, as Kubernetes' ControllerRefManager does.
            patch = {"metadata": {"ownerReferences": [owner.reference()],
                                  "resourceVersion": meta.get("resourceVersion")}}  # fmt: skip
            adopt(patch, _request_timeout=REQUEST_TIMEOUT)
            log.info("%s/%s: adopted the orphaned %s %s", owner.namespace, owner.name, kind, name)
            return None
        if holders:
            raise ChildConflict(
                f"{kind} {name} already exists and belongs to {holders}, not to this "
                f"FineTuneJob (uid {owner.uid}); waiting for the garbage collector (a "
                "FineTuneJob of the same name was deleted moments ago)",
                resolves=True,
            )
        raise ChildConflict(
            f"{kind} {name} already exists and was not created by kubetune for this "
            "FineTuneJob; delete or rename it",
            resolves=False,
        )

    def plain(self, obj: Any) -> Obj:
        plain: Obj = self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        return plain

    def _check_data(self, job: Any, ns: str) -> None:
        name, items = job.spec.data.config_map, config_map_items(job.spec)
        if name is None or not items:
            return
        try:
            found = client.CoreV1Api(self.api).read_namespaced_config_map(
                name, ns, _request_timeout=REQUEST_TIMEOUT
            )
        except client.ApiException as err:
            if err.status != 404:
                raise
            raise DataNotReady(
                "DataConfigMapMissing",
                f"spec.data.configMap: ConfigMap {name!r} not found in namespace {ns}; create "
                f"it from the dataset files (kubectl apply -k, or kubectl create configmap "
                f"{name} --from-file=FILE)",
            ) from None
        keys = {*(found.data or {}), *(found.binary_data or {})}
        missing = [f"{i['key']!r} (for {i['path']})" for i in items if i["key"] not in keys]
        if missing:
            raise DataNotReady(
                "DataConfigMapIncomplete",
                f"spec.data.configMap: ConfigMap {name!r} has no key {', '.join(missing)}; "
                f"its keys: {', '.join(sorted(keys)) or 'none'}",
            )

    def sync_suspend(self, job: Any, latest: Obj) -> Obj | None:
        """spec.runPolicy.suspend pauses the Job (its pods go, checkpoints stay) and resumes
        it. Returns the Job as it is now (a copy: the index's objects are never changed
        here), or None when it was deleted.

        With a Kueue queue, (un)suspending a Job is Kueue's alone (it unsuspends an admitted
        workload's Job, and would undo ours): suspending deletes the attempt's Job instead,
        and resuming creates it again (the same attempt, from the newest checkpoint)."""
        suspended = bool((latest.get("spec") or {}).get("suspend"))
        want = job.spec.run_policy.suspend
        if st.job_state(latest) not in ("active", "suspended"):
            return latest
        meta = latest["metadata"]
        if job.spec.resources.queue_name:
            if not want:
                return latest
            self.stop_attempt(latest)
            return None
        if suspended == want:
            return latest
        client.BatchV1Api(self.api).patch_namespaced_job(
            meta["name"], meta["namespace"], {"spec": {"suspend": want}},
            _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        return {**latest, "spec": {**(latest.get("spec") or {}), "suspend": want}}

    def stop_attempt(self, latest: Obj, why: str | None = None) -> None:
        """Delete an attempt's Job so that the same attempt can be created again whole.
        Foreground: the Job stays (deleting) until its pods are gone, so the new one cannot
        start a second trainer beside a dying one on the same checkpoints. `why` (a
        disruption) is annotated first: it outlasts the disrupted pod."""
        meta = latest["metadata"]
        if why is not None:
            _ignore_missing(
                partial(
                    client.BatchV1Api(self.api).patch_namespaced_job,
                    meta["name"],
                    meta["namespace"],
                    {"metadata": {"annotations": {ch.DISRUPTED_ANNOTATION: why[:1024]}}},
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )
        _ignore_missing(
            partial(
                client.BatchV1Api(self.api).delete_namespaced_job,
                meta["name"],
                meta["namespace"],
                propagation_policy="Foreground",
                _request_timeout=REQUEST_TIMEOUT,
            )
        )

    def prune(self, owner: ch.Owner, jobs: list[Obj]) -> None:
        """Delete old failed attempts' Jobs (and their pods)."""
        batch = client.BatchV1Api(self.api)
        for old in jobs:
            _ignore_missing(
                partial(
                    batch.delete_namespaced_job,
                    old["metadata"]["name"],
                    owner.namespace,
                    propagation_policy="Background",
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def delete_other_runs(self, owner: ch.Owner, base: str, stale: list[Obj]) -> None:
        """A new run replaces the old one: its Jobs (and pods), Service and ConfigMap go; its
        outputs and checkpoints on the volume stay. Only this FineTuneJob's, by UID."""
        core, batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        ns = owner.namespace
        timeout: dict[str, Any] = {"_request_timeout": REQUEST_TIMEOUT}
        for old in stale:
            _ignore_missing(
                partial(
                    batch.delete_namespaced_job,
                    old["metadata"]["name"],
                    ns,
                    propagation_policy="Background",
                    **timeout,
                )
            )
        selector = f"{ch.JOB_LABEL}={owner.name},{ch.RUN_LABEL},{ch.RUN_LABEL}!={base}"
        listings: list[tuple[Any, Any]] = [
            (core.list_namespaced_service, core.delete_namespaced_service),
            (core.list_namespaced_config_map, core.delete_namespaced_config_map),
        ]
        for listed, delete in listings:
            for item in listed(ns, label_selector=selector, **timeout).items:
                meta = item.metadata
                if any(r.uid == owner.uid for r in meta.owner_references or []):
                    _ignore_missing(partial(delete, meta.name, ns, **timeout))


def rejection(err: client.ApiException) -> tuple[str, str]:
    """(reason, message) for a create the API server refused: a quota, or admission (RBAC,
    a webhook, Pod Security, a LimitRange)."""
    try:
        message = str(json.loads(err.body or "{}").get("message") or err.reason)
    except ValueError:
        message = str(err.reason)
    reason = "ExceededQuota" if "exceeded quota" in message else "CreateRejected"
    return reason, f"creating the run's children: HTTP {err.status}: {message}"[:1000]


def _ignore_missing(call: Callable[[], Any]) -> None:
    try:
        call()
    except client.ApiException as err:
        if err.status != 404:
            raise


def api_client(workers: int = 32) -> client.ApiClient:
    """The operator's client; `workers` connections (kopf's 16 threads and the safety
    net's 16)."""
    from kubernetes import config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # A pool smaller than the threads discards connections (new TLS handshakes each time).
    configuration.connection_pool_maxsize = workers
    # TCP keep-alive: a connection the apiserver or a load balancer dropped silently is noticed.
    configuration.keep_alive = True
    return client.ApiClient(configuration)
