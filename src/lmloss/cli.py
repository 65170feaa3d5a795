"""The ``lmloss`` command: ``lmloss train | bench | check | plot``.

Each subcommand lives in its own module, imported only when it runs (so ``lmloss
plot`` never imports transformers, and ``--help`` is instant). A subcommand module
provides ``configure(parser)`` to add its arguments and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lmloss.train.command", "fine-tune a causal LM end to end (built-in model and data by default)"),
    "bench": ("lmloss.bench", "benchmark the loss backends side by side with their peers"),
    "check": ("lmloss.check", "audit a dataset's labels before training"),
    "plot": ("lmloss.monitor.plot", "draw the PNG plots of a run directory"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        # No (known) command: argparse prints the list of commands, or the error.
        _top_parser().parse_args(argv)
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"lmloss {name}", description=help_text)
    module.configure(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmloss", description="The loss layer of causal LM training.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
