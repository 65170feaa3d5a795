"""Run a function on several real torch.distributed processes (gloo, CPU)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_gloo(worker: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Call ``worker(rank, world_size, *args)`` in ``world_size`` gloo processes; return their results.

    ``worker`` must be a module-level function (it is pickled by name) and return
    something ``torch.save`` can write.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(worker, world_size, tmp, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _entry(rank: int, worker: Callable[..., Any], world_size: int, tmp: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, os.path.join(tmp, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
