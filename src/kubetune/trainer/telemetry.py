"""What a run tells the world: Prometheus metrics (rank 0), logs and the final summary.

Metric names follow Prometheus conventions: one `kubetune_trainer_` prefix, base units as
suffixes, `_total` for counters. They carry no per-step or per-run labels, whose number
would grow without bound; the PodMonitor adds namespace and job from the pod's labels.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

log = logging.getLogger("kubetune.trainer")
PHASES = ("loading", "training", "evaluating", "merging", "exporting", "done")
# Dense bf16 peak FLOP/s per device, for model FLOPs utilisation where the device is known.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
MESSAGE_CHARS = 1500


def setup_logging() -> None:
    # Every rank runs the same loop; only rank 0 tells the story, the others report problems.
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    if not sys.stderr.isatty():  # progress bars only for a person watching a terminal
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_FLOPS.items() if key in device_name), None)


class Metrics:
    """The trainer's gauges and counters, served on `port` when one is given."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kubetune_trainer_{name}", doc, registry=self.registry)

        self.loss = gauge("loss", "Training loss (mean over the last logging window).")
        self.eval_loss = gauge("eval_loss", "Loss on the validation split.")
        self.learning_rate = gauge("learning_rate", "Current learning rate.")
        self.grad_norm = gauge("grad_norm", "Gradient norm before clipping.")
        self.step = gauge("step", "Optimizer steps done.")
        self.total_steps = gauge("total_steps", "Optimizer steps planned.")
        self.epoch = gauge("epoch", "Epochs done (fractional).")
        self.tokens_per_second = gauge("tokens_per_second", "Non-padding tokens per second.")
        self.samples_per_second = gauge("samples_per_second", "Sequences per second.")
        self.mfu = gauge("model_flops_utilization_ratio", "Model FLOPs utilisation (0-1).")
        self.packing = gauge("packing_efficiency_ratio", "Share of sequence slots with tokens.")
        self.eta = gauge("eta_seconds", "Estimated seconds until training ends.")
        self.gpu_allocated = gauge("gpu_memory_allocated_bytes", "GPU memory allocated.")
        self.gpu_reserved = gauge("gpu_memory_reserved_bytes", "GPU memory reserved.")
        self.tokens = Counter(
            "kubetune_trainer_tokens", "Non-padding tokens trained on.", registry=self.registry
        )
        self.phase = Gauge(
            "kubetune_trainer_phase",
            "1 for the phase the trainer is in.",
            ["phase"],
            registry=self.registry,
        )
        self.info = Info("kubetune_trainer_run", "The run being trained.", registry=self.registry)
        self.set_phase("loading")

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: any free port); returns the port bound."""
        server, _ = start_http_server(port, addr, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()

    def set_phase(self, phase: str) -> None:
        for name in PHASES:
            self.phase.labels(phase=name).set(1 if name == phase else 0)


@dataclass
class Summary:
    """The final word on a run: printed, saved beside the outputs, and left as the pod's
    termination message (which the operator reads)."""

    run_id: str
    phase: str = "Running"
    steps: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    final_eval_loss: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    duration_seconds: float = 0.0
    message: str = ""
    started: float = field(default_factory=time.time)
    invalid: bool = False
    """Failed on bad input (spec, data, model or output): no retry can help."""

    def to_json(self, limit: int | None = None) -> str:
        """The summary as JSON; with `limit`, at most that many bytes and still valid JSON,
        the message losing its beginning first (an error's last lines say the most)."""
        data: dict[str, Any] = {
            "runId": self.run_id,
            "phase": self.phase,
            "steps": self.steps,
            "totalSteps": self.total_steps,
            "finalLoss": self.final_loss,
            "finalEvalLoss": self.final_eval_loss,
            "outputs": self.outputs,
            "durationSeconds": round(time.time() - self.started, 1),
            "message": self.message[-MESSAGE_CHARS:],
            "invalid": self.invalid or None,
        }
        text = _dumps(data)
        while limit is not None and len(text.encode()) > limit:
            excess = len(text.encode()) - limit
            if len(data["message"]) > 1:
                # Every character takes at least one byte, so this cuts at least `excess`
                # bytes besides the three of the ellipsis.
                data["message"] = "…" + data["message"][excess + 3 :]
            elif data["outputs"]:
                data["outputs"] = {}
            else:
                data = {
                    "runId": self.run_id[:200],
                    "phase": self.phase,
                    "invalid": self.invalid or None,
                }
                limit = None
            text = _dumps(data)
        return text

    def write(self, termination_log: Path | None, run_dir: Path | None = None) -> None:
        text = self.to_json()
        print(f"kubetune summary: {text}", flush=True)
        if run_dir is not None and run_dir.exists():
            (run_dir / "summary.json").write_text(text + "\n")
        if termination_log is not None:
            write_termination_message(termination_log, self.to_json(TERMINATION_LIMIT))


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in data.items() if v not in (None, "", {})}, ensure_ascii=False
    )


def write_termination_message(path: Path, text: str) -> None:
    """Leave `text` as the pod's termination message; a local run without a writable path
    only logs a warning, since the outputs themselves are already safe."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        log.warning("cannot write the termination message to %s: %s", path, err)
