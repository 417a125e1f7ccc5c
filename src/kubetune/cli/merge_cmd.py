"""`kubetune merge ADAPTER -o DIR`: merge a LoRA adapter into its base, as the trainer does.

The same code as a run's export: the base loaded unquantized (also for QLoRA adapters), the
merged logits checked against base + adapter, sharded safetensors with the tokenizer, chat
template and stop tokens. The output is written under a temporary name beside it and renamed
only when complete; an existing output is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from kubetune.cli.local_model import TEMPLATE_HELP


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "merge", help="merge a LoRA adapter into its base model and export it"
    )
    parser.add_argument("adapter", type=Path, help="peft adapter directory (e.g. <run>/adapter)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="directory to create for the model"
    )
    parser.add_argument(
        "--base",
        help="base model: a directory, a .gguf file or pkg:<package>/<file> "
        "(default: the base recorded in the adapter)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="dtype of the merged weights (default auto: the base model's)",
    )
    parser.add_argument(
        "--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)"
    )
    parser.add_argument("--template", help=TEMPLATE_HELP)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    if output.exists():
        print(
            f"error: --output {output} already exists; kubetune never overwrites", file=sys.stderr
        )
        return 2
    try:
        merge(args)
    except (ValueError, OSError) as err:  # arguments, sources, templates: named in the message
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # MergeCheckError, and load failures transformers raises
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged model written to {output}")
    return 0


def merge(args: argparse.Namespace) -> None:
    from kubetune.cli.local_model import (
        ModelArgumentError,
        check_adapter,
        recorded_base,
        resolve_model,
        tokenizer_and_template,
    )
    from kubetune.trainer import export
    from kubetune.trainer.model import transformers_dir

    adapter = check_adapter(args.adapter)
    base_arg = args.base or recorded_base(adapter)
    if base_arg is None:
        raise ModelArgumentError(
            f"--base: {adapter / 'adapter_config.json'} names no base model found here; pass --base"
        )
    base = resolve_model(base_arg, "--base")
    tokenizer, template = tokenizer_and_template(base, args.template, args.trust_remote_code)
    base_dir = transformers_dir(base)
    dtype = export.merge_dtype(args.dtype, base_dir)
    merged, report = export.merge_adapter(
        base_dir, adapter, dtype, tokenizer, args.trust_remote_code
    )
    print(
        f"merge check ({report.dtype}): max |logit diff| {report.max_abs_diff:.3g}, "
        f"{report.relative_diff:.2e} of the logit scale (tolerance {report.tolerance:.0e})"
    )
    output: Path = args.output
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        export.save_model(merged, tokenizer, template, partial, args.max_shard_size)
        if output.exists():  # created meanwhile; rename would replace an empty directory
            raise ModelArgumentError(f"--output {output} appeared while merging; not replaced")
        partial.rename(output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
