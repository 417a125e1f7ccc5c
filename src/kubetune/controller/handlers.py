"""The kopf layer: thin handlers that tell the reconciler when to look again.

- every watch event of a FineTuneJob (and the initial listing after a restart) reconciles it;
- every watch event of one of its Jobs or pods reconciles its owner (status follows a pod
  within a second, not a timer tick);
- a safety net, not a kopf timer, reconciles each FineTuneJob now and then in case a watch
  event was lost: every `reconcile_interval` while it runs, every `finished_interval` once it
  has finished.

Only event handlers and indexes are registered: kopf then needs no finalizer, so a
FineTuneJob, its namespace and the CRD stay deletable with the operator stopped or
uninstalled (children go by garbage collection, outputs stay). A finalizer that an earlier
version of the operator added is removed by kopf itself on the first event.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import kopf
from kubernetes import client

from kubetune.api.spec import GROUP, PLURAL, VERSION
from kubetune.controller import children as ch
from kubetune.controller import status as st
from kubetune.controller.reconciler import Config, Reconciler

Obj = dict[str, Any]
log = logging.getLogger("kubetune.operator")
PREFIX = "kubetune.io"
FINALIZER = f"{PREFIX}/finalizer"
WORKERS = 16
"""Threads for reconciles (kopf's executor and the safety net's) and API connections."""

__all__ = ["FINALIZER", "Config", "Reconciler", "build_registry"]


class SafetyNet:
    """Reconciles every known FineTuneJob that has been quiet for its interval."""

    def __init__(self, reconciler: Reconciler, config: Config) -> None:
        self.reconciler, self.config = reconciler, config
        self.indexes: Any = None  # set by the first handler call (kopf passes them there)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="safety-net", daemon=True)
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="safety-net")
        try:
            while not self._stop.wait(min(self.config.reconcile_interval, 5.0)):
                if self.indexes is None:
                    continue
                try:
                    futures = [pool.submit(self._one, uid) for uid in self._claim(self._due())]
                    # Calls time out (REQUEST_TIMEOUT), so this returns; the bound only keeps
                    # one slow round from delaying the next for long. A job still in flight
                    # is not submitted again (no backlog on a slow API server).
                    wait(futures, timeout=max(self.config.reconcile_interval, 30.0))
                except Exception:  # the loop must survive anything one round does
                    log.exception("safety-net round failed")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _claim(self, uids: list[str]) -> list[str]:
        with self._lock:
            fresh = [uid for uid in uids if uid not in self._in_flight]
            self._in_flight.update(fresh)
        return fresh

    def _due(self) -> list[str]:
        due = []
        now = time.time()
        for body in self.reconciler.known():
            uid = body["metadata"]["uid"]
            interval = self.config.reconcile_interval
            status = self.reconciler.status_of(body)
            try:
                expires = expires_at(body, status)
            except (TypeError, ValueError):  # a malformed object must not stop the others
                expires = None
            if status.get("phase") in st.TERMINAL:
                # Nothing left to do on time, but the TTL deletion when it is due.
                interval = self.config.finished_interval
                if expires is not None and expires <= now:
                    interval = self.config.reconcile_interval
            if self.reconciler.idle_for(uid) >= interval:
                due.append(uid)
        return due

    def _one(self, uid: str) -> None:
        try:
            self.reconciler.request(uid, self.indexes)
        except Exception:  # one object's failure must not stop the others
            log.exception("reconcile of %s failed; retried on its next event or interval", uid)
        finally:
            with self._lock:
                self._in_flight.discard(uid)


def expires_at(body: Mapping[str, Any], status: Obj) -> float | None:
    """When ttlSecondsAfterFinished deletes this finished FineTuneJob (epoch seconds)."""
    ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    phase = status.get("phase")
    if ttl is None or phase not in st.TERMINAL:
        return None
    since = next(
        (c.get("lastTransitionTime") for c in status.get("conditions") or []
         if c.get("type") == phase),
        None,
    )  # fmt: skip
    finished = st.parse_time(since)
    return None if finished is None else finished.timestamp() + float(ttl)


def _slim(body: Mapping[str, Any]) -> Obj:
    """What status needs of a Job or pod, for the index: names, uid, owners, labels,
    annotations, whether it is being deleted, the suspend flag and parallelism, the
    containers' ports and the status. Whole bodies (pod templates, managed fields) would cost
    hundreds of megabytes with a few hundred jobs."""
    meta = body["metadata"]
    spec = body.get("spec") or {}
    keys = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "labels",
            "annotations", "ownerReferences")  # fmt: skip
    slim: Obj = {
        "metadata": {k: copy.deepcopy(meta[k]) for k in keys if k in meta},
        "spec": {},
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }
    for key in ("suspend", "parallelism"):
        if key in spec:
            slim["spec"][key] = spec[key]
    if "containers" in spec:
        slim["spec"]["containers"] = [
            {"name": c.get("name"), "ports": copy.deepcopy(c.get("ports") or [])}
            for c in spec["containers"]
        ]
    return slim


def _plain(body: Mapping[str, Any]) -> Obj:
    """A FineTuneJob's body as plain dicts (kopf's Body is a view that changes), without its
    managedFields (kept for every object, they would be most of the memory)."""
    plain = {
        k: copy.deepcopy(dict(body[k]) if isinstance(body[k], Mapping) else body[k])
        for k in ("metadata", "spec", "status")
        if k in body
    }
    plain["metadata"].pop("managedFields", None)
    return plain


def build_registry(config: Config) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers, bound to `config`."""
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(config)
    net = SafetyNet(reconciler, config)
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
        net.start()

    def cleanup(**_: Any) -> None:
        net.stop()

    async def index_children(**kwargs: Any) -> Any:
        # async: it runs on kopf's event loop at once, never queued in the thread pool
        # behind reconciles that wait on the API server.
        key = (kwargs["namespace"], kwargs["labels"][ch.JOB_LABEL])
        return {key: _slim(kwargs["body"])}

    def bind(kwargs: Mapping[str, Any]) -> Any:
        index_jobs, index_pods = kwargs["index_jobs"], kwargs["index_pods"]

        def indexes(namespace: str, name: str) -> tuple[list[Obj], list[Obj]]:
            # Copies: a reconcile may amend what it read; the index's objects stay kopf's.
            key = (namespace, name)
            jobs = copy.deepcopy(list(index_jobs.get(key, [])))
            return jobs, copy.deepcopy(list(index_pods.get(key, [])))

        net.indexes = indexes
        return indexes

    def react(**kwargs: Any) -> None:
        """A FineTuneJob's watch event (including the initial listing after a restart)."""
        body: kopf.Body = kwargs["body"]
        meta = body["metadata"]
        if kwargs.get("type") == "DELETED" or meta.get("deletionTimestamp"):
            # Children go by garbage collection (owner references); outputs stay.
            reconciler.gone(meta)
            return
        reconciler.seen(_plain(body))
        reconciler.request(meta["uid"], bind(kwargs))

    def child_changed(**kwargs: Any) -> None:
        """A Job's or pod's watch event: reconcile the FineTuneJob it belongs to."""
        namespace, labels = kwargs["namespace"], kwargs["labels"]
        uid = reconciler.uid_of(namespace, labels.get(ch.JOB_LABEL, ""))
        if uid is not None:
            reconciler.request(uid, bind(kwargs))

    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.index("batch", "v1", "jobs", labels=children, registry=registry, id="index_jobs")(
        index_children
    )
    kopf.index("", "v1", "pods", labels=children, registry=registry, id="index_pods")(
        index_children
    )
    kopf.on.event(*resource, registry=registry, id="react")(react)
    kopf.on.event("batch", "v1", "jobs", labels=children, registry=registry, id="job")(
        child_changed
    )
    kopf.on.event("", "v1", "pods", labels=children, registry=registry, id="pod")(child_changed)
    return registry
