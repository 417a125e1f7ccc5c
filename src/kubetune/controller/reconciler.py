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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from kubetune.api import SpecError, validate_object
from kubetune.api.pod_paths import local_only_paths
from kubetune.api.spec import GROUP, KIND, PLURAL, VERSION
from kubetune.controller import children as ch
from kubetune.controller import outcomes, runs
from kubetune.controller import status as st
from kubetune.controller.metrics import OperatorMetrics
from kubetune.controller.progress import Progress, ScrapeError, metrics_url, parse_metrics, scrape
from kubetune.controller.sync import (
    REQUEST_TIMEOUT,
    ChildConflict,
    Children,
    DataNotReady,
    api_client,
    owned_by,
    rejection,
)

Obj = dict[str, Any]
log = logging.getLogger("kubetune.operator")
JSON_PATCH = "application/json-patch+json"
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
    progress_of: tuple[str, int, str] | None = None
    """The (run, attempt) that `progress` was scraped from."""
    created: dict[str, tuple[float, Obj]] = field(default_factory=dict)
    """Jobs created here that the index may not show yet (name: (when, body)): without them a
    reconcile right after the create would create the run's children again (HTTP 409s)."""


class Gone(Exception):
    """The FineTuneJob no longer exists (a 404 on its status)."""


Indexes = Callable[[str, str], tuple[list[Obj], list[Obj]]]
"""(namespace, FineTuneJob name) -> (its Jobs, its pods), as the operator's indexes hold them."""


class Reconciler:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._states: dict[str, _State] = {}
        self._children: Children | None = None
        self._bodies: dict[str, Mapping[str, Any]] = {}
        self._uids: dict[tuple[str, str], str] = {}
        self._guard = threading.Lock()

    @property
    def api(self) -> client.ApiClient:
        if self.config.api is None:
            self.config.api = api_client()
        return self.config.api

    @property
    def children(self) -> Children:
        if self._children is None:
            self._children = Children(self.api, self.config.settings, self.config.metrics)
        return self._children

    def _state(self, uid: str) -> _State | None:
        """The state of a FineTuneJob still known (None once it is gone: nothing is kept for
        a deleted object)."""
        with self._guard:
            if uid not in self._bodies:
                return None
            return self._states.setdefault(uid, _State())

    def idle_for(self, uid: str) -> float:
        """Seconds since this FineTuneJob's last reconcile ended (inf: never)."""
        with self._guard:
            state = self._states.get(uid)
        return float("inf") if state is None else time.monotonic() - state.reconciled_at

    def status_of(self, body: Mapping[str, Any]) -> Obj:
        """The freshest status known of a FineTuneJob: the last written, else its body's."""
        with self._guard:
            state = self._states.get(body["metadata"]["uid"])
        return dict((state.status if state is not None else None) or body.get("status") or {})

    def seen(self, body: Mapping[str, Any]) -> None:
        """Remember the newest body of a FineTuneJob (from its watch events). A namesake with
        another uid means the old object is gone, even if its DELETED event never came (a
        watch re-list after a 410 reports no deletions)."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._guard:
            old = self._uids.get(key)
        if old is not None and old != meta["uid"]:
            self.gone({"uid": old, "namespace": meta["namespace"], "name": meta["name"]})
        with self._guard:
            self._bodies[meta["uid"]] = body
            self._uids[key] = meta["uid"]

    def gone(self, meta: Mapping[str, Any]) -> None:
        """Forget a deleted FineTuneJob (its watch event, or a 404 where it was expected)."""
        with self._guard:
            self._bodies.pop(meta["uid"], None)
            self._states.pop(meta["uid"], None)
            if self._uids.get((meta["namespace"], meta["name"])) == meta["uid"]:
                del self._uids[(meta["namespace"], meta["name"])]
            self.config.metrics.forget(meta["uid"])

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
        state = self._state(uid)
        if state is None:
            return
        # Mark first, then try the lock: a holder that has just seen `dirty` false releases
        # before our check, so one of us always runs the reconcile this event asked for.
        state.dirty = True
        while state.dirty and state.lock.acquire(blocking=False):
            try:
                while state.dirty:
                    state.dirty = False
                    with self._guard:
                        body = self._bodies.get(uid)
                    if body is None:
                        return
                    meta = body["metadata"]
                    jobs, pods = indexes(meta["namespace"], meta["name"])
                    self._timed(body, state, jobs, pods)
            finally:
                state.lock.release()

    def _timed(
        self,
        body: Mapping[str, Any],
        state: _State,
        jobs: list[Obj],
        pods: list[Obj],
    ) -> None:
        started = time.monotonic()
        try:
            self._reconcile(body, state, jobs, pods, datetime.now(UTC))
        except Gone:
            self.gone(body["metadata"])  # deleted while no DELETED event reached us
            return
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
        # An empty annotation is no token (as an absent one).
        token = (meta.get("annotations") or {}).get(ch.RETRAIN_TOKEN_ANNOTATION) or None
        live = copy.deepcopy(dict(body["spec"]))
        error: str | None = None
        try:
            checked = validate_object(_document(name, namespace, live))
        except SpecError as err:
            # The CRD's schema and CEL rules catch nearly all of this at admission; what is
            # left (e.g. an object stored before a stricter CRD) is permanent until edited.
            error = str(err)
        else:
            # Valid, but with paths only the manifest's own machine can read: refused before
            # any pod starts, as permanent as an invalid spec.
            error = "; ".join(local_only_paths(checked.spec)) or None
        if error is not None:
            # The run and its record stay as they were: an invalid spec moves nothing.
            observed = st.invalid_spec(
                previous, runs.run_id(name, live, token), generation, error, now
            )
            self._write(body, state, previous, observed, now)
            return
        choice = runs.choose(name, live, generation, token, previous)
        job = validate_object(_document(name, namespace, runs.effective_spec(choice, live)))

        run = choice.id
        base = ch.base_name(run)
        owned = [j for j in _with_created(state, jobs) if owned_by(j, owner.uid)]
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
            queued=bool(job.spec.resources.queue_name),
            merge=job.spec.output.merge and job.spec.method.type != "full",
            retrain_token=token,
            jobs=mine,
        )
        if stale or (previous.get("currentRun") or {}).get("id") not in (None, run):
            self.children.delete_other_runs(owner, base, stale)
        old_attempts = st.prunable(mine)
        if old_attempts:
            self.children.prune(owner, old_attempts)
            observed = replace(observed, jobs=[j for j in mine if j not in old_attempts])

        observed = self._recreate_if_disrupted(observed, pods, previous)
        attempt = st.next_attempt(observed, previous)
        if attempt is not None and attempt != observed.attempt:
            recorded = previous.get("currentRun") or {}
            recreated = recorded.get("id") == run and attempt <= int(recorded.get("attempt") or 0)
            try:
                created = self.children.create_run(job, owner, run, attempt, token, recreated)
            except (ChildConflict, DataNotReady) as err:
                observed = replace(observed, blocked=(err.reason, str(err)))
            except client.ApiException as err:
                if err.status not in (400, 403, 422):
                    raise
                observed = replace(observed, blocked=rejection(err))
            else:
                state.created[created["metadata"]["name"]] = (time.monotonic(), created)
                observed = _with_job(observed, created)
        latest = observed.latest
        now_latest = None if latest is None else self.children.sync_suspend(job, latest)
        if latest is not None and now_latest is None:  # deleted: suspended under Kueue
            state.created.pop(latest["metadata"]["name"], None)
            jobs_left = [j for j in observed.jobs if j is not latest]
            observed = replace(observed, jobs=jobs_left)
        elif now_latest is not None:
            observed = _with_job(observed, now_latest)
            latest = now_latest
            attempt_pods = [p for p in pods if owned_by(p, latest["metadata"].get("uid"))]
            observed = replace(observed, pods=attempt_pods)
            observed = replace(
                observed,
                progress=self._progress(
                    state,
                    (run, observed.attempt, latest["metadata"].get("uid") or ""),
                    attempt_pods,
                ),
            )
        status = self._write(body, state, previous, observed, now)
        outcomes.expire(self.api, body, job, owner, status, now)

    def _recreate_if_disrupted(
        self, observed: st.Observed, pods: list[Obj], previous: Obj
    ) -> st.Observed:
        """A multi-node attempt with a disrupted pod is stopped whole; once its Job is gone,
        `next_attempt` creates the same attempt again (no retry spent, no back-off). Never for
        a finished run, and only MAX_DISRUPTIONS times per run."""
        latest = observed.latest
        if latest is None or st.finished_phase(previous, observed.run):
            return observed
        attempt_pods = [p for p in pods if owned_by(p, latest["metadata"].get("uid"))]
        why = st.disruption(latest, attempt_pods)
        if why is None or st.disruptions_spent(observed, previous, latest):
            return observed
        if not latest["metadata"].get("deletionTimestamp"):
            self.children.stop_attempt(latest, why)
        return replace(observed, disrupted=why, pods=attempt_pods)

    # -- progress and status -------------------------------------------------------------------

    def _replaced(self, meta: Mapping[str, Any]) -> bool:
        """After a 422 on the status patch (its uid test failed, or the status was invalid):
        True when the object is gone or a namesake has taken its place."""
        try:
            current: Any = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
                _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
        except client.ApiException as err:
            if err.status == 404:
                return True
            raise
        return bool(current["metadata"]["uid"] != meta["uid"])

    def _progress(
        self, state: _State, of: tuple[str, int, str], pods: list[Obj]
    ) -> Progress | None:
        """Rank 0's metrics for this run and attempt (its Job, by UID: a recreated attempt is
        another), read at most once per status interval (another run's or attempt's numbers
        are never shown for this one)."""
        if state.progress_of != of:
            state.progress, state.progress_of, state.scraped_at = None, of, 0.0
        if time.monotonic() - state.scraped_at < self.config.status_interval:
            return state.progress
        state.scraped_at = time.monotonic()
        url = metrics_url(pods)
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
        if self._state(meta["uid"]) is None:
            return status  # deleted meanwhile: no metric for it
        self.config.metrics.set_phase(meta["uid"], status["phase"])
        if status == previous:
            return status
        # Coalesce: progress alone is written at most once per status interval.
        recent = time.monotonic() - state.written_at < self.config.status_interval
        if st.with_progress_only_changed(previous, status) and recent:
            return status
        # The whole status, exactly: a merge patch would keep keys the new status dropped.
        # The uid test makes the patch fail rather than land on a namesake created since.
        patch: Any = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "add", "path": "/status", "value": status},
        ]
        objects = client.CustomObjectsApi(self.api)
        try:
            objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
                _content_type=JSON_PATCH, _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
        except client.ApiException as err:
            if err.status == 404 or (err.status == 422 and self._replaced(meta)):
                raise Gone from None
            raise
        state.status, state.written_at = status, time.monotonic()
        for event in events:
            outcomes.post_event(self.api, meta, event)
        outcomes.count(self.config.metrics, meta, previous, status)
        return status


# -- helpers -----------------------------------------------------------------------------------


def _document(name: str, namespace: str, spec: Obj) -> Obj:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


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
