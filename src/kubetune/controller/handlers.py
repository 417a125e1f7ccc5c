"""The kopf layer: thin handlers around one level-triggered `reconcile`.

An event handler (every watch event of a FineTuneJob, and the initial listing after a
restart) only calls `reconcile` early, since a watch event can be missed; a timer calls it
again every few seconds, and it always works out what to do from the objects alone (the
FineTuneJob, its Jobs and pods from kopf indexes) and the previous status. Children are
created with deterministic names; HTTP 409 on create means it already exists, which is
success.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client

from kubetune.api import SpecError, validate_object
from kubetune.api.spec import GROUP, KIND, PLURAL, VERSION
from kubetune.controller import children as ch
from kubetune.controller import status as st
from kubetune.controller.metrics import OperatorMetrics

Obj = dict[str, Any]
log = logging.getLogger("kubetune.operator")
PREFIX = "kubetune.io"
FINALIZER = f"{PREFIX}/finalizer"
MERGE_PATCH = "application/merge-patch+json"
SCRAPE_TIMEOUT = 2.0
WORKERS = 16
"""Threads for reconciles (kopf's executor) and connections to the API server."""
CREATED_GRACE = 60.0
"""Seconds a created Job counts as existing before the index shows it."""


@dataclass
class Config:
    """Everything the handlers need, built by `kubetune operator` (or a test)."""

    settings: ch.Settings = field(default_factory=ch.Settings)
    reconcile_interval: float = 10.0
    """Seconds between level-triggered reconciles of each FineTuneJob."""
    status_interval: float = 5.0
    """Least seconds between two status writes that change only progress numbers."""
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    api: client.ApiClient | None = None


@dataclass
class _State:
    """Per-FineTuneJob memory; nothing here is needed for correctness after a restart."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    status: Obj | None = None  # the last status written (fresher than a watch event's)
    written_at: float = 0.0
    reconciled_at: float = -math.inf
    scraped_at: float = 0.0
    progress: st.Progress | None = None
    created: dict[str, tuple[float, Obj]] = field(default_factory=dict)
    """Jobs created here that the index may not show yet (name: (when, body)): without them a
    reconcile right after the create would create the run's children again (HTTP 409s)."""


class Reconciler:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._states: dict[str, _State] = {}
        self._guard = threading.Lock()

    @property
    def api(self) -> client.ApiClient:
        if self.config.api is None:
            self.config.api = _api_client()
        return self.config.api

    def state(self, uid: str) -> _State:
        with self._guard:
            return self._states.setdefault(uid, _State())

    def forget(self, uid: str) -> None:
        with self._guard:
            self._states.pop(uid, None)
        self.config.metrics.forget(uid)

    def reconcile(
        self,
        body: kopf.Body,
        jobs: Iterable[Obj],
        pods: Iterable[Obj],
        now: datetime,
        unless_within: float | None = None,
    ) -> None:
        """Reconcile one FineTuneJob. With `unless_within` (the timer's safety-net call), skip
        it when another reconcile runs now or finished less than that many seconds ago."""
        uid = body["metadata"]["uid"]
        state = self.state(uid)
        if unless_within is not None:
            if time.monotonic() - state.reconciled_at < unless_within:
                return
            if not state.lock.acquire(blocking=False):
                return  # one is running; it sees what this one would
        else:
            state.lock.acquire()
        started = time.monotonic()
        try:
            self._reconcile(body, state, list(jobs), list(pods), now)
        except Exception:
            self.config.metrics.reconciles.labels(result="error").inc()
            raise
        finally:
            state.reconciled_at = time.monotonic()
            state.lock.release()
            self.config.metrics.reconcile_time.observe(state.reconciled_at - started)
        self.config.metrics.reconciles.labels(result="success").inc()

    def _reconcile(
        self, body: kopf.Body, state: _State, jobs: list[Obj], pods: list[Obj], now: datetime
    ) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        owner = ch.Owner(name, namespace, meta["uid"])
        previous = copy.deepcopy(state.status or dict(body.get("status") or {}))
        generation = int(meta.get("generation") or 1)
        token = (meta.get("annotations") or {}).get(ch.RETRAIN_TOKEN_ANNOTATION)
        document = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": copy.deepcopy(dict(body["spec"])),
        }
        try:
            job = validate_object(document)
        except SpecError as err:
            # The CRD's schema and CEL rules catch nearly all of this at admission; what is
            # left (e.g. a rule the apiserver could not evaluate) is permanent until edited.
            observed = st.Observed(generation, "", "", spec_error=str(err), retrain_token=token)
            self._write(body, state, previous, observed, now)
            return

        run = _choose_run(job, token, previous)
        base = ch.base_name(run)
        jobs = _with_created(state, jobs)
        mine = [j for j in jobs if j["metadata"].get("labels", {}).get(ch.RUN_LABEL) == base]
        stale = [j for j in jobs if j not in mine]
        policy = job.spec.run_policy
        observed = st.Observed(
            generation=generation,
            run=run,
            output_path=ch.run_output_path(job, run),
            backoff_limit=policy.backoff_limit,
            suspend=policy.suspend,
            merge=job.spec.output.merge and job.spec.method.type != "full",
            retrain_token=token,
            jobs=mine,
        )
        if stale or (previous.get("currentRun") or {}).get("id") not in (None, run):
            self._delete_other_runs(owner, base, stale)

        attempt = st.next_attempt(observed, previous)
        if attempt is not None and attempt != observed.attempt:
            created = self._create_run(job, owner, run, attempt, token)
            state.created[created["metadata"]["name"]] = (time.monotonic(), created)
            observed = _with_job(observed, created)
        latest = observed.latest
        if latest is not None:
            self._sync_suspend(job, latest)
            wanted = str(observed.attempt)
            observed = _with_pods(
                observed,
                [p for p in pods if p["metadata"].get("labels", {}).get(ch.RUN_LABEL) == base
                 and p["metadata"]["labels"].get(ch.ATTEMPT_LABEL) == wanted],
            )  # fmt: skip
            observed = _with_progress(observed, self._progress(state, observed.pods))
        status = self._write(body, state, previous, observed, now)
        self._expire(job, owner, status, now)

    # -- children ----------------------------------------------------------------------------

    def _create_run(
        self, job: Any, owner: ch.Owner, run: str, attempt: int, token: str | None
    ) -> Obj:
        core, batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        ns = owner.namespace
        # The client takes plain dicts (typed as its models); Any says so.
        claim: Any = ch.output_claim(job, owner)
        if claim is not None:
            _create(lambda: core.create_namespaced_persistent_volume_claim(ns, claim))
        settings = self.config.settings
        config_map: Any = ch.config_map(job, owner, run)
        service: Any = ch.service(owner, run, settings)
        _create(lambda: core.create_namespaced_config_map(ns, config_map))
        _create(lambda: core.create_namespaced_service(ns, service))
        body: Any = ch.batch_job(job, owner, run, attempt, settings, token)
        created = _create(lambda: batch.create_namespaced_job(ns, body))
        if created:
            kind = "first" if attempt == 1 else "retry"
            self.config.metrics.attempts.labels(kind=kind).inc()
            if attempt == 1:
                self.config.metrics.runs_started.inc()
            log.info("%s/%s: created Job %s", ns, owner.name, body["metadata"]["name"])
        # What the index will show once the watch catches up.
        return dict(body)

    def _sync_suspend(self, job: Any, latest: Obj) -> None:
        """spec.runPolicy.suspend pauses the Job (its pods go, checkpoints stay) and resumes
        it; with a Kueue queue, unsuspending is Kueue's decision alone."""
        suspended = bool((latest.get("spec") or {}).get("suspend"))
        want = job.spec.run_policy.suspend
        if st.job_state(latest) not in ("active", "suspended") or suspended == want:
            return
        if not want and job.spec.resources.queue_name:
            return
        client.BatchV1Api(self.api).patch_namespaced_job(
            latest["metadata"]["name"], latest["metadata"]["namespace"], {"spec": {"suspend": want}}
        )
        latest.setdefault("spec", {})["suspend"] = want

    def _delete_other_runs(self, owner: ch.Owner, base: str, stale: list[Obj]) -> None:
        """A new run replaces the old one: its Job (and pods), Service and ConfigMap go; its
        outputs on the volume stay."""
        core, batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        ns = owner.namespace
        for old in stale:
            _ignore_missing(
                lambda old=old: batch.delete_namespaced_job(
                    old["metadata"]["name"], ns, propagation_policy="Background"
                )
            )
        selector = f"{ch.JOB_LABEL}={owner.name},{ch.RUN_LABEL},{ch.RUN_LABEL}!={base}"
        for service in core.list_namespaced_service(ns, label_selector=selector).items:
            _ignore_missing(lambda s=service: core.delete_namespaced_service(s.metadata.name, ns))
        core.delete_collection_namespaced_config_map(ns, label_selector=selector)

    # -- progress and status -------------------------------------------------------------------

    def _progress(self, state: _State, pods: list[Obj]) -> st.Progress | None:
        """Rank 0's metrics, read at most once per status interval."""
        if time.monotonic() - state.scraped_at < self.config.status_interval:
            return state.progress
        state.scraped_at = time.monotonic()
        url = _metrics_url(pods)
        if url is None:
            return state.progress
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
                state.progress = st.parse_metrics(response.read().decode())
        except (OSError, ValueError) as err:  # not serving yet, or between phases
            log.debug("no metrics from %s: %s", url, err)
        return state.progress

    def _write(
        self, body: kopf.Body, state: _State, previous: Obj, observed: st.Observed, now: datetime
    ) -> Obj:
        status, events = st.compute(observed, previous, now)
        meta = body["metadata"]
        self.config.metrics.set_phase(meta["uid"], status["phase"])
        if status == previous:
            return status
        # Coalesce: progress alone is written at most once per status interval.
        recent = time.monotonic() - state.written_at < self.config.status_interval
        if st.with_progress_only_changed(previous, status) and recent:
            return status
        patch = {"status": {**{k: None for k in previous if k not in status}, **status}}
        objects = client.CustomObjectsApi(self.api)
        objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
            _content_type=MERGE_PATCH,
        )  # fmt: skip
        state.status, state.written_at = status, time.monotonic()
        for event in events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1000])
        self._count(meta, previous, status)
        return status

    def _count(self, meta: Mapping[str, Any], previous: Obj, status: Obj) -> None:
        before, after = previous.get("phase"), status["phase"]
        if before == after:
            return
        metrics = self.config.metrics
        if after == "Succeeded":
            metrics.runs_succeeded.inc()
        elif after == "Failed":
            metrics.runs_failed.inc()
        elif after == "Running" and before in (None, "Pending", "Queued"):
            created = _parse_time(meta.get("creationTimestamp"))
            if created is not None:
                metrics.time_to_running.observe((datetime.now(UTC) - created).total_seconds())

    def _expire(self, job: Any, owner: ch.Owner, status: Obj, now: datetime) -> None:
        """ttlSecondsAfterFinished: delete the FineTuneJob (never its outputs) once it is due."""
        ttl = job.spec.run_policy.ttl_seconds_after_finished
        if ttl is None or status["phase"] not in st.TERMINAL:
            return
        record: Obj = next(
            (r for r in status.get("runs") or [] if r["id"] == status["currentRun"]["id"]), {}
        )
        finished = _parse_time(record.get("finishedAt"))
        if finished is not None and (now - finished).total_seconds() >= ttl:
            log.info("%s/%s: ttlSecondsAfterFinished passed, deleting", owner.namespace, owner.name)
            _ignore_missing(
                lambda: client.CustomObjectsApi(self.api).delete_namespaced_custom_object(
                    GROUP, VERSION, owner.namespace, PLURAL, owner.name
                )
            )


# -- helpers -----------------------------------------------------------------------------------


def _choose_run(job: Any, token: str | None, previous: Obj) -> str:
    """The spec's run id; or, with retrainOnSpecChange off, the current run's, unless the
    retrain token asks for a new one."""
    current = previous.get("currentRun") or {}
    if (
        not job.spec.run_policy.retrain_on_spec_change
        and current.get("id")
        and current.get("retrainToken") == token
    ):
        return str(current["id"])
    return ch.run_id(job.name, job.spec, token)


def _with_created(state: _State, jobs: list[Obj]) -> list[Obj]:
    """The index's Jobs plus those created here that it does not show yet (for a while: one
    deleted before the watch caught up must not be remembered for ever)."""
    seen = {j["metadata"]["name"] for j in jobs}
    expired = time.monotonic() - CREATED_GRACE
    for name, (when, _) in list(state.created.items()):
        if name in seen or when < expired:
            del state.created[name]
    return jobs + [body for _, body in state.created.values()]


def _with_job(observed: st.Observed, job: Obj) -> st.Observed:
    name = job["metadata"]["name"]
    jobs = [j for j in observed.jobs if j["metadata"]["name"] != name] + [job]
    return _replace(observed, jobs=jobs)


def _with_pods(observed: st.Observed, pods: list[Obj]) -> st.Observed:
    return _replace(observed, pods=pods)


def _with_progress(observed: st.Observed, progress: st.Progress | None) -> st.Observed:
    return _replace(observed, progress=progress)


def _replace(observed: st.Observed, **changes: Any) -> st.Observed:
    from dataclasses import replace

    return replace(observed, **changes)


def _metrics_url(pods: list[Obj]) -> str | None:
    for pod in pods:
        index = (pod["metadata"].get("annotations") or {}).get(ch.COMPLETION_INDEX_ANNOTATION)
        status = pod.get("status") or {}
        if index != "0" or status.get("phase") != "Running" or not status.get("podIP"):
            continue
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    return f"http://{status['podIP']}:{port['containerPort']}/metrics"
    return None


def _slim(body: Mapping[str, Any]) -> Obj:
    """What status needs of a Job or pod, for the index: names, labels, annotations, the
    suspend flag, the containers' ports and the status. Whole bodies (pod templates, managed
    fields) would cost the operator hundreds of megabytes with a few hundred jobs."""
    meta = body["metadata"]
    spec = body.get("spec") or {}
    slim: Obj = {
        "metadata": {
            k: copy.deepcopy(meta[k]) for k in ("name", "namespace", "labels", "annotations")
            if k in meta
        },
        "spec": {},
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }  # fmt: skip
    if "suspend" in spec:
        slim["spec"]["suspend"] = spec["suspend"]
    if "containers" in spec:
        slim["spec"]["containers"] = [
            {"name": c.get("name"), "ports": copy.deepcopy(c.get("ports") or [])}
            for c in spec["containers"]
        ]
    return slim


def _create(call: Any) -> bool:
    """Create; True if this call created it, False if it already existed (HTTP 409)."""
    try:
        call()
    except client.ApiException as err:
        if err.status == 409:
            return False
        raise
    return True


def _ignore_missing(call: Any) -> None:
    try:
        call()
    except client.ApiException as err:
        if err.status != 404:
            raise


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _api_client() -> client.ApiClient:
    from kubernetes import config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # A pool smaller than the threads discards connections (new TLS handshakes each time).
    configuration.connection_pool_maxsize = WORKERS
    return client.ApiClient(configuration)


# -- registration --------------------------------------------------------------------------------


def build_registry(config: Config) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers, bound to `config`."""
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(config)
    resource = (GROUP, VERSION, PLURAL)
    children = {ch.JOB_LABEL: kopf.PRESENT}

    def configure(**kwargs: Any) -> None:
        # The client imports its API modules on first use: CoreV1Api is 4 MB of Python,
        # seconds of compiling that would otherwise land in the first reconciles.
        for api in (client.CoreV1Api, client.BatchV1Api, client.CustomObjectsApi):
            api(reconciler.api)
        settings: kopf.OperatorSettings = kwargs["settings"]
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PREFIX, key="last-handled-configuration"
        )
        settings.posting.level = logging.INFO
        # Reconnect a watch now and then: a silently dead connection cannot stall us long.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # Reconciles are threads that mostly wait on the API server; one connection each.
        settings.execution.max_workers = WORKERS

    async def index_children(**kwargs: Any) -> Any:
        # async: it runs on kopf's event loop at once, never queued in the thread pool
        # behind reconciles that wait on the API server.
        key = (kwargs["namespace"], kwargs["labels"][ch.JOB_LABEL])
        return {key: _slim(kwargs["body"])}

    def reconcile(unless_within: float | None = None, **kwargs: Any) -> None:
        body: kopf.Body = kwargs["body"]
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        jobs = list(kwargs["index_jobs"].get(key, []))
        pods = list(kwargs["index_pods"].get(key, []))
        reconciler.reconcile(body, jobs, pods, datetime.now(UTC), unless_within)

    def tick(**kwargs: Any) -> None:
        # The safety net: not needed right after an event's reconcile (half an interval).
        reconcile(unless_within=config.reconcile_interval / 2, **kwargs)

    def react(**kwargs: Any) -> None:
        """Every watch event of a FineTuneJob (including the initial listing after a restart)
        reconciles it. An event handler, not create/update/resume ones: those make kopf write
        a diff-base annotation after each change, a write per job that a level-triggered
        reconcile does not need."""
        body: kopf.Body = kwargs["body"]
        meta = body["metadata"]
        if kwargs.get("type") == "DELETED":
            # Children go by garbage collection (owner references); outputs stay.
            reconciler.forget(meta["uid"])
        elif meta.get("deletionTimestamp"):
            return
        elif FINALIZER in (meta.get("finalizers") or []):
            reconcile(**kwargs)
        # else: kopf adds its finalizer (for the timer) right after this handler, with a
        # resourceVersion precondition that a status write now would break (a conflict, and
        # a second PATCH); the finalizer's own watch event brings us back here.

    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.index("batch", "v1", "jobs", labels=children, registry=registry, id="index_jobs")(
        index_children
    )
    kopf.index("", "v1", "pods", labels=children, registry=registry, id="index_pods")(
        index_children
    )
    kopf.on.event(*resource, registry=registry, id="react")(react)
    kopf.timer(*resource, interval=config.reconcile_interval, registry=registry, id="reconcile")(
        tick
    )
    return registry
