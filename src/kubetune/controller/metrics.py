"""The operator's own Prometheus metrics (names mirror controller-runtime's).

Labels are bounded: phase, result and nothing per job or per run, so a cluster with
thousands of FineTuneJobs does not make thousands of series.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune.api.status import PHASES

# Training runs take minutes to days; reconciles milliseconds to seconds.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        prefix = "kubetune_operator_"
        self.jobs = Gauge(
            f"{prefix}jobs", "FineTuneJobs by phase.", ["phase"], registry=self.registry
        )
        self.runs_started = Counter(
            f"{prefix}runs_started", "Training runs started.", registry=self.registry
        )
        self.runs_succeeded = Counter(
            f"{prefix}runs_succeeded", "Training runs that succeeded.", registry=self.registry
        )
        self.runs_failed = Counter(
            f"{prefix}runs_failed", "Training runs that failed.", registry=self.registry
        )
        self.attempts = Counter(
            f"{prefix}attempts", "Attempts started (first tries and retries).", ["kind"],
            registry=self.registry,
        )  # fmt: skip
        self.reconciles = Counter(
            f"{prefix}reconcile", "Reconciles by result.", ["result"], registry=self.registry
        )
        self.reconcile_time = Histogram(
            f"{prefix}reconcile_time_seconds",
            "Time one reconcile took.",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.time_to_running = Histogram(
            f"{prefix}time_to_running_seconds",
            "From the FineTuneJob's creation to its training pods running.",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            f"{prefix}queue_wait_seconds",
            "Time a run's Job waited suspended for Kueue admission.",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)
        for result in ("success", "error"):
            self.reconciles.labels(result=result)

    def set_phase(self, uid: str, phase: str) -> None:
        with self._lock:
            self._phases[uid] = phase
            self._publish()

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)
            self._publish()

    def _publish(self) -> None:
        counts = Tally(self._phases.values())
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(counts.get(phase, 0))

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        server, _ = start_http_server(port, addr, registry=self.registry)
        return int(server.server_port)
