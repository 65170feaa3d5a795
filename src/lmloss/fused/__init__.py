"""``linear_cross_entropy``: the loss from hidden states and the ``lm_head`` weight,
without materializing the ``[tokens, vocab]`` logits.

Same contract as :func:`lmloss.causal_lm_loss` applied to ``hidden @ weight.T +
bias``; only the backend differs:

- ``"chunked"`` (``fused/chunked.py``): pure PyTorch, CPU and GPU, chunks of tokens.
- ``"reference"``: materializes the logits and calls ``causal_lm_loss``.
- ``"auto"``: ``"reference"`` when the logits are small enough that chunking cannot
  pay (below ``REFERENCE_MAX_LOGITS`` elements), else ``"chunked"``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lmloss._validation import (
    check_choice,
    check_int,
    check_label_range,
    check_labels,
    check_loss_options,
    check_num_items,
    check_tensor,
    check_token_weights,
)
from lmloss.fused.chunked import LossMath, chunked_linear_cross_entropy
from lmloss.reference import (
    Normalize,
    Reduction,
    causal_lm_loss,
    mean_over_items,
    plan_targets,
    to_label_alignment,
)

__all__ = ["linear_cross_entropy", "BACKENDS"]

Backend = Literal["auto", "chunked", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "chunked", "reference")
# Below this many logits one matrix product and the reference loss beat the chunk
# loop's fixed costs; above it the chunked backend wins, by 2x already at 2**18
# (CPU, forward+backward; BENCHMARKS.md, "backend='auto'").
REFERENCE_MAX_LOGITS = 2**15


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items_in_batch: torch.Tensor | int | float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weights: torch.Tensor | None = None,
    normalize: Normalize = "token",
    backend: Backend = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden @ weight.T + bias`` without the full logits.

    Args:
        hidden: ``[..., T, D]`` final hidden states (after the last norm), any float dtype.
        weight: ``[V, D]`` the ``lm_head`` weight, same dtype as ``hidden``.
        labels: ``[..., T]`` integer labels, as for :func:`lmloss.causal_lm_loss`.
        bias: ``[V]`` optional ``lm_head`` bias.
        shift, ignore_index, reduction, num_items_in_batch, label_smoothing, z_loss,
        softcap, token_weights, normalize: exactly as in :func:`lmloss.causal_lm_loss`.
        backend: ``"auto"``, ``"chunked"`` or ``"reference"`` (see the module doc).
        chunk_size: tokens per chunk for ``"chunked"``; default from a memory budget
            and the shapes (``lmloss.fused.chunked.default_chunk_rows``).

    Returns:
        As :func:`lmloss.causal_lm_loss`: a float32 scalar (float64 for float64
        inputs), or ``[..., T]`` aligned with ``labels`` for ``reduction="none"``.

    Notes:
        With ``reduction="mean"``/``"sum"`` the chunked backend computes the
        gradients during the forward pass, so ``backward`` may run once per call
        (no ``retain_graph``). Value checks and the dropping of ignored rows each
        synchronise a GPU once; ``with lmloss.validation(False):`` turns both off
        (ignored rows are then masked, not dropped) for CUDA graphs.
    """
    check_loss_options(
        shift=shift,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        normalize=normalize,
    )
    check_backend_options(backend, chunk_size)
    hidden, weight, bias = _check_linear(*_autocast_inputs(hidden, weight, bias))
    labels = check_labels(labels, hidden.shape[:-1])
    if labels.device != hidden.device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {hidden.device}")

    options = dict(
        shift=shift,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        token_weights=token_weights,
        normalize=normalize,
    )
    # The products run in the inputs' dtypes, cast above as autocast would have cast
    # them; autocast itself is off so both backends (and both products) agree.
    with torch.autocast(hidden.device.type, enabled=False):
        if _pick_backend(backend, hidden, weight) == "reference":
            return causal_lm_loss(F.linear(hidden, weight, bias), labels, **options)  # type: ignore[arg-type]
        return _chunked(hidden, weight, bias, labels, chunk_size, **options)  # type: ignore[arg-type]


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int | None,
    *,
    shift: bool,
    ignore_index: int,
    reduction: Reduction,
    num_items_in_batch: torch.Tensor | int | float | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    token_weights: torch.Tensor | None,
    normalize: Normalize,
) -> torch.Tensor:
    """The chunked backend on checked inputs: targets planned as the reference does."""
    check_label_range(labels, weight.shape[0], ignore_index)
    weights = None if token_weights is None else check_token_weights(token_weights, labels)
    num_items = check_num_items(num_items_in_batch)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    plan = plan_targets(labels, weights, shift=shift, ignore_index=ignore_index, normalize=normalize, dtype=dtype)
    math = LossMath(float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
    result = chunked_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        plan.targets.reshape(-1),
        plan.coef.reshape(-1),
        math=math,
        reduce_sum=reduction != "none",
        chunk_rows=chunk_size,
    )
    if reduction == "none":
        return to_label_alignment(result.view(labels.shape), shift)
    return result if reduction == "sum" else mean_over_items(result, plan.item_count, num_items)


def check_backend_options(backend: object, chunk_size: object) -> None:
    """``backend`` is one of ``BACKENDS``; ``chunk_size`` is None or a positive int."""
    check_choice("backend", backend, BACKENDS)
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")


def _autocast_inputs(hidden: object, weight: object, bias: object) -> tuple[object, object, object]:
    """Under autocast, the products take autocast's dtype, as ``F.linear`` would."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (hidden, weight, bias)]
    return cast[0], cast[1], cast[2]


def _check_linear(
    hidden: object, weight: object, bias: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    hidden = check_tensor("hidden", hidden)
    weight = check_tensor("weight", weight)
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if hidden.ndim < 2:
        raise ValueError(f"hidden must have shape [..., T, D] (at least 2-D), got shape {tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]} (an lm_head.weight), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype; cast one of them "
            "(under autocast, pass the weight in the autocast dtype)"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        bias = check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must match hidden's dtype and device ({hidden.dtype}, {hidden.device})")
    return hidden, weight, bias


def _pick_backend(backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    if backend != "auto":
        return backend
    n_tokens = hidden.numel() // hidden.shape[-1]
    return "reference" if n_tokens * weight.shape[0] <= REFERENCE_MAX_LOGITS else "chunked"
