"""`kubetune train FILE`: train a FineTuneJob here (a laptop, a GPU box, or a training pod)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kubetune.api import SpecError, load_manifest

DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def register(commands: Any) -> None:
    parser = commands.add_parser("train", help="train a FineTuneJob locally")
    parser.add_argument("manifest", type=Path, help="FineTuneJob YAML file")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs"),
        help="root of the job's outputs; the run goes to <output-dir>/<run-id> (default ./outputs)",
    )
    parser.add_argument("--run-id", help="run id (default: the job name and a hash of its spec)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument(
        "--termination-log",
        type=Path,
        help="write the final JSON summary here too (default /dev/termination-log if it exists)",
    )
    parser.add_argument(
        "--if-finished",
        choices=("fail", "reuse"),
        default=os.environ.get("KUBETUNE_IF_FINISHED", "fail"),
        help="when the run's directory already holds a finished run: fail (exit 2) or reuse "
        "it (report its summary and exit 0 without training); default $KUBETUNE_IF_FINISHED "
        "or fail",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kubetune.trainer.telemetry import Summary, setup_logging

    setup_logging()
    termination_log = args.termination_log or (
        DEFAULT_TERMINATION_LOG if DEFAULT_TERMINATION_LOG.exists() else None
    )
    try:
        job = load_manifest(args.manifest)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from kubetune.trainer.train import EXIT_PREEMPTED, Preempted, RunOptions, train

    if args.if_finished == "reuse":
        reused = _finished_summary(args.output_dir, args.run_id or _default_run_id(job))
        if reused is not None:
            _terminate(termination_log, reused)
            return 0
    options = RunOptions(args.output_dir, args.run_id, args.metrics_port, termination_log)
    try:
        summary = train(job, options)
    except Preempted as stopped:
        _terminate(termination_log, str(stopped))
        return EXIT_PREEMPTED
    except ValueError as err:  # spec, data, model and output errors: all name the culprit
        # invalid: the operator fails the run at once, also under torchrun (which exits 1).
        failed = Summary(args.run_id or job.name, phase="Failed", message=str(err), invalid=True)
        print(f"error: {args.manifest}: {err}", file=sys.stderr)
        failed.write(termination_log)
        return 2
    summary.write(termination_log)
    return 0


def _terminate(termination_log: Path | None, text: str) -> None:
    from kubetune.trainer.telemetry import write_termination_message

    print(f"kubetune summary: {text}", flush=True)
    if termination_log is not None:
        write_termination_message(termination_log, text)


def _default_run_id(job: Any) -> str:
    from kubetune.trainer.layout import run_id_for

    return run_id_for(job.name, job.spec.to_wire())


def _finished_summary(output_dir: Path, run_id: str) -> str | None:
    """The summary of a run already finished in `output_dir`, marked as reused (or None)."""
    import json

    from kubetune.trainer.layout import RunLayout

    path = RunLayout(output_dir, run_id).final / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("phase") != "Succeeded":
        return None
    summary["reused"] = True
    summary["message"] = f"{path.parent} already holds this finished run; reused, not retrained"
    summary.pop("durationSeconds", None)
    text = json.dumps(summary, ensure_ascii=False)
    if len(text.encode()) > 4096:  # the termination message's limit; keep it valid JSON
        text = json.dumps({k: summary[k] for k in ("runId", "phase", "reused") if k in summary})
    return text
