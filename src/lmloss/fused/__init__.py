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
  ``TRITON_INTERPRET=1`` (the tests).
- ``"auto"``: ``"reference"`` when the logits are small enough that chunking cannot
  pay (below ``REFERENCE_MAX_LOGITS`` elements), else ``"chunked"``.

A backend is a function in ``_RUNNERS`` that takes one checked call
(``lmloss._engine.chunks.LinearCall``: the tensors, the ``LossSpec`` and the per-call
data); adding one is a new entry there and in ``lmloss._spec.Backend``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmloss._engine.chunks import LinearCall, autocast_inputs
from lmloss._engine.plan import align
from lmloss._engine.rowmath import LossMath
from lmloss._spec import BACKENDS, Backend, LossSpec, Normalize, Reduction, TokenLoss
from lmloss._validation import check_choice, check_int, check_labels_on, check_tensor
from lmloss.fused.chunked import chunked_linear_cross_entropy
from lmloss.reference import causal_lm_loss

__all__ = ["linear_cross_entropy", "BACKENDS", "Backend", "check_backend_options", "check_linear"]

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
    class_weights: torch.Tensor | None = None,
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
        softcap, token_weights, normalize, token_loss, focal_gamma, class_weights: exactly
            as in :func:`lmloss.causal_lm_loss` (DFT and focal weights are computed from
            each chunk's log-sum-exp and target logit and folded into its gradient;
            ``class_weights``, ``[V]``, is torch's ``weight``).
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
    spec = LossSpec.from_arguments(locals())  # first: locals() holds only the parameters
    check_backend_options(backend, chunk_size)
    hidden, weight, bias = check_linear(*autocast_inputs(hidden, weight, bias))
    labels = check_labels_on(labels, hidden.shape[:-1], hidden.device, "hidden")
    # The products run in the inputs' dtypes, cast above as autocast would have cast
    # them; autocast itself is off so both backends (and both products) agree.
    with torch.autocast(hidden.device.type, enabled=False):
        run = _RUNNERS[_pick_backend(backend, hidden, weight)]
        call = LinearCall(
            hidden, weight, bias, labels, spec, token_weights, num_items_in_batch, chunk_size, class_weights
        )
        return run(call)


def _reference(call: LinearCall) -> torch.Tensor:
    """The reference backend: materialize the logits (``chunk_size`` is not used).

    Unscored positions (ignored targets, the last one when shifted) get zero hidden
    states first: their logits are not used, and a non-finite hidden state there
    would otherwise turn the weight's gradient (``dz^T @ h``, ``0 * NaN``) into NaN.
    """
    spec, hidden = call.spec, call.hidden
    _, item = align(call.labels, None, shift=spec.shift, ignore_index=spec.ignore_index, dtype=hidden.dtype)
    hidden = torch.where((item != 0).unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return causal_lm_loss(
        F.linear(hidden, call.weight, call.bias),
        call.labels,
        token_weights=call.token_weights,  # type: ignore[arg-type]  # checked on entry
        num_items_in_batch=call.num_items_in_batch,  # type: ignore[arg-type]  # checked on entry
        class_weights=call.class_weights,  # type: ignore[arg-type]  # checked on entry
        **spec.options(),  # type: ignore[arg-type]  # options() values are object; LossSpec checked each
    )


def _chunked(call: LinearCall) -> torch.Tensor:
    """The chunked backend on checked inputs: targets planned as the reference does."""
    rows, plan, num_items = call.planned()
    math, reduce_sum = LossMath.from_spec(call.spec), call.spec.reduction != "none"
    result = chunked_linear_cross_entropy(rows, math=math, reduce_sum=reduce_sum, chunk_rows=call.chunk_size)
    return call.finish(result, plan, num_items)


def _triton(call: LinearCall) -> torch.Tensor:
    # Imported on use: triton is optional (the ``gpu`` extra) and slow to import.
    from lmloss.fused.triton import triton_backend

    return triton_backend(call, lowmem=False)


def _triton_lowmem(call: LinearCall) -> torch.Tensor:
    from lmloss.fused.triton import triton_backend

    return triton_backend(call, lowmem=True)


# Backend name -> function; "auto" is resolved by _pick_backend first (never to a Triton
# backend until they are measured on a GPU).
_RUNNERS: dict[str, Callable[[LinearCall], torch.Tensor]] = {
    "reference": _reference,
    "chunked": _chunked,
    "triton": _triton,
    "triton-lowmem": _triton_lowmem,
}


def check_backend_options(backend: object, chunk_size: object) -> None:
    """``backend`` is one of ``BACKENDS``; ``chunk_size`` is None or a positive int."""
    check_choice("backend", backend, BACKENDS)
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")


def check_linear(
    hidden: object, weight: object, bias: object, *, prefix: str = ""
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
