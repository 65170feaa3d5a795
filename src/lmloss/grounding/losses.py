"""Box losses: expected coordinates under the model's distribution, scored by L1 and GIoU.

The expected value of each coordinate under the model's distribution over the
digit or bin tokens (:func:`expected_bin_coordinate`, :func:`expected_number`)
makes a box that L1 and GIoU can score. :func:`box_loss` computes logits only at
the coordinate positions and only for the digit or bin tokens (a gather and a
``[K, D] @ [D, n_values]`` product), and :func:`grounding_loss` adds the terms to
:func:`lmloss.linear_cross_entropy`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmloss._validation import check_bool, check_tensor
from lmloss.grounding.geometry import DEFAULT_EPS, giou_loss, l1_box_loss
from lmloss.grounding.positions import BoxTargets

__all__ = [
    "box_loss",
    "box_loss_from_logits",
    "expected_bin_coordinate",
    "expected_boxes",
    "expected_number",
    "grounding_loss",
]


def _value_logits(logits: object, token_ids: object) -> torch.Tensor:
    """The logits of the value tokens only (``[..., n]``), in the compute dtype."""
    logits = check_tensor("logits", logits)
    if not logits.is_floating_point() or logits.ndim < 1:
        raise ValueError(f"logits must be a floating-point tensor [..., V], got {logits.dtype} {tuple(logits.shape)}")
    if token_ids is not None:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"token ids must be a non-empty 1-D list, got shape {tuple(ids.shape)}")
        if bool((ids < 0).any()) or bool((ids >= logits.shape[-1]).any()):
            raise ValueError(f"token ids must be in [0, {logits.shape[-1]}) (the vocabulary of logits)")
        logits = logits.index_select(-1, ids)
    return logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _expectation(z: torch.Tensor, values: torch.Tensor, temperature: float, straight_through: bool) -> torch.Tensor:
    """``sum_k softmax(z / T)_k * values_k``; straight-through: argmax value, soft gradient."""
    soft = torch.softmax(z / temperature, dim=-1) @ values
    if not straight_through:
        return soft
    hard = values[z.argmax(dim=-1)]
    return soft + (hard - soft).detach()


def expected_bin_coordinate(
    logits: torch.Tensor,
    bin_token_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    straight_through: bool = False,
) -> torch.Tensor:
    """Expected normalized coordinate under the distribution over location bins.

    ``c = sum_k softmax(z / T)_k * (k + 0.5) / n``: bin ``k`` of ``n`` stands for its
    centre on the normalized ``[0, 1]`` axis. The softmax is over the bin tokens only
    (the model is asked where, given that it writes a coordinate).

    Args:
        logits: ``[..., V]`` full-vocabulary logits (with ``bin_token_ids``) or
            ``[..., n_bins]`` bin logits (``bin_token_ids=None``), any float dtype.
        bin_token_ids: ``[n_bins]`` vocabulary ids of bins ``0..n-1``.
        temperature: ``T > 0``; lower is closer to the argmax.
        straight_through: return the centre of the argmax bin in the forward pass,
            with the gradient of the soft expectation.

    Returns:
        ``[...]`` coordinates in ``[0, 1]``, float32 (float64 for float64 logits).
    """
    z = _value_logits(logits, bin_token_ids)
    n = z.shape[-1]
    centres = (torch.arange(n, dtype=z.dtype, device=z.device) + 0.5) / n
    return _expectation(z, centres, _check_temperature(temperature), check_bool("straight_through", straight_through))


def expected_number(
    logits: torch.Tensor,
    digit_token_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Expected value of a number written with one digit per token.

    ``sum_j 10**(L-1-j) * sum_d p_j(d) * d`` over the ``L`` digit positions ``j``
    (most significant first), each ``p_j`` the softmax over the 10 digit tokens only.
    The number of digits is given (teacher forcing: the target's length).

    Args:
        logits: ``[..., L, V]`` logits of the positions that write the digits (with
            ``digit_token_ids``), or ``[..., L, 10]`` digit logits (without).
        digit_token_ids: ``[10]`` vocabulary ids of ``'0'..'9'``.
        temperature: ``T > 0`` of the softmax.

    Returns:
        ``[...]`` expected values, float32 (float64 for float64 logits).
    """
    z = _value_logits(logits, digit_token_ids)
    if z.shape[-1] != 10 or z.ndim < 2:
        raise ValueError(f"need [..., L, 10] digit logits (or the 10 digit token ids), got {tuple(z.shape)}")
    digits = torch.arange(10, dtype=z.dtype, device=z.device)
    per_digit = _expectation(z, digits, _check_temperature(temperature), False)
    length = z.shape[-2]
    places = 10.0 ** torch.arange(length - 1, -1, -1, dtype=z.dtype, device=z.device)
    return (per_digit * places).sum(-1)


# ------------------------------------------------------------------- box losses


def _gather_value_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: BoxTargets
) -> torch.Tensor:
    """``[K, n_values]`` logits of the value tokens at the coordinate positions only."""
    hidden, weight = check_tensor("hidden", hidden), check_tensor("weight", weight)
    _check_targets(targets, hidden.shape[:-1], "hidden")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    ids = torch.tensor(targets.tokens.value_ids, dtype=torch.long, device=weight.device)
    if int(ids.max()) >= weight.shape[0]:
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of weight ({weight.shape[0]} rows)")
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # Only K rows of hidden and n_values rows of weight are upcast and multiplied.
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets.positions.to(hidden.device)).to(dtype)
    z = rows @ weight.index_select(0, ids).to(dtype).T
    if bias is not None:
        z = z + check_tensor("bias", bias).index_select(0, ids).to(dtype)
    return z


def _check_targets(targets: object, leading: torch.Size, name: str) -> None:
    if not isinstance(targets, BoxTargets):
        raise TypeError(f"targets must be a BoxTargets (see find_box_targets), got {type(targets).__name__}")
    rows = math.prod(leading)
    expected = targets.shape[0] * targets.shape[1]
    if rows != expected:
        raise ValueError(
            f"{name} has {rows} positions ({tuple(leading)}) but the box targets were found in a "
            f"{targets.shape} batch ({expected} positions)"
        )


def _pred_boxes(z: torch.Tensor, targets: BoxTargets, temperature: float, straight_through: bool) -> torch.Tensor:
    """``[M, 4]`` expected boxes (normalized) from the ``[K, n_values]`` value logits."""
    tokens = targets.tokens
    temperature = _check_temperature(temperature)
    check_bool("straight_through", straight_through)
    n = z.shape[-1]
    if tokens.kind == "bins":
        contrib = _expectation(
            z, (torch.arange(n, dtype=z.dtype, device=z.device) + 0.5) / n, temperature, straight_through
        )
    else:
        digits = torch.arange(10, dtype=z.dtype, device=z.device)
        divisor = tokens.grid_size if targets.divisor is None else targets.divisor.to(z)
        scale = 10.0 ** targets.place.to(z) / divisor
        contrib = _expectation(z, digits, temperature, straight_through) * scale
    slots = targets.box_index.to(z.device) * 4 + targets.coord_index.to(z.device)
    # index_add sums the digits of a number into its coordinate (and is a copy for bins).
    return z.new_zeros(targets.num_boxes * 4).index_add(0, slots, contrib).view(-1, 4)


@dataclass(frozen=True)
class _BoxTerms:
    """The box-loss options of :func:`box_loss`, :func:`box_loss_from_logits` and
    :func:`grounding_loss` (documented there), built once per call and applied to the
    value logits however those were computed."""

    l1_weight: float
    giou_weight: float
    temperature: float
    straight_through: bool
    num_boxes: int | float | torch.Tensor | None
    eps: float = DEFAULT_EPS

    def of(self, z: torch.Tensor, targets: BoxTargets) -> dict[str, torch.Tensor]:
        """``{"loss", "l1", "giou"}`` from the ``[K, n_values]`` value logits ``z``."""
        pred = _pred_boxes(z, targets, self.temperature, self.straight_through)
        target = targets.target_boxes.to(device=z.device, dtype=z.dtype)
        l1 = l1_box_loss(pred, target, num_boxes=self.num_boxes)
        g = giou_loss(pred, target, num_boxes=self.num_boxes, eps=self.eps)
        return {"loss": float(self.l1_weight) * l1 + float(self.giou_weight) * g, "l1": l1, "giou": g}


def box_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: BoxTargets,
    *,
    bias: torch.Tensor | None = None,
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
    temperature: float = 1.0,
    straight_through: bool = False,
    num_boxes: int | float | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> dict[str, torch.Tensor]:
    """L1 and GIoU losses of the expected boxes, from hidden states without full logits.

    Only the ``K`` coordinate rows of ``hidden`` and the digit or bin rows of
    ``weight`` enter a ``[K, D] @ [D, n_values]`` product; the rest of the
    vocabulary is never touched (cross-entropy, e.g.
    :func:`lmloss.linear_cross_entropy`, scores the tokens themselves).

    Args:
        hidden: ``[B, T, D]`` (or ``[B*T, D]``) final hidden states of the batch in
            which ``targets`` were found, any float dtype.
        weight: ``[V, D]`` the ``lm_head`` weight.
        targets: from :func:`find_box_targets`.
        bias: ``[V]`` optional ``lm_head`` bias.
        l1_weight, giou_weight: weights of the terms in ``"loss"``.
        temperature, straight_through: see :func:`expected_bin_coordinate` (digits:
            per digit).
        num_boxes: divisor of the means (boxes of the whole optimizer step, across
            micro-batches and ranks); default: the boxes in ``targets``.
        eps: see :func:`giou`.

    Returns:
        ``{"loss": l1_weight * l1 + giou_weight * giou, "l1": ..., "giou": ...}``,
        float32 scalars (float64 for float64 hidden): ``l1`` is the mean over boxes of
        the summed coordinate errors in normalized units, ``giou`` the mean of
        ``1 - GIoU``. With no box every term is an exact 0 attached to the graph.
    """
    options = _BoxTerms(l1_weight, giou_weight, temperature, straight_through, num_boxes, eps)
    return options.of(_gather_value_logits(hidden, weight, bias, targets), targets)


def box_loss_from_logits(
    logits: torch.Tensor,
    targets: BoxTargets,
    *,
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
    temperature: float = 1.0,
    straight_through: bool = False,
    num_boxes: int | float | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> dict[str, torch.Tensor]:
    """:func:`box_loss` on materialized ``[B, T, V]`` logits (same options, same result)."""
    logits = check_tensor("logits", logits)
    _check_targets(targets, logits.shape[:-1], "logits")
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, targets.positions.to(logits.device))
    options = _BoxTerms(l1_weight, giou_weight, temperature, straight_through, num_boxes, eps)
    return options.of(_value_logits(rows, targets.tokens.value_ids), targets)


def expected_boxes(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: BoxTargets,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    straight_through: bool = False,
) -> torch.Tensor:
    """``[M, 4]`` the model's expected boxes (normalized xyxy), one per target box."""
    z = _gather_value_logits(hidden, weight, bias, targets)
    return _pred_boxes(z, targets, temperature, straight_through)


def grounding_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    targets: BoxTargets,
    *,
    bias: torch.Tensor | None = None,
    l1_weight: float = 2.0,
    giou_weight: float = 0.2,
    temperature: float = 1.0,
    straight_through: bool = False,
    num_boxes: int | float | torch.Tensor | None = None,
    **ce_options: Any,
) -> dict[str, torch.Tensor]:
    """Token cross-entropy plus the box terms: ``ce + l1_weight * l1 + giou_weight * giou``.

    The default weights are NExT-Chat's (CE + 2 L1 + 0.2 (1 - GIoU)).

    Args:
        hidden: ``[B, T, D]`` final hidden states.
        weight: ``[V, D]`` ``lm_head`` weight.
        labels: ``[B, T]`` labels (the ones ``targets`` were found in).
        targets: from :func:`find_box_targets` on these labels.
        bias, l1_weight, giou_weight, temperature, straight_through, num_boxes: as in
            :func:`box_loss`.
        **ce_options: passed to :func:`lmloss.linear_cross_entropy` (e.g.
            ``num_items_in_batch``, ``ignore_index``, ``backend``); ``shift`` must
            agree with the targets.

    Returns:
        ``{"loss", "ce", "l1", "giou"}`` float32 scalars, for the backward pass and
        for logging.
    """
    from lmloss.fused import linear_cross_entropy

    shift = ce_options.pop("shift", targets.shift if isinstance(targets, BoxTargets) else True)
    _check_targets(targets, labels.shape, "labels")
    if shift != targets.shift:
        raise ValueError(f"shift={shift} but the box targets were found with shift={targets.shift}")
    ce = linear_cross_entropy(hidden, weight, labels, bias=bias, shift=shift, **ce_options)
    options = _BoxTerms(l1_weight, giou_weight, temperature, straight_through, num_boxes)
    terms = options.of(_gather_value_logits(hidden, weight, bias, targets), targets)
    return {"loss": ce + terms["loss"], "ce": ce, "l1": terms["l1"], "giou": terms["giou"]}
