"""Preference losses (DPO family, SimPO, ORPO, KTO) on sequence log-probs, as TRL 1.16 defines them.

Each loss takes per-sequence log-probs (``[B]``) and returns per-example losses
(reduce them with ``.mean()``, as TRL does) and the implicit rewards TRL logs.
:func:`sequence_logprobs` makes those log-probs from logits or, without ``[N, V]``
logits, from hidden states and the ``lm_head`` weight; a batch holds the chosen
completions first and the rejected ones second (TRL's ``[chosen; rejected]`` layout).

Sources (TRL 1.16): ``DPOTrainer._compute_loss`` (sigmoid, hinge, ipo, robust),
``experimental/cpo/CPOTrainer.cpo_loss`` (simpo), ``experimental/orpo/
ORPOTrainer.odds_ratio_loss`` (orpo), ``KTOTrainer`` (kto, the ``loss_type="kto"`` branch).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from lmloss._validation import check_choice, check_finite, check_positive, check_tensor
from lmloss.logprobs import linear_token_logprobs, token_logprobs

__all__ = [
    "DPO_LOSS_TYPES",
    "PreferenceLoss",
    "SequenceLogprobs",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "sequence_logprobs",
    "simpo_loss",
]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "robust")


class PreferenceLoss(NamedTuple):
    """``losses``: per-example float32 losses (``[B]``; KTO: ``[B_chosen + B_rejected]``);
    ``chosen_rewards``/``rejected_rewards``: the detached implicit rewards TRL logs."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class SequenceLogprobs(NamedTuple):
    """``logps``: ``[B]`` per-sequence sum (or mean) of the scored tokens' log-probs;
    ``counts``: ``[B]`` scored tokens per sequence. ``chosen``/``rejected``: the first
    and second half of ``logps`` (TRL's ``[chosen; rejected]`` batch layout)."""

    logps: torch.Tensor
    counts: torch.Tensor

    @property
    def chosen(self) -> torch.Tensor:
        return self.logps[: self._half()]

    @property
    def rejected(self) -> torch.Tensor:
        return self.logps[self._half() :]

    def _half(self) -> int:
        if self.logps.shape[0] % 2:
            raise ValueError(f"a [chosen; rejected] batch has an even size, got {self.logps.shape[0]} sequences")
        return self.logps.shape[0] // 2


def sequence_logprobs(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    temperature: float = 1.0,
    average: bool = False,
    backend: Literal["auto", "reference", "chunked"] = "auto",
    chunk_size: int | None = None,
) -> SequenceLogprobs:
    """Per-sequence log-probs of ``labels``: from logits, or from hidden states when ``weight`` is given.

    Args:
        inputs: ``[B, T, V]`` logits, or ``[B, T, D]`` hidden states with ``weight``.
        labels: ``[B, T]`` token ids; ``ignore_index`` on prompt and padding.
        weight, bias: the ``lm_head`` (``[V, D]``, ``[V]``): then the log-probs come from
            :func:`lmloss.linear_token_logprobs` (``backend``, ``chunk_size``).
        shift, ignore_index, temperature: as in :func:`lmloss.token_logprobs`.
        average: the mean over scored tokens instead of the sum (SimPO, ORPO, TRL's IPO);
            0 for a sequence with nothing scored.

    Returns:
        :class:`SequenceLogprobs`; differentiable in ``inputs`` (and ``weight``, ``bias``).
    """
    if not isinstance(average, bool):
        raise TypeError(f"average must be True or False, got {average!r}")
    options = {"shift": shift, "ignore_index": ignore_index, "temperature": temperature}
    if weight is None:
        if bias is not None:
            raise ValueError("bias is only used with weight= (hidden states as inputs)")
        per_token = token_logprobs(inputs, labels, **options).logprobs  # type: ignore[arg-type]  # it checks them
    else:
        per_token = linear_token_logprobs(
            inputs,
            weight,
            labels,
            bias=bias,
            backend=backend,
            chunk_size=chunk_size,
            **options,  # type: ignore[arg-type]  # dict of mixed option types; linear_token_logprobs checks them
        ).logprobs
    if per_token.ndim != 2:
        raise ValueError(f"labels must be [B, T] (one row per sequence), got shape {tuple(labels.shape)}")
    counts = _scored_counts(labels, shift, ignore_index)
    logps = per_token.sum(-1)
    if average:
        logps = logps / counts.clamp(min=1).to(logps.dtype)
    return SequenceLogprobs(logps, counts)


def _scored_counts(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    scored = labels[..., 1:] if shift else labels
    return (scored != ignore_index).sum(-1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO and its variants, per pair, with ``d = (chosen - ref_chosen) - (rejected - ref_rejected)``::

        sigmoid:  -(1 - ls) * logsigmoid(beta d) - ls * logsigmoid(-beta d)   (cDPO label smoothing)
        hinge:    relu(1 - beta d)                                           (SLiC)
        ipo:      (d - 1 / (2 beta))^2                                       (IPO, eq. 17)
        robust:   (-(1 - ls) logsigmoid(beta d) + ls logsigmoid(-beta d)) / (1 - 2 ls)   (rDPO)

    TRL 1.16's ``sigmoid`` has no label smoothing (its ``aot`` does); here ``ls = 0``
    is TRL's loss exactly. TRL's ``ipo`` uses per-token averages of the log-ratios: pass
    ``sequence_logprobs(..., average=True)`` log-probs (policy and reference) for it.

    Args:
        chosen_logps, rejected_logps: ``[B]`` policy log-probs of the chosen/rejected completions.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference model.
        beta: ``> 0``.
        loss_type: ``sigmoid``, ``hinge``, ``ipo`` or ``robust``.
        label_smoothing: the probability that a preference label is flipped, in
            ``[0, 0.5)`` (``sigmoid``, ``robust``; must be 0 for ``hinge``/``ipo``).

    Returns:
        :class:`PreferenceLoss` with rewards ``beta * (logps - ref_logps)``.
    """
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    b = check_positive("beta", beta)
    ls = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= ls < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {ls}")
    if ls and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing={ls} has no meaning for loss_type={loss_type!r}; leave it 0")
    pc, pr, rc, rr = _pair_inputs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    d = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(b * d) - ls * F.logsigmoid(-b * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - b * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * b)) ** 2
    else:
        losses = (-(1 - ls) * F.logsigmoid(b * d) + ls * F.logsigmoid(-b * d)) / (1 - 2 * ls)
    return PreferenceLoss(losses, b * chosen_ratio.detach(), b * rejected_ratio.detach())


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (TRL ``CPOTrainer`` with ``loss_type="simpo"``), reference-free, per pair::

        z = (chosen - rejected) - gamma / beta
        loss = -(1 - ls) * logsigmoid(beta z) - ls * logsigmoid(-beta z)

    ``chosen_logps``/``rejected_logps`` are per-token averages (``sequence_logprobs(...,
    average=True)``), as TRL computes them for SimPO. ``gamma`` is TRL's ``simpo_gamma``
    (the target reward margin). Rewards: ``beta * logps``. TRL's CPO adds
    ``cpo_alpha * NLL(chosen)`` on top (0 for pure SimPO).
    """
    b = check_positive("beta", beta)
    g = check_finite("gamma", gamma)
    ls = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= ls < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {ls}")
    pc, pr = _pair_inputs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    z = (pc - pr) - g / b
    losses = -F.logsigmoid(b * z) * (1 - ls) - F.logsigmoid(-b * z) * ls
    return PreferenceLoss(losses, b * pc.detach(), b * pr.detach())


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 0.1) -> PreferenceLoss:
    """ORPO's odds-ratio term (TRL ``ORPOTrainer.odds_ratio_loss``), per pair::

        log_odds = (chosen - rejected) - (log(1 - exp(chosen)) - log(1 - exp(rejected)))
        loss     = -beta * logsigmoid(log_odds)

    with per-token average log-probs (``sequence_logprobs(..., average=True)``), as
    TRL's ORPO. The ORPO objective is ``NLL(chosen) + loss.mean()``; TRL returns the
    negative (``beta * logsigmoid``) and subtracts its mean. Rewards: ``beta * logps``.
    """
    b = check_positive("beta", beta)
    pc, pr = _pair_inputs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    return PreferenceLoss(-b * F.logsigmoid(log_odds), b * pc.detach(), b * pr.detach())


def kto_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    kl: torch.Tensor | float = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO (TRL ``KTOTrainer``, ``loss_type="kto"``), unpaired: ``chosen`` are the desirable
    examples, ``rejected`` the undesirable ones (their counts may differ)::

        chosen:    desirable_weight   * (1 - sigmoid(beta * ((chosen - ref_chosen) - kl)))
        rejected:  undesirable_weight * (1 - sigmoid(beta * (kl - (rejected - ref_rejected))))

    ``kl`` is the detached reference point: TRL uses ``mean(kl_logps - ref_kl_logps)``
    over mismatched prompt/completion pairs, averaged over ranks and clamped at 0
    (0 with ``calculate_KL=False``). ``losses`` is ``[chosen losses; rejected losses]``.
    """
    b = check_positive("beta", beta)
    dw, uw = check_finite("desirable_weight", desirable_weight), check_finite("undesirable_weight", undesirable_weight)
    if dw < 0 or uw < 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {dw}, {uw}")
    pc, rc = _pair_inputs(chosen_logps=chosen_logps, ref_chosen_logps=ref_chosen_logps)
    pr, rr = _pair_inputs(rejected_logps=rejected_logps, ref_rejected_logps=ref_rejected_logps)
    ref_point = kl.detach().float() if isinstance(kl, torch.Tensor) else check_finite("kl", kl)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    chosen_losses = 1 - torch.sigmoid(b * (chosen_ratio - ref_point))
    rejected_losses = 1 - torch.sigmoid(b * (ref_point - rejected_ratio))
    losses = torch.cat([dw * chosen_losses, uw * rejected_losses])
    return PreferenceLoss(losses, b * chosen_ratio.detach(), b * rejected_ratio.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _pair_inputs(**tensors: object) -> list[torch.Tensor]:
    """1-D float tensors, all the same shape; float32 math."""
    out: list[torch.Tensor] = []
    first = None
    for name, value in tensors.items():
        t = check_tensor(name, value)
        if t.ndim != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating [B] tensor (one log-prob per sequence), got {tuple(t.shape)}")
        if first is not None and t.shape != first[1].shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first[0]} has {tuple(first[1].shape)}")
        first = first or (name, t)
        out.append(t.float())
    return out
