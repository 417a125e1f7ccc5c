"""The trainer's progress: the exposition parsed, and the scrape of a tenant's endpoint bounded
in time and bytes (a slow or endless endpoint costs one short timeout)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kubetune.controller import progress as pr


def test_parse_metrics_reads_the_trainer_exposition() -> None:
    from prometheus_client import generate_latest

    from kubetune.trainer.telemetry import Metrics

    metrics = Metrics()
    metrics.step.set(7)
    metrics.total_steps.set(10)
    metrics.loss.set(0.75)
    metrics.eta.set(42)
    metrics.set_phase("training")
    progress = pr.parse_metrics(generate_latest(metrics.registry).decode())
    assert progress == pr.Progress(step=7, total_steps=10, epoch=0.0, loss=0.75, eval_loss=0.0,
                                   tokens_per_second=0.0, eta_seconds=42.0,
                                   trainer_phase="training")  # fmt: skip


def test_format_eta() -> None:
    assert pr.format_eta(42) == "42s"
    assert pr.format_eta(125) == "2m05s"
    assert pr.format_eta(3725) == "1h02m"
    assert pr.format_eta(None) is None


Serve = Callable[[socket.socket], None]


@pytest.fixture
def server() -> Iterator[Callable[[Serve], str]]:
    """A real TCP server on loopback whose every connection is handled by `serve`."""
    listeners: list[socket.socket] = []

    def start(serve: Serve) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=_handle, args=(serve, conn), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"

    yield start
    for listener in listeners:
        listener.close()


def _handle(serve: Serve, conn: socket.socket) -> None:
    with conn:
        conn.recv(4096)
        with contextlib.suppress(OSError):  # the client hung up on us, as it should
            serve(conn)


def test_a_real_trainer_endpoint_is_read() -> None:
    from kubetune.trainer.telemetry import Metrics

    metrics = Metrics()
    metrics.step.set(3)
    port = metrics.serve(0)
    progress = pr.parse_metrics(pr.scrape(f"http://127.0.0.1:{port}/metrics"))
    assert progress.step == 3


def test_an_endpoint_that_drips_bytes_costs_one_timeout(server: Callable[[Serve], str]) -> None:
    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n")
        for _ in range(100):  # a header byte every 0.2 s: each read alone would succeed
            conn.sendall(b"X")
            time.sleep(0.2)

    started = time.monotonic()
    with pytest.raises(pr.ScrapeError, match="within 1 s"):
        pr.scrape(server(drip), timeout=1.0)
    assert time.monotonic() - started < 2.0


def test_an_endless_body_is_cut_at_the_byte_limit(server: Callable[[Serve], str]) -> None:
    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        chunk = b"kubetune_trainer_step 1\n" * 4096
        while True:
            conn.sendall(chunk)

    with pytest.raises(pr.ScrapeError, match="larger than"):
        pr.scrape(server(endless), timeout=10.0, limit=1 << 20)


def test_an_error_status_is_not_parsed(server: Callable[[Serve], str]) -> None:
    def not_found(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 404 Not Found\r\n\r\nkubetune_trainer_step 9\n")

    with pytest.raises(pr.ScrapeError, match="404"):
        pr.scrape(server(not_found))
