"""Checks for a loss whose gradients are made outside autograd's graph.

The chunked, Triton and distillation functions make the gradients of the loss
during forward (``reduction="sum"``/``"mean"``: the loss is linear in them) or by
recomputing chunks in backward, with in-place kernels autograd cannot see. So:

- a second backward finds the gradients consumed (no ``retain_graph``);
- a weight changed in place between forward and backward (an early
  ``optimizer.step()``) would get stale gradients;
- ``create_graph=True`` (a gradient penalty, double backward) would silently get a
  gradient without a graph, i.e. a first-order constant.

Each raises a ``RuntimeError`` that says what to use instead.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["remember_weight", "check_forward_gradients", "refuse_create_graph"]


def remember_weight(ctx: Any, weight: torch.Tensor) -> None:
    """For :func:`check_forward_gradients`: the weight is a live parameter, so watching its
    version counter costs nothing."""
    ctx.consumed, ctx.weight, ctx.weight_version = False, weight, weight._version


def check_forward_gradients(ctx: Any, what: str, retain_hint: str) -> None:
    """In the backward of a loss whose gradients were made in forward: refuse a second
    backward (they were consumed) and a weight modified in place since forward."""
    refuse_create_graph(what, retain_hint)
    if ctx.consumed:
        raise RuntimeError(
            f"lmloss {what}: backward was called twice; its gradients are computed in forward and consumed "
            f"by the first backward, so retain_graph is not supported ({retain_hint})"
        )
    ctx.consumed = True
    if ctx.weight._version != ctx.weight_version:
        raise RuntimeError(
            f"lmloss {what}: the weight was modified in place between forward and backward; its gradients "
            f"were computed in forward and would be stale"
        )


def refuse_create_graph(what: str, hint: str) -> None:
    """In a backward that computes gradients outside the graph: refuse ``create_graph=True``
    (grad mode is on in backward exactly then) instead of returning a constant."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"lmloss {what}: create_graph=True (double backward) is not supported; its gradients are computed "
            f"by chunks outside autograd's graph, so they would come back as constants ({hint})"
        )
