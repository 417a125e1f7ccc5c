"""One level-triggered reconcile of a FineTuneJob: choose its run, make the run's children
exist, and write the status computed from what exists.

It works out everything from the objects alone (the FineTuneJob, its Jobs and pods from the
operator's indexes) and the previous status, so a reconcile may run at any time, any number of
times, and an operator restarted at any moment carries on. Children belong to a FineTuneJob by
owner reference UID, never by name alone: a FineTuneJob deleted and created again under the
same name neither adopts nor trips over what the old one left for the garbage collector.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

from kubernetes import client

from kubetune.api import SpecError, validate_object
from kubetune.api.spec import GROUP, KIND, PLURAL, VERSION
from kubetune.controller import children as ch
from kubetune.controller import runs
from kubetune.controller import status as st
from kubetune.controller.metrics import OperatorMetrics
from kubetune.controller.progress import Progress, ScrapeError, parse_metrics, scrape

Obj = dict[str, Any]
log = logging.getLogger("kubetune.operator")
JSON_PATCH = "application/json-patch+json"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"  # set by the Job controller
CREATED_GRACE = 60.0
"""Seconds a created Job counts as existing before the index shows it."""


@dataclass
class Config:
    """Everything the handlers need, built by `kubetune operator` (or a test)."""

    settings: ch.Settings = field(default_factory=ch.Settings)
    reconcile_interval: float = 10.0
    """Seconds between safety-net reconciles of an unfinished FineTuneJob (events drive the
    rest: the FineTuneJob's own, and its Jobs' and pods')."""
    finished_interval: float = 300.0
    """Seconds between safety-net reconciles of a Succeeded or Failed one."""
    status_interval: float = 5.0
    """Least seconds between two status writes that change only progress numbers."""
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    api: client.ApiClient | None = None


@dataclass
class _State:
    """Per-FineTuneJob memory; nothing here is needed for correctness after a restart."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    dirty: bool = False
    """A reconcile was asked for while one ran: run again when it ends."""
    status: Obj | None = None  # the last status written (fresher than a watch event's)
    written_at: float = 0.0
    reconciled_at: float = 0.0
    scraped_at: float = 0.0
    progress: Progress | None = None
    progress_of: tuple[str, int] | None = None
    """The (run, attempt) that `progress` was scraped from."""
    created: dict[str, tuple[float, Obj]] = field(default_factory=dict)
    """Jobs created here that the index may not show yet (name: (when, body)): without them a
    reconcile right after the create would create the run's children again (HTTP 409s)."""


class ForeignChild(Exception):
    """A child's name is taken by an object that another owner holds."""


Indexes = Callable[[str, str], tuple[list[Obj], list[Obj]]]
"""(namespace, FineTuneJob name) -> (its Jobs, its pods), as the operator's indexes hold them."""


class Reconciler:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._states: dict[str, _State] = {}
        self._bodies: dict[str, Mapping[str, Any]] = {}
        self._uids: dict[tuple[str, str], str] = {}
        self._guard = threading.Lock()

    @property
    def api(self) -> client.ApiClient:
        if self.config.api is None:
            self.config.api = api_client()
        return self.config.api

    def state(self, uid: str) -> _State:
        with self._guard:
            return self._states.setdefault(uid, _State())

    def forget(self, uid: str) -> None:
        with self._guard:
            self._states.pop(uid, None)
        self.config.metrics.forget(uid)

    def idle_for(self, uid: str) -> float:
        """Seconds since this FineTuneJob's last reconcile ended (inf: never)."""
        with self._guard:
            state = self._states.get(uid)
        return float("inf") if state is None else time.monotonic() - state.reconciled_at

    def seen(self, body: Mapping[str, Any]) -> None:
        """Remember the newest body of a FineTuneJob (from its watch events)."""
        meta = body["metadata"]
        with self._guard:
            self._bodies[meta["uid"]] = body
            self._uids[(meta["namespace"], meta["name"])] = meta["uid"]

    def gone(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        with self._guard:
            self._bodies.pop(meta["uid"], None)
            if self._uids.get((meta["namespace"], meta["name"])) == meta["uid"]:
                del self._uids[(meta["namespace"], meta["name"])]
        self.forget(meta["uid"])

    def uid_of(self, namespace: str, name: str) -> str | None:
        with self._guard:
            return self._uids.get((namespace, name))

    def known(self) -> list[Mapping[str, Any]]:
        with self._guard:
            return list(self._bodies.values())

    def request(self, uid: str, indexes: Indexes) -> None:
        """Reconcile the FineTuneJob now; if a reconcile of it is running, make that one run
        once more instead of waiting (a burst of pod events costs one or two reconciles,
        never a blocked worker)."""
        state = self.state(uid)
        if not state.lock.acquire(blocking=False):
            state.dirty = True
            return
        try:
            while True:
                state.dirty = False
                with self._guard:
                    body = self._bodies.get(uid)
                if body is None:
                    return
                meta = body["metadata"]
                jobs, pods = indexes(meta["namespace"], meta["name"])
                self._timed(body, state, jobs, pods)
                if not state.dirty:
                    return
        finally:
            state.lock.release()

    def reconcile(
        self, body: Mapping[str, Any], jobs: Iterable[Obj], pods: Iterable[Obj], now: datetime
    ) -> None:
        """Reconcile one FineTuneJob with the given children (waits for a running one)."""
        state = self.state(body["metadata"]["uid"])
        with state.lock:
            self._timed(body, state, list(jobs), list(pods), now)

    def _timed(
        self,
        body: Mapping[str, Any],
        state: _State,
        jobs: list[Obj],
        pods: list[Obj],
        now: datetime | None = None,
    ) -> None:
        started = time.monotonic()
        try:
            self._reconcile(body, state, jobs, pods, now or datetime.now(UTC))
        except Exception:
            self.config.metrics.reconciles.labels(result="error").inc()
            raise
        finally:
            state.reconciled_at = time.monotonic()
            self.config.metrics.reconcile_time.observe(state.reconciled_at - started)
        self.config.metrics.reconciles.labels(result="success").inc()

    def _reconcile(
        self,
        body: Mapping[str, Any],
        state: _State,
        jobs: list[Obj],
        pods: list[Obj],
        now: datetime,
    ) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        owner = ch.Owner(name, namespace, meta["uid"])
        previous = copy.deepcopy(state.status or dict(body.get("status") or {}))
        generation = int(meta.get("generation") or 1)
        token = (meta.get("annotations") or {}).get(ch.RETRAIN_TOKEN_ANNOTATION)
        live = copy.deepcopy(dict(body["spec"]))
        choice = runs.choose(name, live, generation, token, previous)
        try:
            validate_object(_document(name, namespace, live))
            job = validate_object(_document(name, namespace, runs.effective_spec(choice, live)))
        except SpecError as err:
            # The CRD's schema and CEL rules catch nearly all of this at admission; what is
            # left (e.g. an object stored before a stricter CRD) is permanent until edited.
            observed = st.Observed(
                generation, choice.id, "", now=now, spec_error=str(err), retrain_token=token
            )
            self._write(body, state, previous, observed, now)
            return

        run = choice.id
        base = ch.base_name(run)
        owned = [j for j in _with_created(state, jobs) if _owned_by(j, owner.uid)]
        mine = [j for j in owned if j["metadata"].get("labels", {}).get(ch.RUN_LABEL) == base]
        stale = [j for j in owned if j not in mine]
        policy = job.spec.run_policy
        observed = st.Observed(
            generation=generation,
            run=run,
            now=now,
            run_spec=choice.spec,
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
            try:
                created = self._create_run(job, owner, run, attempt, token)
            except ForeignChild as err:
                observed = replace(observed, blocked=str(err))
            else:
                state.created[created["metadata"]["name"]] = (time.monotonic(), created)
                observed = _with_job(observed, created)
        latest = observed.latest
        if latest is not None:
            self._sync_suspend(job, latest)
            job_uid = latest["metadata"].get("uid")
            attempt_pods = [
                p for p in pods
                if (p["metadata"].get("labels") or {}).get(CONTROLLER_UID_LABEL) == job_uid
            ]  # fmt: skip
            observed = replace(observed, pods=attempt_pods)
            observed = replace(
                observed, progress=self._progress(state, (run, observed.attempt), attempt_pods)
            )
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
            # Never owned: an earlier FineTuneJob's claim of the same name is this one's too.
            self._create(lambda: core.create_namespaced_persistent_volume_claim(ns, claim))
        settings = self.config.settings
        config_map: Any = ch.config_map(job, owner, run)
        service: Any = ch.service(owner, run, settings)
        name = config_map["metadata"]["name"]
        self._create(
            lambda: core.create_namespaced_config_map(ns, config_map),
            lambda: core.read_namespaced_config_map(name, ns),
            owner,
        )
        self._create(
            lambda: core.create_namespaced_service(ns, service),
            lambda: core.read_namespaced_service(name, ns),
            owner,
        )
        body: Any = ch.batch_job(job, owner, run, attempt, settings, token)
        job_name = body["metadata"]["name"]
        created = self._create(
            lambda: batch.create_namespaced_job(ns, body),
            lambda: batch.read_namespaced_job(job_name, ns),
            owner,
        )
        if created is not None:
            kind = "first" if attempt == 1 else "retry"
            self.config.metrics.attempts.labels(kind=kind).inc()
            if attempt == 1:
                self.config.metrics.runs_started.inc()
            log.info("%s/%s: created Job %s", ns, owner.name, job_name)
            return created
        return dict(body)  # ours already (HTTP 409); the index shows it soon

    def _create(
        self,
        create: Callable[[], Any],
        read: Callable[[], Any] | None = None,
        owner: ch.Owner | None = None,
    ) -> Obj | None:
        """Create; the object as created, or None if it already existed (HTTP 409) and is
        ours. ForeignChild if it exists under another owner (with `read`)."""
        try:
            return self._plain(create())
        except client.ApiException as err:
            if err.status != 409:
                raise
        if read is not None and owner is not None:
            existing = self._plain(read())
            if not _owned_by(existing, owner.uid):
                meta = existing["metadata"]
                holders = [r.get("uid") for r in meta.get("ownerReferences") or []]
                raise ForeignChild(
                    f"{existing.get('kind', 'object')} {meta['name']} already exists and "
                    f"belongs to {holders or 'no FineTuneJob'}, not to this one (uid "
                    f"{owner.uid}); waiting for it to be deleted (a FineTuneJob of the same "
                    "name deleted moments ago leaves its children to garbage collection)"
                )
        return None

    def _plain(self, obj: Any) -> Obj:
        plain: Obj = self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        return plain

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
        """A new run replaces the old one: its Jobs (and pods), Service and ConfigMap go; its
        outputs and checkpoints on the volume stay. Only this FineTuneJob's, by UID."""
        core, batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        ns = owner.namespace
        for old in stale:
            _ignore_missing(
                partial(
                    batch.delete_namespaced_job,
                    old["metadata"]["name"],
                    ns,
                    propagation_policy="Background",
                )
            )
        selector = f"{ch.JOB_LABEL}={owner.name},{ch.RUN_LABEL},{ch.RUN_LABEL}!={base}"
        listings: list[tuple[Any, Any]] = [
            (core.list_namespaced_service, core.delete_namespaced_service),
            (core.list_namespaced_config_map, core.delete_namespaced_config_map),
        ]
        for listed, delete in listings:
            for item in listed(ns, label_selector=selector).items:
                meta = item.metadata
                if any(r.uid == owner.uid for r in meta.owner_references or []):
                    _ignore_missing(partial(delete, meta.name, ns))

    # -- progress and status -------------------------------------------------------------------

    def _progress(self, state: _State, of: tuple[str, int], pods: list[Obj]) -> Progress | None:
        """Rank 0's metrics for this run and attempt, read at most once per status interval
        (another run's or attempt's numbers are never shown for this one)."""
        if state.progress_of != of:
            state.progress, state.progress_of, state.scraped_at = None, of, 0.0
        if time.monotonic() - state.scraped_at < self.config.status_interval:
            return state.progress
        state.scraped_at = time.monotonic()
        url = _metrics_url(pods)
        if url is None:
            return state.progress
        try:
            state.progress = parse_metrics(scrape(url))
        except (OSError, ValueError, ScrapeError) as err:  # not serving yet, or not a trainer
            log.debug("no metrics from %s: %s", url, err)
        return state.progress

    def _write(
        self,
        body: Mapping[str, Any],
        state: _State,
        previous: Obj,
        observed: st.Observed,
        now: datetime,
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
        # The whole status, exactly: a merge patch would keep keys the new status dropped.
        patch: Any = [{"op": "add", "path": "/status", "value": status}]
        objects = client.CustomObjectsApi(self.api)
        objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
            _content_type=JSON_PATCH,
        )  # fmt: skip
        state.status, state.written_at = status, time.monotonic()
        for event in events:
            self._event(meta, event)
        self._count(meta, previous, status)
        return status

    def _event(self, meta: Mapping[str, Any], event: st.Transition) -> None:
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
            client.CoreV1Api(self.api).create_namespaced_event(meta["namespace"], body)
        except client.ApiException as err:  # an Event is never worth a failed reconcile
            log.warning("cannot post the Event %s: %s", event.reason, err.reason)

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
            created = st.parse_time(meta.get("creationTimestamp"))
            if created is not None:
                metrics.time_to_running.observe((datetime.now(UTC) - created).total_seconds())

    def _expire(self, job: Any, owner: ch.Owner, status: Obj, now: datetime) -> None:
        """ttlSecondsAfterFinished: delete the FineTuneJob (never its outputs) that long after
        it became Succeeded or Failed (its condition's transition, so a revert to a run that
        finished long ago is not deleted at once)."""
        ttl = job.spec.run_policy.ttl_seconds_after_finished
        if ttl is None or status["phase"] not in st.TERMINAL:
            return
        condition = next(c for c in status["conditions"] if c["type"] == status["phase"])
        finished = st.parse_time(condition.get("lastTransitionTime"))
        if finished is not None and (now - finished).total_seconds() >= ttl:
            log.info("%s/%s: ttlSecondsAfterFinished passed, deleting", owner.namespace, owner.name)
            # The uid precondition: never a FineTuneJob created since under the same name.
            options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=owner.uid))
            objects = client.CustomObjectsApi(self.api)
            _ignore_missing(
                partial(
                    objects.delete_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    owner.namespace,
                    PLURAL,
                    owner.name,
                    body=options,
                )
            )


# -- helpers -----------------------------------------------------------------------------------


def _document(name: str, namespace: str, spec: Obj) -> Obj:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


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
    return replace(observed, jobs=jobs)


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


def _ignore_missing(call: Callable[[], Any]) -> None:
    try:
        call()
    except client.ApiException as err:
        if err.status != 404:
            raise


def api_client(workers: int = 16) -> client.ApiClient:
    from kubernetes import config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # A pool smaller than the threads discards connections (new TLS handshakes each time).
    configuration.connection_pool_maxsize = workers
    return client.ApiClient(configuration)
