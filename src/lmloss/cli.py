"""The ``lmloss`` command: ``lmloss train | bench | check | plot``.

Each subcommand lives in its own module, imported only when it runs (so ``lmloss
plot`` never imports transformers, and ``--help`` is instant). A subcommand module
provides ``configure(parser)`` to add its arguments and ``run(args) -> int``.

Every failure is one line on stderr, ``lmloss CMD: error: ...`` naming the file (and
line), option or path: exit status 2 for bad input (``ValueError``, a missing file), 1
for a run that failed (an ``OSError`` such as a full disk, or any other error), 130 for
Ctrl-C. ``--debug`` (or ``LMLOSS_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the traceback (also: environment LMLOSS_DEBUG=1)",
    )
    args = parser.parse_args(rest)
    debug = bool(vars(args).pop("debug", False)) or os.environ.get("LMLOSS_DEBUG", "") not in ("", "0")
    try:
        return int(module.run(args) or 0)
    except Exception as err:
        if debug:
            raise
        print(f"lmloss {name}: error: {describe(err)}", file=sys.stderr)
        return exit_status(err)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"lmloss {name}: interrupted", file=sys.stderr)
        return 130


def exit_status(err: BaseException) -> int:
    """2 for bad input (the user can fix the command), 1 for a run that failed."""
    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2
    return 1


def describe(err: BaseException) -> str:
    """One line: what failed and where. An ``OSError`` names its path; others keep their
    own message (lmloss's errors name the option, file and line themselves)."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename is not None else ""
        text = f"{where}{err.strerror}"
    else:
        text = str(err) or type(err).__name__
        if not type(err).__module__.startswith("lmloss") and not isinstance(err, ValueError):
            text = f"{type(err).__name__}: {text}"
    return " ".join(text.split())  # one line, whatever the message held


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmloss", description="The loss layer of causal LM training.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
