"""``linear_cross_entropy``: the loss from hidden states and the ``lm_head`` weight,
without materializing the ``[tokens, vocab]`` logits.

Same contract as :func:`lmloss.causal_lm_loss` applied to ``hidden @ weight.T +
bias``; only the backend differs:

- ``"chunked"`` (``fused/chunked.py``): pure PyTorch, CPU and GPU, chunks of tokens.
- ``"reference"``: materializes the logits and calls ``causal_lm_loss``.
- ``"triton"`` (``fused/triton.py``, CUDA): logits chunks by cuBLAS, one Triton
  kernel per chunk for log-sum-exp, loss and the logits gradient in place.
- ``"triton-lowmem"``: logits tiles never leave on-chip memory (recomputed in
  backward), for the largest vocabularies. Both run on CPU only under
  ``TRITON_INTERPRET=1`` (the tests); ``token_loss`` other than ``"ce"`` is not there yet.
- ``"auto"``: ``"reference"`` when the logits are small enough that chunking cannot
  pay (below ``REFERENCE_MAX_LOGITS`` elements), else ``"chunked"``.

A backend is a function in ``_RUNNERS`` that takes the checked ``hidden``,
``weight``, ``bias``, ``labels`` and ``chunk_size`` and every loss option as
keywords; adding one is a new entry there and in ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable
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
    resolve_focal_gamma,
)
from lmloss.fused.chunked import LossMath, chunked_linear_cross_entropy
from lmloss.reference import (
    Normalize,
    Reduction,
    TokenLoss,
    causal_lm_loss,
    mean_over_items,
    plan_targets,
    to_label_alignment,
)

__all__ = ["linear_cross_entropy", "BACKENDS"]

Backend = Literal["auto", "chunked", "reference", "triton", "triton-lowmem"]
BACKENDS: tuple[str, ...] = ("auto", "chunked", "reference", "triton", "triton-lowmem")
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
    token_loss: TokenLoss = "ce",
    focal_gamma: float | None = None,
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
        softcap, token_weights, normalize, token_loss, focal_gamma: exactly as in
            :func:`lmloss.causal_lm_loss` (DFT and focal weights are computed from
            each chunk's log-sum-exp and target logit and folded into its gradient).
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
        token_loss=token_loss,
        focal_gamma=focal_gamma,
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
        token_loss=token_loss,
        focal_gamma=focal_gamma,
    )
    # The products run in the inputs' dtypes, cast above as autocast would have cast
    # them; autocast itself is off so both backends (and both products) agree.
    with torch.autocast(hidden.device.type, enabled=False):
        run = _RUNNERS[_pick_backend(backend, hidden, weight)]
        return run(hidden, weight, bias, labels, chunk_size, **options)


def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int | None,
    **options: object,
) -> torch.Tensor:
    """The reference backend: materialize the logits (``chunk_size`` is not used)."""
    return causal_lm_loss(F.linear(hidden, weight, bias), labels, **options)  # type: ignore[arg-type]


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
    token_loss: TokenLoss = "ce",
    focal_gamma: float | None = None,
) -> torch.Tensor:
    """The chunked backend on checked inputs: targets planned as the reference does."""
    check_label_range(labels, weight.shape[0], ignore_index)
    weights = None if token_weights is None else check_token_weights(token_weights, labels)
    num_items = check_num_items(num_items_in_batch)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    plan = plan_targets(labels, weights, shift=shift, ignore_index=ignore_index, normalize=normalize, dtype=dtype)
    math = LossMath(
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        token_loss=token_loss,
        focal_gamma=resolve_focal_gamma(token_loss, focal_gamma),
    )
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


def _triton(*args: object, **options: object) -> torch.Tensor:
    # Imported on use: triton is optional (the ``gpu`` extra) and slow to import.
    from lmloss.fused.triton import triton_linear_cross_entropy

    return triton_linear_cross_entropy(*args, lowmem=False, **options)  # type: ignore[arg-type]


def _triton_lowmem(*args: object, **options: object) -> torch.Tensor:
    from lmloss.fused.triton import triton_linear_cross_entropy

    return triton_linear_cross_entropy(*args, lowmem=True, **options)  # type: ignore[arg-type]


# Backend name -> function; "auto" is resolved by _pick_backend first (never to a Triton
# backend until they are measured on a GPU).
_RUNNERS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": _reference, "chunked": _chunked, "triton": _triton, "triton-lowmem": _triton_lowmem,
}


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
    hidden: object, weight: object, bias: object, prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Shapes, dtypes and devices of an ``lm_head`` problem; ``prefix`` (e.g.
    ``"teacher_"``) names the arguments in the messages."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    hidden = check_tensor(h_name, hidden)
    weight = check_tensor(w_name, weight)
    if not hidden.is_floating_point():
        raise ValueError(f"{h_name} must be a floating-point tensor, got dtype {hidden.dtype}")
    if hidden.ndim < 2:
        raise ValueError(f"{h_name} must have shape [..., T, D] (at least 2-D), got shape {tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{w_name} must have shape [V, D] with D = {h_name}.shape[-1] = {hidden.shape[-1]} (an lm_head.weight), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{h_name} ({hidden.dtype}) and {w_name} ({weight.dtype}) must have the same dtype; cast one of them "
            "(under autocast, pass the weight in the autocast dtype)"
        )
    if weight.device != hidden.device:
        raise ValueError(f"{w_name} is on {weight.device} but {h_name} is on {hidden.device}")
    if bias is not None:
        bias = check_tensor(b_name, bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"{b_name} must match {h_name}'s dtype and device ({hidden.dtype}, {hidden.device})")
    return hidden, weight, bias


def _pick_backend(backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    if backend != "auto":
        return backend
    n_tokens = hidden.numel() // hidden.shape[-1]
    return "reference" if n_tokens * weight.shape[0] <= REFERENCE_MAX_LOGITS else "chunked"
