"""The per-token loss terms and the gradient of the logits, written once.

Every fast path (the chunked backend, the Triton host code, vocabulary parallelism)
computes a token's loss from a few row statistics and turns a chunk of softmax
probabilities into the gradient of its logits with these functions. The reference
(``lmloss.reference``) is a separate, straightforward implementation of the same
definition, which the tests hold these to.

For one row: logits ``z`` (after the softcap), target ``y``, vocabulary size ``V``,
log-sum-exp ``L``, target log-likelihood ``nll = L - z_y``, label smoothing ``e``,
z-loss coefficient ``c``, the token's coefficient ``a`` (weight and normalization,
from the target plan) and its DFT/focal weight ``w`` (1 for plain cross-entropy):

    ce   = (1-e) * nll + e * (L - sum(z) / V)
    loss = a * (w * ce + c * L^2)

The weight comes from the hard target's probability ``p = exp(-nll)``: DFT
``w = p``, focal ``w = (1-p)^gamma``, both detached. With ``s = softmax(z)``:

    d loss / dz = a * ((w + 2cL + k) * s - ((1-e) * w + k) * onehot(y) - w * e / V)

where ``k = 0`` for the detached weights and, for the attached focal loss (Lin et al.
2017), ``k = gamma * (1-p)^(gamma-1) * p * ce``: ``dw/dz = -gamma (1-p)^(gamma-1) dp/dz``
and ``dp/dz = p * (onehot(y) - s)``, so ``ce * dw/dz = k * (s - onehot(y))``. At
``p = 1`` (``gamma < 1`` makes ``(1-p)^(gamma-1)`` infinite) the weight's limit 0 is
taken, with ``k = 0``. The z-loss is not weighted by ``w``: it regularizes the
normalizer whatever the target's probability.

The softcap ``s_c`` replaces raw logits ``r`` by ``z = s_c * tanh(r / s_c)``, so the
gradient of the raw logits is the one above times ``dz/dr = 1 - (z / s_c)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmloss._spec import LossSpec

__all__ = ["LossMath", "Terms", "softcap_", "token_terms", "logits_grad_"]


@dataclass(frozen=True)
class LossMath:
    """The per-token options the row math needs, as plain Python numbers."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    token_loss: str = "ce"  # "ce", "dft", "focal" or "focal_attached"
    focal_gamma: float = 0.0

    @classmethod
    def from_spec(cls, spec: LossSpec) -> LossMath:
        softcap = None if spec.softcap is None else float(spec.softcap)
        return cls(float(spec.label_smoothing), float(spec.z_loss), softcap, spec.token_loss, spec.gamma)

    @property
    def weighted(self) -> bool:
        """Whether each token's cross-entropy is scaled by a DFT/focal weight ``w``."""
        return self.token_loss != "ce"

    @property
    def attached(self) -> bool:
        """Whether the weight's own derivative (the term ``k``) enters the gradient."""
        return self.token_loss == "focal_attached" and self.focal_gamma != 0


@dataclass(frozen=True)
class Terms:
    """Per-token results (each ``[c]``): the loss before the coefficient ``a``, and the
    weight ``w`` and gradient term ``k`` (None when not used), which the gradient needs."""

    loss: torch.Tensor
    w: torch.Tensor | None
    k: torch.Tensor | None


def softcap_(z: torch.Tensor, softcap: float | None, derivative: torch.Tensor | None = None) -> torch.Tensor | None:
    """``z <- s * tanh(z / s)`` in place. With a ``derivative`` buffer (``z``'s shape),
    writes ``1 - (z / s)^2`` into it and returns it; else returns None."""
    if softcap is None:
        return None
    z.div_(softcap).tanh_()
    if derivative is not None:
        torch.mul(z, z, out=derivative).neg_().add_(1.0)
    z.mul_(softcap)
    return derivative


def token_terms(
    lse: torch.Tensor, nll: torch.Tensor, sum_z: torch.Tensor | None, math: LossMath, vocab_size: int
) -> Terms:
    """``[c]`` losses from the log-sum-exp, the target's ``nll`` and the logit sums
    (``sum_z`` is used only with label smoothing)."""
    ce = nll
    if math.label_smoothing > 0 and sum_z is not None:
        ce = (1.0 - math.label_smoothing) * nll + math.label_smoothing * (lse - sum_z / vocab_size)
    w, k = _token_weight(nll, ce, math)
    loss = ce if w is None else ce * w
    if math.z_loss > 0:
        loss = loss + math.z_loss * lse.square()
    return Terms(loss, w, k)


def _token_weight(
    nll: torch.Tensor, ce: torch.Tensor, math: LossMath
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """DFT/focal weight ``w`` of each row and, for the attached focal loss, ``k``."""
    if not math.weighted:
        return None, None
    p = torch.exp(-nll)
    if math.token_loss == "dft":
        return p, None
    q = torch.clamp(-torch.expm1(-nll), min=0.0)  # 1 - p, precise near p = 1
    if math.focal_gamma == 0:
        return torch.ones_like(q), None
    w = q.pow(math.focal_gamma)
    if not math.attached:
        return w, None
    positive = q > 0
    safe = torch.where(positive, q, torch.ones_like(q))
    k = math.focal_gamma * safe.pow(math.focal_gamma - 1.0) * p * ce
    return w, torch.where(positive, k, torch.zeros_like(k))


def logits_grad_(
    probs: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | float,
    lse: torch.Tensor,
    terms: Terms,
    math: LossMath,
    vocab_size: int,
    *,
    to_softmax: torch.Tensor | None = None,
    own: torch.Tensor | None = None,
    cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """``probs`` <- d(sum of a * loss)/d(raw logits), in place; returns it.

    Args:
        probs: ``[c, V_r]`` the softmax (or, with ``to_softmax``, ``exp(z - m)`` whose
            row ``i`` times ``to_softmax[i]`` is the softmax).
        y: ``[c]`` target columns of this block (any column where ``own`` is False).
        a: ``[c]`` coefficients (0: the row adds nothing), or ``1.0`` for every row: the
            gradient is linear in ``a``, so a caller may scale the rows later (on the
            ``[c, D]`` side of the products), and plain cross-entropy then skips a pass
            over ``probs``.
        lse, terms: the row's log-sum-exp and :func:`token_terms`.
        vocab_size: the full ``V`` (label smoothing spreads over all of it).
        own: ``[c]`` whether the target lies in this block (a vocabulary shard); None: always.
        cap: the softcap derivative, or None.
    """
    w, k = terms.w, terms.k
    aw = a if w is None else a * w
    row_scale = aw + 2.0 * math.z_loss * a * lse if math.z_loss > 0 else aw
    onehot = (1.0 - math.label_smoothing) * aw
    if k is not None:
        row_scale, onehot = row_scale + a * k, onehot + a * k
    if to_softmax is not None:
        row_scale = row_scale * to_softmax
    if not (isinstance(row_scale, float) and row_scale == 1.0):  # 1: probs is already the gradient's dense part
        probs.mul_(_per_row(row_scale, probs))
    if math.label_smoothing > 0:
        probs.sub_(_per_row(aw * (math.label_smoothing / vocab_size), probs))
    if probs.shape[1] > 0:
        hit = _per_row(onehot, probs).neg()
        if own is not None:
            hit = torch.where(own.unsqueeze(1), hit, torch.zeros_like(hit))
        probs.scatter_add_(1, y.unsqueeze(1), hit)
    if cap is not None:
        probs.mul_(cap)
    return probs


def _per_row(value: torch.Tensor | float, probs: torch.Tensor) -> torch.Tensor:
    """``[c, 1]`` column of a per-row value (a ``[c]`` tensor or one number for every row)."""
    column = torch.as_tensor(value, dtype=probs.dtype, device=probs.device)
    return column.expand(probs.shape[0]).unsqueeze(1)
