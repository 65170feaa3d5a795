"""Policy-gradient losses of the GRPO family, normalized exactly across micro-batches and ranks.

Every formula below is transcribed from TRL 1.16 ``GRPOTrainer._compute_loss``
(``trl/trainer/grpo_trainer.py``) and tested against that method. Notation, per
sequence ``i`` and completion token ``t`` (``m`` the mask, ``A`` the advantage)::

    log r_it = logprobs_it - old_logprobs_it                         importance_sampling_level="token"
    log r_i  = sum_t m_it (logprobs_it - old_it) / max(sum_t m_it, 1)  "sequence" (GSPO)
    r        = exp(log r)

    grpo, bnpo, dr_grpo, dapo, luspo (PPO clip):
        l_it = -min(min(r, delta) * A, clamp(r, 1 - epsilon, 1 + epsilon_high) * A)
        (``min(r, delta)`` only with ``delta``: two-sided clipping, INTELLECT-2)
    cispo:  l_it = -min(r, epsilon_high).detach() * A * logprobs_it        (MiniMax-M1)
    sapo:   l_it = -(4 / tau) * sigmoid(tau * (r - 1)) * A,  tau = sapo_temperature_pos if A > 0
                                                                 else sapo_temperature_neg
    vespo:  l_it = -phi_i.detach() * A * logprobs_it,   phi_i = w_i^k * exp(lambda * (1 - w_i))
            log w_i = clamp(sum_t m_it clamp(log r_it, -20, 20), log 1e-8, 20)   (token level only)
            k, lambda = vespo_k_pos, vespo_lambda_pos if A >= 0 else vespo_k_neg, vespo_lambda_neg
            (lambda at least 1e-4; a phi that overflows counts 0, as in TRL's ``get_gamma_weights``)
    beta > 0 adds  beta * k3_it,  k3_it = exp(ref_it - logprobs_it) - (ref_it - logprobs_it) - 1
                   (times r with kl_importance_correction, TRL's use_bias_correction_kl).

Normalizers (what ``num_items_in_batch`` counts, and the per-batch definition used
without it)::

    dapo, cispo, bnpo,
    vespo:              sum_it m_it l_it / N_tokens          (per batch: max(sum_it m_it, 1))
    grpo, sapo:         sum_i (sum_t m_it l_it / max(sum_t m_it, 1)) / N_sequences   (per batch: B)
    dr_grpo:            sum_it m_it l_it / (N_sequences * max_completion_length)    (per batch: B)
    luspo:              sum_i sum_t m_it l_it / N_sequences                          (per batch: B)

TRL divides the per-batch grpo/bnpo/dr_grpo/sapo/luspo loss by the accumulation count,
which equals the big batch only when every micro-batch is the same size; here, with
``num_items_in_batch`` the step's count (:func:`lmloss.count_targets` with
``loss_type=``, summed over micro-batches and ranks), the micro-batch losses sum to
the big batch's loss exactly. TRL's off-policy/entropy masks and its vLLM importance-sampling
correction (the ``importance_sampling_ratio`` input, also folded into vespo's ``w_i``) are not
implemented.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from lmloss._validation import (
    check_choice,
    check_finite,
    check_num_items,
    check_positive,
    check_tensor,
    value_checks_enabled,
)

__all__ = [
    "LOSS_TYPES",
    "SEQUENCE_LOSS_TYPES",
    "TOKEN_LOSS_TYPES",
    "PolicyLossResult",
    "policy_loss",
]

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
# What each loss type divides by: target tokens or sequences.
TOKEN_LOSS_TYPES: tuple[str, ...] = ("dapo", "cispo", "bnpo", "vespo")
SEQUENCE_LOSS_TYPES: tuple[str, ...] = ("grpo", "sapo", "dr_grpo", "luspo")
LOSS_TYPES: tuple[str, ...] = TOKEN_LOSS_TYPES + SEQUENCE_LOSS_TYPES
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_PPO_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# VESPO's clamps on the sequence's log-ratio (TRL: log 1e-8 stands for a ratio floor of 1e-8).
_VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX = math.log(1e-8), 20.0
_VESPO_LAMBDA_MIN = 1e-4


class PolicyLossResult(NamedTuple):
    """``loss``: 0-dim float32, differentiable in ``logprobs``. ``metrics``: detached 0-dim
    float32 tensors (no host synchronisation): ``clip_ratio/low``, ``clip_ratio/high``,
    ``clip_ratio/region`` (fractions of scored tokens, or of sequences at sequence level,
    whose ratio is clipped where it matters for the sign of the advantage; for cispo
    ``high`` is the fraction with ``r > epsilon_high`` and ``A > 0``; sapo and vespo, which
    do not clip, report PPO's region ``[1 - epsilon, 1 + epsilon_high]``), ``ratio/mean``
    (mean importance ratio), ``approx_kl`` (mean k3 estimate of KL(pi_old || pi),
    ``r - 1 - log r``, over the same items) and ``kl`` (mean k3 to the reference,
    over scored tokens, only when ``ref_logprobs`` is given); for vespo also
    ``vespo/phi_seq_mean`` (mean gamma weight over the sequences, TRL's metric)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    kl_importance_correction: bool = False,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> PolicyLossResult:
    """The GRPO-family policy loss of one (micro-)batch; formulas in the module docstring.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled completion tokens under the current
            policy (e.g. :func:`lmloss.linear_token_logprobs`), differentiable.
        old_logprobs: ``[B, T]`` log-probs under the sampling policy; ``None`` means
            ``logprobs.detach()`` (one update per generation, as TRL does).
        advantages: ``[B]`` or ``[B, T]``, finite.
        mask: ``[B, T]`` bool or 0/1: the completion tokens that are scored.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``luspo`` or ``vespo``.
        epsilon: lower clip range, in ``[0, 1)``.
        epsilon_high: upper clip range (default ``epsilon``); for ``cispo`` the cap on
            the ratio itself, as in TRL.
        delta: upper bound on the unclipped ratio (two-sided clipping), ``> 1``.
        beta: coefficient of the k3 KL to ``ref_logprobs`` (``[B, T]``, needed when ``beta != 0``).
        importance_sampling_level: ``token`` or ``sequence`` (GSPO); ``vespo`` takes only
            ``token`` (it forms its own sequence-level weight).
        max_completion_length: the ``dr_grpo`` constant divisor per sequence.
        num_items_in_batch: the step's count of what ``loss_type`` divides by (tokens or
            sequences, see the module docstring), summed over micro-batches and ranks.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures (``> 0``).
        kl_importance_correction: multiply the k3 term by the importance ratio ``r``
            (TRL's ``use_bias_correction_kl``, on by default in TRL 1.16's config).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma-weight
            exponent ``k`` (``>= 0``) and decay ``lambda`` (``> 0``) for sequences with
            advantage ``>= 0`` and ``< 0``; TRL's defaults.

    Returns:
        :class:`PolicyLossResult` with ``.loss`` and ``.metrics``. Nothing scored: loss 0.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    eps_low, eps_high = _check_clip(loss_type, epsilon, epsilon_high, delta)
    check_positive("sapo_temperature_pos", sapo_temperature_pos)
    check_positive("sapo_temperature_neg", sapo_temperature_neg)
    gamma = _check_vespo(
        loss_type, importance_sampling_level, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg
    )
    if not isinstance(kl_importance_correction, bool):
        raise TypeError(f"kl_importance_correction must be True or False, got {kl_importance_correction!r}")
    logprobs, old, adv, m, ref = _check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, beta)
    if loss_type == "dr_grpo":
        _check_max_length(max_completion_length)
    num_items = check_num_items(num_items_in_batch)

    log_ratio = torch.where(m > 0, logprobs - old, 0.0)
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio.sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    ratio = torch.exp(log_ratio)
    phi = None
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logprobs
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        phi = _gamma_weights(log_ratio, adv, *gamma)
        per_token = -phi * adv * logprobs
    else:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)
    kl = None
    if ref is not None:
        diff = torch.where(m > 0, ref - logprobs, 0.0)
        kl = torch.exp(diff) - diff - 1
        if kl_importance_correction:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = torch.where(m > 0, per_token.expand_as(m), 0.0)
    loss = _normalize(per_token, m, loss_type, num_items, max_completion_length)
    metrics = _metrics(ratio, delta, adv, m, kl, loss_type, eps_low, eps_high)
    if phi is not None:
        metrics["vespo/phi_seq_mean"] = _masked_mean(phi, m)
    return PolicyLossResult(loss, metrics)


@torch.no_grad()
def _gamma_weights(
    log_ratio: torch.Tensor, adv: torch.Tensor, k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float
) -> torch.Tensor:
    """VESPO's sequence weight ``phi(w) = w^k exp(lambda (1 - w))`` (so ``phi(1) = 1``), detached.

    ``log_ratio``: ``[B, T]`` token log-ratios, 0 where unscored; ``adv``: ``[B, 1]`` or ``[B, T]``.
    Returns ``phi`` shaped like ``adv`` broadcast with ``[B, 1]``. Computed in log space: the
    sequence's ratio ``w`` is a product over its tokens and overflows long before ``phi`` does.
    """
    log_w = log_ratio.clamp(-20.0, 20.0).sum(-1, keepdim=True).clamp(_VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX)
    nonneg = adv >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=_VESPO_LAMBDA_MIN)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    # An overflowing weight (huge k) counts 0, as in TRL, rather than poisoning the loss.
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _normalize(
    per_token: torch.Tensor,
    m: torch.Tensor,
    loss_type: str,
    num_items: torch.Tensor | float | None,
    max_completion_length: int | None,
) -> torch.Tensor:
    """Sum the items of ``loss_type`` and divide by their count (``num_items`` or per batch)."""
    if loss_type in TOKEN_LOSS_TYPES:
        total, count = per_token.sum(), m.sum().clamp(min=1.0)
    else:
        if loss_type in ("grpo", "sapo"):
            per_seq = per_token.sum(-1) / m.sum(-1).clamp(min=1.0)
        else:  # dr_grpo, luspo: per-sequence sums
            per_seq = per_token.sum(-1)
        total, count = per_seq.sum(), torch.tensor(float(per_seq.numel()), device=m.device)
        if loss_type == "dr_grpo":
            total = total / float(max_completion_length)  # type: ignore[arg-type]  # dr_grpo: set (checked)
    if num_items is not None:
        divisor = num_items if isinstance(num_items, float) else num_items.to(torch.float32)
        # An empty step (0 items) gives 0, never NaN: every summed term is 0 then.
        return total / (divisor.clamp(min=1.0) if isinstance(divisor, torch.Tensor) else max(divisor, 1.0))
    return total / count


def _metrics(
    ratio: torch.Tensor,
    delta: float | None,
    adv: torch.Tensor,
    m: torch.Tensor,
    kl: torch.Tensor | None,
    loss_type: str,
    eps_low: float,
    eps_high: float,
) -> dict[str, torch.Tensor]:
    """Masked means over scored tokens (or sequences at sequence level), detached."""
    with torch.no_grad():
        ratio = ratio.detach()
        if loss_type == "cispo":
            low = torch.zeros_like(ratio, dtype=torch.bool)
            high = (ratio > eps_high) & (adv > 0)
        else:
            # TRL measures clipping on the ratio after the delta cap.
            capped = ratio if delta is None else torch.clamp(ratio, max=delta)
            low = (capped < 1 - eps_low) & (adv < 0)
            high = (capped > 1 + eps_high) & (adv > 0)
        log_ratio = torch.log(ratio)
        out = {
            "clip_ratio/low": _masked_mean(low.float(), m),
            "clip_ratio/high": _masked_mean(high.float(), m),
            "clip_ratio/region": _masked_mean((low | high).float(), m),
            "ratio/mean": _masked_mean(ratio, m),
            "approx_kl": _masked_mean(ratio - 1 - log_ratio, m),
        }
        if kl is not None:
            out["kl"] = _masked_mean(kl.detach(), m)
    return out


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over scored tokens; a ``[B, 1]`` (sequence-level) value is a mean over the B sequences."""
    if x.shape[-1] == 1 and m.shape[-1] != 1:
        return x.mean()
    return torch.where(m > 0, x, 0.0).sum() / m.sum().clamp(min=1.0)


def _check_clip(loss_type: str, epsilon: object, epsilon_high: object, delta: object) -> tuple[float, float]:
    eps = check_finite("epsilon", epsilon)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"epsilon must be in [0, 1) (the ratio is clipped below at 1 - epsilon), got {eps}")
    high = eps if epsilon_high is None else check_finite("epsilon_high", epsilon_high)
    if high < 0.0 or (loss_type == "cispo" and high == 0.0):
        raise ValueError(f"epsilon_high must be >= 0 (> 0 for cispo, where it caps the ratio), got {high}")
    if delta is not None and check_finite("delta", delta) <= 1.0:
        raise ValueError(f"delta caps the ratio from above and must be > 1, got {delta}")
    return eps, high


def _check_vespo(
    loss_type: str, level: str, k_pos: object, lambda_pos: object, k_neg: object, lambda_neg: object
) -> tuple[float, float, float, float]:
    """VESPO's exponents (``>= 0``) and decays (``> 0``); vespo is token-level only."""
    if loss_type == "vespo" and level != "token":
        raise ValueError(
            f"loss_type='vespo' forms its own sequence-level weight from the token ratios; "
            f"importance_sampling_level={level!r} does not apply to it: use importance_sampling_level='token'"
        )
    exp_pos, exp_neg = check_finite("vespo_k_pos", k_pos), check_finite("vespo_k_neg", k_neg)
    for name, value in (("vespo_k_pos", exp_pos), ("vespo_k_neg", exp_neg)):
        if value < 0.0:
            raise ValueError(f"{name} is the gamma weight's exponent and must be >= 0, got {value}")
    lam_pos = check_positive("vespo_lambda_pos", lambda_pos)
    lam_neg = check_positive("vespo_lambda_neg", lambda_neg)
    return exp_pos, lam_pos, exp_neg, lam_neg


def _check_inputs(
    logprobs: object,
    old_logprobs: object,
    advantages: object,
    mask: object,
    ref_logprobs: object,
    beta: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Shapes ``[B, T]``/``[B]``, dtypes, and finite advantages; everything in float32."""
    lp = check_tensor("logprobs", logprobs)
    if lp.ndim != 2 or not lp.is_floating_point():
        raise ValueError(f"logprobs must be a floating [B, T] tensor, got shape {tuple(lp.shape)} {lp.dtype}")
    shape = lp.shape
    m = check_tensor("mask", mask)
    if m.shape != shape:
        raise ValueError(f"mask has shape {tuple(m.shape)} but logprobs has {tuple(shape)}; both must be [B, T]")
    old = lp.detach() if old_logprobs is None else _same_shape("old_logprobs", old_logprobs, shape)
    adv = check_tensor("advantages", advantages)
    if adv.shape not in (shape[:1], shape):
        raise ValueError(
            f"advantages has shape {tuple(adv.shape)}; expected [B]={tuple(shape[:1])} or [B, T]={tuple(shape)}"
        )
    if value_checks_enabled() and not bool(torch.isfinite(adv).all()):
        bad = torch.nonzero(~torch.isfinite(adv))[0].tolist()
        raise ValueError(f"advantages must be finite; advantages{bad} = {adv[tuple(bad)].item()}")
    b = check_finite("beta", beta)
    ref = None if ref_logprobs is None else _same_shape("ref_logprobs", ref_logprobs, shape)
    if b != 0.0 and ref is None:
        raise ValueError(f"beta={b} needs ref_logprobs (the reference model's [B, T] log-probs); or set beta=0")
    adv = adv.float() if adv.ndim == 2 else adv.float().unsqueeze(-1)
    m = m.detach().float()
    return lp.float(), old.detach().float(), adv, m, None if ref is None else ref.detach().float()


def _same_shape(name: str, value: object, shape: torch.Size) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.shape != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logprobs has {tuple(shape)}")
    return tensor


def _check_max_length(max_completion_length: object) -> None:
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' divides by max_completion_length: pass max_completion_length=")
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
        raise TypeError(f"max_completion_length must be an int, got {max_completion_length!r}")
    if max_completion_length <= 0:
        raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}")
