"""``lmloss train``: the command-line face of :mod:`lmloss.train.loop`."""

from __future__ import annotations

import argparse

from lmloss.train.config import add_arguments, config_from_args, given_options

EPILOG = """\
examples:
  lmloss train                                    # built-in tiny Qwen2 on built-in chats (CPU, minutes)
  lmloss train --data chats.jsonl:2 more.jsonl --model ./my-model --precision bfloat16
  lmloss train --config run.yaml --max-steps 500  # flags override the config file
  lmloss train --output-dir runs/x --resume       # continue runs/x from its last checkpoint
  torchrun --nproc-per-node 2 -m lmloss.cli train # data parallel (gloo on CPU, nccl on CUDA)

Ctrl-C (or SIGTERM) finishes the step in flight, saves a checkpoint and exits with 130
(143); --resume continues from it. Exit status 2: bad input; 1: the run failed.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lmloss train``."""
    parser.description = (
        "Fine-tune a causal LM end to end: JSONL chats or prompt/completion pairs -> labels -> "
        "packed batches -> fused loss with correct gradient accumulation -> monitor, checkpoints, "
        "plots and a report in --output-dir. With no arguments: a small built-in model on built-in "
        "data (nothing is downloaded)."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """0 when the run completed, ``128 + signal`` when a signal stopped it (after a checkpoint).

    Errors propagate to :func:`lmloss.cli.main`, which prints them as one line (exit 2
    for bad input, 1 for a failed run).
    """
    config = config_from_args(args)
    from lmloss.train.loop import train  # torch/transformers: only once the options are valid

    summary = train(config, given=given_options(args))
    stop = summary.get("interrupted")
    return int(stop["exit_code"]) if stop else 0
