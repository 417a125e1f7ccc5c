"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kubetune import __version__
from kubetune.cli import chat_cmd, crd_cmd, merge_cmd, operator_cmd, train_cmd, validate_cmd

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune chat LLMs locally or on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train_cmd, validate_cmd, merge_cmd, chat_cmd, crd_cmd, operator_cmd):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
