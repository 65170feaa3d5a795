"""This process's place under ``torchrun``: rank, world size, device, and the sums over processes.

Without ``torchrun`` (no ``WORLD_SIZE`` > 1) a run is one process and every sum is
the value itself; with it, each process takes ``cuda:LOCAL_RANK`` (or the CPU, with
gloo) and joins the default process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Processes", "start_processes"]


@dataclass
class Processes:
    """This process's place under ``torchrun`` (world size 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: dist.ProcessGroup | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(self.group)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes (``value`` must be on this process's device: NCCL)."""
        if self.group is None:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.group)
        return value


def start_processes(device_option: str) -> tuple[Processes, torch.device]:
    """Join the process group ``torchrun`` describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_option, local_rank if world > 1 else None)
    if world <= 1:
        return Processes(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts: one GPU per process
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, dist.group.WORLD), device


def _device(option: str, local_rank: int | None) -> torch.device:
    if option == "auto":
        option = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(option)
    except RuntimeError as err:
        raise ValueError(f"--device {option!r} is not a device (use cpu, cuda or cuda:N)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to this PyTorch; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
    elif device.type != "cpu":
        raise ValueError(f"--device {option!r}: lmloss train runs on cpu or cuda")
    return device
