"""`kubetune validate FILE`: check a FineTuneJob and dry-run its data pipeline.

Shows one rendered sample with the tokens that carry loss marked, the data counts, and warns
when the model could not learn to stop (no end-of-turn token carries loss, or pad is eos).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob, SpecError, load_manifest
from kubetune.api.pod_paths import local_only_paths

LOSS_OPEN, LOSS_CLOSE = "[[", "]]"
GREEN, RESET = "\033[32;1m", "\033[0m"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "validate", help="check a FineTuneJob manifest and dry-run its data pipeline"
    )
    parser.add_argument("manifest", type=Path, help="FineTuneJob YAML file")
    parser.add_argument(
        "--samples", type=int, default=1000, help="records read per dataset (default 1000)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="use this tokenizer directory instead of the model's own (checks without download)",
    )
    parser.add_argument(
        "--spec-only", action="store_true", help="check the spec only, without loading data"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        job = load_manifest(args.manifest)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.manifest}: FineTuneJob {job.name!r}: spec is valid")
    for problem in local_only_paths(job.spec):
        print(f"WARNING: {args.manifest}: trains here, but not on a cluster: {problem}",
              file=sys.stderr)  # fmt: skip
    if args.spec_only:
        return 0
    try:
        return _dry_run(job, args.samples, args.tokenizer)
    except ValueError as err:  # DataError, ModelSourceError, TemplateRenderError
        print(f"error: {args.manifest}: {err}", file=sys.stderr)
        return 2


def _dry_run(job: FineTuneJob, samples: int, tokenizer_dir: Path | None) -> int:
    from kubetune.trainer.data import pipeline
    from kubetune.trainer.model_source import load_tokenizer, resolve

    base_dir = job.source.parent if job.source else Path.cwd()
    model_path = tokenizer_dir or resolve(job.spec.model, base_dir)
    tokenizer = load_tokenizer(model_path, job.spec.model.trust_remote_code)
    prepared = pipeline.prepare(
        job.spec.data, tokenizer, base_dir, job.spec.training.seed, limit_per_source=samples
    )
    template = prepared.template
    print(f"tokenizer: {model_path}")
    if template is not None:
        print(f"template: {template.name} (end of turn: {', '.join(template.stops)})")
    if prepared.first is not None:
        first = prepared.first
        marked = mark_loss(tokenizer, first.sample.input_ids, first.sample.labels)
        print(f"\nsample {first.item.origin} (loss on {LOSS_OPEN}...{LOSS_CLOSE}):\n{marked}\n")
    stats = prepared.stats
    share = stats.trainable_tokens / max(stats.tokens, 1)
    efficiency = f"{stats.packing_efficiency:.1%}" if stats.packing_efficiency else "-"
    print(
        f"records {stats.records}, train samples {stats.samples}, validation "
        f"{stats.validation_samples}, dropped {stats.dropped}, truncated {stats.truncated}\n"
        f"tokens {stats.tokens} (with loss {stats.trainable_tokens}, {share:.0%}), "
        f"sequences {stats.sequences}, packing efficiency {efficiency}",
        flush=True,
    )
    for warning in _warnings(prepared, tokenizer):
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def _warnings(prepared: Any, tokenizer: Any) -> list[str]:
    warnings = []
    stats = prepared.stats
    if stats.stop_untrained:
        warnings.append(
            f"in {stats.stop_untrained} samples an answer ends without an end-of-turn token "
            "that carries loss: the model will not learn to stop"
        )
    if tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token:
        warnings.append(
            f"the tokenizer's pad token is its eos token {tokenizer.eos_token!r}; the trainer "
            "pads with a different token so the stop token is never masked as padding"
        )
    if stats.dropped:
        warnings.append(
            f"{stats.dropped} samples dropped with no trainable token, e.g. "
            + ", ".join(stats.dropped_examples)
        )
    return warnings


def mark_loss(tokenizer: Any, input_ids: Any, labels: Any, color: bool | None = None) -> str:
    """The sample's text with the runs of tokens that carry loss marked."""
    color = sys.stdout.isatty() if color is None else color
    opening, closing = (GREEN, RESET) if color else (LOSS_OPEN, LOSS_CLOSE)
    pieces: list[str] = []
    run: list[int] = []
    trained = False
    for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        if (label != -100) != trained and run:
            text = tokenizer.decode(run)
            pieces.append(f"{opening}{text}{closing}" if trained else text)
            run = []
        trained = label != -100
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{opening}{text}{closing}" if trained else text)
    return "".join(pieces)
