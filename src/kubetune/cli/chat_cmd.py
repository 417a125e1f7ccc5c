"""`kubetune chat MODEL`: talk to a base model, base + adapter, or a merged model.

A plain loop: each line read is a user turn, each answer is printed to stdout (status goes to
stderr, so answers can be piped). `/reset` starts a new conversation; `/exit` or end of input
quits. Answers are greedy and rendered with the same template code the trainer uses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from kubetune.cli.local_model import TEMPLATE_HELP

EXIT, RESET = "/exit", "/reset"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "chat", help="chat in the terminal with a base, adapter or merged model"
    )
    parser.add_argument("model", help="model: a directory, a .gguf file or pkg:<package>/<file>")
    parser.add_argument("--adapter", type=Path, help="peft adapter directory to apply (unmerged)")
    parser.add_argument("--template", help=TEMPLATE_HELP)
    parser.add_argument("--system", help="system prompt for every conversation")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kubetune.cli.local_model import (
        check_adapter,
        load_model,
        resolve_model,
        tokenizer_and_template,
    )

    try:
        adapter = check_adapter(args.adapter) if args.adapter else None
        path = resolve_model(args.model, "MODEL")
        tokenizer, template = tokenizer_and_template(path, args.template, args.trust_remote_code)
        model = load_model(path, tokenizer, adapter, args.trust_remote_code)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {path} ({EXIT} or Ctrl-D quits, {RESET} forgets)", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    lines = _lines(sys.stdin, interactive)
    chat(model, tokenizer, template, lines, sys.stdout, system, args.max_new_tokens)
    return 0


def chat(
    model: Any,
    tokenizer: Any,
    template: Any,
    lines: Iterable[str],
    out: TextIO,
    system: list[dict[str, str]],
    max_new_tokens: int,
) -> None:
    """Answer each line in one conversation that remembers the earlier turns."""
    from kubetune.trainer.generate import answer

    history = list(system)
    for line in lines:
        prompt = line.strip()
        if prompt == EXIT:
            return
        if prompt == RESET:
            history = list(system)
            continue
        if not prompt:
            continue
        (reply,) = answer(model, tokenizer, template, [prompt], max_new_tokens, history)
        print(reply, file=out, flush=True)
        history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _lines(stream: TextIO, interactive: bool) -> Iterable[str]:
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:  # end of input
            return
        yield line
