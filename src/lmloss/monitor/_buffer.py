"""Pending steps and the one host read (and one all-reduce) that turns them into floats.

``LossMonitor.update`` never reads a tensor: it stores the detached tensors of the
step here. ``read_pending`` then packs every pending value of every step into one
float64 vector, all-reduces it once under ``torch.distributed`` and reads it with a
single ``tolist()``: one host-device synchronisation per flush, whatever the number
of steps and fields.

How each field becomes a global number under a process group:

* ``tokens``, ``correct``, ``input_tokens``: summed over ranks.
* ``loss``, ``z_loss`` and ``term/<name>``: token-weighted mean, ``sum(x_r * tokens_r) /
  sum(tokens_r)``, which is the mean over every target token of the global batch;
  without ``tokens`` (or with no token at all), the plain mean over ranks.
* everything else (``grad_norm``, ``lr``, ``train_loss``): the mean over ranks; the
  gradient norm and the learning rate are already the same on every rank.
* ``loss_max`` (added to train steps under a group): the largest ``loss`` of any rank
  (torchtitan's ``global_max_loss``), from a second, small all-reduce (``MAX``) made
  before the same single host read.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

Scalar = torch.Tensor | float | int

SUMMED = ("tokens", "correct", "input_tokens")


@dataclass
class PendingStep:
    """The values one ``update``/``update_eval`` call gave, not yet read."""

    split: str
    step: int
    time: float
    values: dict[str, Scalar] = field(default_factory=dict)


def is_weighted(name: str) -> bool:
    """Fields averaged over target tokens (per-token losses)."""
    return name in ("loss", "z_loss") or name.startswith("term/")


def check_scalar(name: str, value: object) -> Scalar:
    """A real number or a one-element real tensor (detached); never reads the tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one number, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        # Detached so that the buffer never keeps a graph alive.
        return value.detach().reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(value).__name__}")
    return float(value)


def is_on_accelerator(values: dict[str, Scalar]) -> bool:
    return any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values.values())


def read_pending(pending: list[PendingStep], group: dist.ProcessGroup | None) -> list[dict[str, float]]:
    """The global value of every field of every pending step, in one read."""
    layout: list[tuple[int, str, bool]] = []  # (row, field, is the token-weighted part)
    entries: list[Scalar] = []
    maxima: list[Scalar] = []  # under a group: each train step's loss, for the max over ranks
    for row, item in enumerate(pending):
        tokens = item.values.get("tokens")
        for name, value in item.values.items():
            layout.append((row, name, False))
            entries.append(value)
            if group is not None and tokens is not None and is_weighted(name):
                layout.append((row, name, True))
                entries.append(_times(value, tokens))
        if group is not None and item.split == "train":
            maxima.append(_unless_empty(item.values["loss"], tokens))
    flat, flat_max = _reduce_and_read(entries, group, maxima)
    plain: list[dict[str, float]] = [{} for _ in pending]
    weighted: list[dict[str, float]] = [{} for _ in pending]
    for (row, name, is_part), x in zip(layout, flat):
        (weighted if is_part else plain)[row][name] = x
    if group is None:
        return plain
    world = dist.get_world_size(group)
    out = [_combine(p, w, world) for p, w in zip(plain, weighted)]
    train_rows = [row for row, item in enumerate(pending) if item.split == "train"]
    for row, x in zip(train_rows, flat_max):
        if x != -math.inf:  # -inf: no rank had a target
            out[row]["loss_max"] = x
    return out


def _unless_empty(loss: Scalar, tokens: Scalar | None) -> Scalar:
    """A rank's loss for the max over ranks; ``-inf`` (never the max) when it has no target."""
    if tokens is None:
        return loss
    if not isinstance(tokens, torch.Tensor):
        return loss if float(tokens) > 0 else -math.inf
    value = torch.as_tensor(loss, dtype=torch.float64, device=tokens.device)
    return torch.where(tokens > 0, value, torch.full_like(value, -math.inf))


def _combine(plain: dict[str, float], weighted: dict[str, float], world: int) -> dict[str, float]:
    out = {}
    tokens = plain.get("tokens")
    for name, total in plain.items():
        if name in SUMMED:
            out[name] = total
        elif name in weighted and tokens:  # tokens > 0: a token-weighted mean exists
            out[name] = weighted[name] / tokens
        else:
            out[name] = total / world
    return out


def _times(value: Scalar, tokens: Scalar) -> Scalar:
    """``value * tokens`` in float64, on the device when either is a tensor (no read)."""
    if isinstance(value, torch.Tensor):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.to(value.device, torch.float64)
        return value.to(torch.float64) * tokens
    if isinstance(tokens, torch.Tensor):
        return tokens.to(torch.float64) * value
    return value * tokens


def _reduce_and_read(
    entries: list[Scalar], group: dist.ProcessGroup | None, maxima: list[Scalar]
) -> tuple[list[float], list[float]]:
    """``entries`` summed over ranks and ``maxima`` maximised over ranks, in one host read."""
    if group is None:
        values = [0.0 if isinstance(e, torch.Tensor) else float(e) for e in entries]
        tensors = {i: e for i, e in enumerate(entries) if isinstance(e, torch.Tensor)}
        if tensors:
            device = next(iter(tensors.values())).device
            read = _stack(tensors, device).tolist()  # the one host read
            for i, x in zip(tensors, read):
                values[i] = x
        return values, []
    device = _collective_device(group)
    vector = _pack(entries, device)
    dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group)
    if not maxima:
        return vector.tolist(), []  # the one host read
    largest = _pack(maxima, device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    both = torch.cat([vector, largest]).tolist()  # the one host read
    return both[: len(entries)], both[len(entries) :]


def _pack(entries: list[Scalar], device: torch.device) -> torch.Tensor:
    """One float64 vector of numbers and device scalars (no host read)."""
    vector = torch.tensor(
        [0.0 if isinstance(e, torch.Tensor) else float(e) for e in entries], dtype=torch.float64, device=device
    )
    tensors = {i: e for i, e in enumerate(entries) if isinstance(e, torch.Tensor)}
    if tensors:
        vector.index_copy_(0, torch.tensor(list(tensors), device=device), _stack(tensors, device))
    return vector


def _stack(tensors: dict[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack([t.to(device, torch.float64) for t in tensors.values()])


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and the others) reduce CPU tensors.
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
