"""What the trainer reports: live progress from rank 0's metrics endpoint, and the final JSON
summary in its termination message.

The endpoint belongs to a tenant's pod, so reading it is bounded: one short deadline for the
whole response (a server that drips bytes cannot hold a worker) and a byte limit (an endless
body cannot grow the operator's memory).
"""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
SCRAPE_TIMEOUT = 2.0
"""Seconds for a whole scrape: connect, headers and body."""
SCRAPE_MAX_BYTES = 1 << 20
"""The trainer's exposition is a few kB; more than this is not a trainer's."""


@dataclass(frozen=True)
class Progress:
    """What the rank-0 trainer reports: live from its metrics, or its final summary."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    trainer_phase: str | None = None
    """loading, training, evaluating, merging, exporting or done."""


def _number(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def parse_metrics(text: str) -> Progress:
    """Progress from the trainer's Prometheus text exposition (`kubetune_trainer_*`)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    phase = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubetune_trainer_phase":
                if sample.value == 1:
                    phase = sample.labels.get("phase")
            elif sample.name.startswith("kubetune_trainer_"):
                number = _number(sample.value)
                if number is not None:
                    values[sample.name.removeprefix("kubetune_trainer_")] = number
    step, total = values.get("step"), values.get("total_steps")
    return Progress(
        step=int(step) if step is not None else None,
        total_steps=int(total) if total else None,
        epoch=values.get("epoch"),
        loss=values.get("loss"),
        eval_loss=values.get("eval_loss"),
        tokens_per_second=values.get("tokens_per_second"),
        eta_seconds=values.get("eta_seconds"),
        trainer_phase=phase,
    )


def parse_summary(message: str | None) -> Obj | None:
    """The trainer's final JSON summary from a termination message (None if it is not one)."""
    if not message:
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "runId" in data else None


def format_eta(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0:
        return None
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ScrapeError(OSError):
    """The endpoint did not answer 200 in time, or sent too much."""


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT, limit: int = SCRAPE_MAX_BYTES) -> str:
    """GET `url` (plain HTTP/1.0) within `timeout` seconds in all and at most `limit` bytes.

    A socket of our own rather than urllib: urllib's timeout applies to each read, so a
    server that sends a byte of its headers every second holds the call for ever."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    deadline = time.monotonic() + timeout
    request = f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode()
    received = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScrapeError(f"{url}: no complete response within {timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ScrapeError(f"{url}: no complete response within {timeout:g} s") from None
            if not chunk:
                break
            received += chunk
            if len(received) > limit:
                raise ScrapeError(f"{url}: response larger than {limit} bytes")
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if status_line.split(" ")[1:2] != ["200"]:
        raise ScrapeError(f"{url}: {status_line or 'no response'}")
    return body.decode(errors="replace")


COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def metrics_url(pods: list[Obj]) -> str | None:
    """Rank 0's metrics endpoint while it runs (the pod of completion index 0)."""
    for pod in pods:
        index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
        status = pod.get("status") or {}
        if index != "0" or status.get("phase") != "Running" or not status.get("podIP"):
            continue
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    return f"http://{status['podIP']}:{port['containerPort']}/metrics"
    return None
