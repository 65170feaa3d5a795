"""``causal_lm_loss``: next-token cross-entropy on materialized logits.

This is the executable spec of lmloss: every faster backend is tested against it,
so it favours being obviously right over being fast. It is still careful with
memory: logits are upcast to float32 one chunk of rows at a time, and when a
gradient is needed each chunk is recomputed in backward (activation
checkpointing), so no ``[tokens, vocab]`` float32 copy of the logits ever exists.

How the loss is built, in four steps:

1. *Align*: with ``shift=True`` the targets of positions ``0..T-1`` are
   ``labels[..., 1:]`` followed by ``ignore_index`` (the last position scores
   nothing). Token weights are shifted the same way.
2. *Score*: for every position whose target is not ignored (and whose weight is not
   zero), the per-token loss ``logsumexp(z) - z[y]`` (+ label smoothing), times the
   DFT or focal weight of the token if asked for, + z-loss, in float32, on the
   softcapped logits ``z`` (with class weights: each class's log-loss weighted, as
   ``torch.nn.functional.cross_entropy(weight=...)``). All other positions hold exactly 0.
3. *Weigh*: multiply by the token weights (1 for a plain loss); with
   ``normalize="sequence"`` divide each row by its own weight sum.
4. *Reduce*: sum, or divide the sum by the item count (``num_items_in_batch`` when
   given). ``reduction="none"`` returns step 3, moved back to label alignment.
"""

from __future__ import annotations

from functools import partial

import torch

from lmloss._engine.logits_rows import LOGITS_CHUNK_BYTES, scored_row_losses

# TargetPlan, plan_targets, to_label_alignment, mean_over_items: re-exported for older imports from here.
from lmloss._engine.plan import TargetPlan as TargetPlan
from lmloss._engine.plan import compute_dtype, finish, prepare
from lmloss._engine.plan import mean_over_items as mean_over_items
from lmloss._engine.plan import plan_targets as plan_targets
from lmloss._engine.plan import to_label_alignment as to_label_alignment
from lmloss._spec import LossSpec, Normalize, Reduction, TokenLoss
from lmloss._validation import check_labels_on, check_logits

__all__ = ["causal_lm_loss"]


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
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
) -> torch.Tensor:
    """Next-token cross-entropy of a causal language model.

    Args:
        logits: ``[..., T, V]`` scores of any float dtype (e.g. ``[batch, seq_len, vocab]``).
            The math runs in float32 (float64 for float64 logits).
        labels: ``[..., T]`` integer token ids, ``ignore_index`` where nothing is trained.
            With ``shift=True`` these are the model's input ids (masked), as in
            transformers: position ``t`` is scored against ``labels[..., t+1]``.
        shift: ``False`` if ``labels`` are already aligned with the positions.
        ignore_index: label value that is never a target; such targets add nothing
            to the loss, the count or the gradient.
        reduction: ``"mean"`` (sum / item count), ``"sum"``, or ``"none"`` (a
            ``[..., T]`` tensor aligned with ``labels``: entry ``t`` holds the
            weighted loss of target ``labels[..., t]``, 0 where nothing is scored;
            its sum always equals the ``"sum"`` reduction).
        num_items_in_batch: the divisor of ``"mean"``: the number of items (target
            tokens, weight sum with ``token_weights``, or sequences with
            ``normalize="sequence"``) in the whole optimizer step, across
            micro-batches and ranks (see ``lmloss.count_targets``). Default: the
            count in this call.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``, in ``[0, 1]``.
        z_loss: coefficient ``c``; adds ``c * logsumexp(logits) ** 2`` per scored
            token (PaLM).
        softcap: ``s`` replaces the logits by ``s * tanh(logits / s)`` (Gemma 2).
        token_weights: ``[..., T]`` non-negative weights aligned with ``labels``
            (shifted with them), or a bool/0-1 loss mask. ``"mean"`` then divides by
            the weight sum of the scored targets. Weights are constants: no gradient
            flows into them (as with DFT's detached probabilities).
        normalize: ``"token"`` (every target token counts once) or ``"sequence"``
            (each row of ``labels`` is first averaged over its own targets; items
            are the rows that have a target).
        token_loss: the per-token loss form, with ``p_t = exp(-(logsumexp(z) - z[y]))``
            the probability of the target under the (softcapped) logits:

            - ``"ce"``: plain cross-entropy.
            - ``"dft"``: Dynamic Fine-Tuning (Wu et al. 2025, TRL ``loss_type="dft"``,
              LLaMA-Factory ``use_dft_loss``): the cross-entropy times the *detached*
              ``p_t``. ``"mean"`` still divides by the usual item count (target
              tokens or ``num_items_in_batch``), not by the sum of ``p_t``, as TRL
              and LLaMA-Factory do.
            - ``"focal"``: the cross-entropy times the *detached* weight
              ``(1 - p_t) ** focal_gamma`` (a token weighting: the gradient is the
              CE gradient, rescaled).
            - ``"focal_attached"``: the focal loss of Lin et al. (2017),
              ``-(1 - p_t) ** gamma * log p_t``, differentiated through the weight too.

            The weight multiplies the label-smoothed cross-entropy (the weight
            itself always uses the hard target's ``p_t``; TRL and LLaMA-Factory
            have no smoothing with DFT) and the ``token_weights``. The z-loss term
            is *not* weighted: it regularizes the log-normalizer, whatever the
            target's probability.
        focal_gamma: ``gamma >= 0`` of the focal forms (default 2.0); refused with
            any other ``token_loss``. ``gamma = 0`` is plain cross-entropy.
        class_weights: ``[V]`` finite, non-negative weights of the classes, exactly
            ``weight`` of ``torch.nn.functional.cross_entropy``: a token's loss is
            ``(1-e) * u[y] * (-log p_y) + e / V * sum_j u[j] * (-log p_j)`` (label
            smoothing ``e``), and ``"mean"`` divides by the sum of ``u[y]`` over the
            targets (times their ``token_weights``; ``num_items_in_batch``, if given,
            replaces that sum). The z-loss is weighted by ``u[y]`` too (so without
            smoothing, class weights equal ``token_weights=u[labels]``, and scaling
            ``u`` leaves the mean unchanged, as in torch); DFT/focal weights use the
            unweighted ``p_y``. Where torch's mean is 0/0 (every target weighing 0:
            NaN), the mean is 0 with zero gradients. Constants: no gradient flows into them.

    Returns:
        A float32 scalar (float64 for float64 logits; ``[..., T]`` for
        ``reduction="none"``). With no target at
        all the loss is an exact, finite 0 that stays attached to the graph, and
        every gradient is zero.

    Raises:
        ValueError: on a label outside ``[0, V)`` that is not ``ignore_index``
            (with its position), mismatched shapes or devices, wrong dtypes,
            unknown options or a bad ``num_items_in_batch``.
    """
    spec = LossSpec.from_arguments(locals())  # first: locals() holds only the parameters
    logits = check_logits(logits)
    labels = check_labels_on(labels, logits.shape[:-1], logits.device, "logits")
    vocab_size = logits.shape[-1]
    dtype = compute_dtype(logits.dtype)
    plan, num_items = prepare(labels, token_weights, num_items_in_batch, vocab_size, spec, dtype, class_weights)
    scored = (plan.coef != 0).reshape(-1)
    # Rows are upcast chunk by chunk (only the scored ones); the per-row math is _row_losses.
    row_losses = partial(_row_losses, spec=spec, class_weights=plan.class_weights)
    per_token = scored_row_losses(
        row_losses, (logits.reshape(-1, vocab_size),), plan.targets.reshape(-1), scored, dtype, LOGITS_CHUNK_BYTES
    )
    weighted = per_token * plan.coef.reshape(-1)
    return finish(weighted if spec.reduction == "none" else weighted.sum(), plan, labels.shape, spec, num_items)


def _row_losses(
    z: torch.Tensor, targets: torch.Tensor, spec: LossSpec, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n]`` losses of ``[n, V]`` logits (already in the compute dtype)."""
    softcap, label_smoothing, z_loss = spec.softcap, spec.label_smoothing, spec.z_loss
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, targets.unsqueeze(1)).squeeze(1)
    if class_weights is not None:
        return _class_weighted_losses(z, lse, nll, targets, spec, class_weights)
    loss = nll
    if label_smoothing > 0:
        # F.cross_entropy's smoothing: (1-e)*nll + e * mean over classes of -log p.
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    if spec.token_loss != "ce":
        loss = loss * target_weight(-nll, spec.token_loss, spec.gamma)
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
    return loss


def _class_weighted_losses(
    z: torch.Tensor, lse: torch.Tensor, nll: torch.Tensor, targets: torch.Tensor, spec: LossSpec, u: torch.Tensor
) -> torch.Tensor:
    """``[n]`` losses with class weights ``u`` (``[V]``): F.cross_entropy(weight=u)'s
    ``(1-e) u_y (-log p_y) + e/V sum_j u_j (-log p_j)``, times the DFT/focal weight,
    plus the z-loss weighted by ``u_y``."""
    e = spec.label_smoothing
    u_y = u[targets]
    loss = u_y * nll
    if e > 0:
        neg_log_p = lse.unsqueeze(1) - z  # -log p_j, every class
        loss = (1.0 - e) * loss + (e / z.shape[1]) * (neg_log_p * u).sum(dim=-1)
    if spec.token_loss != "ce":
        loss = loss * target_weight(-nll, spec.token_loss, spec.gamma)
    if spec.z_loss > 0:
        loss = loss + spec.z_loss * u_y * lse.square()
    return loss


def target_weight(log_p: torch.Tensor, token_loss: str, focal_gamma: float) -> torch.Tensor:
    """The DFT or focal weight of each token from ``[n]`` target log-probabilities.

    ``"dft"``: ``p``; ``"focal"``: ``(1 - p) ** gamma``, both detached;
    ``"focal_attached"``: ``(1 - p) ** gamma`` with its gradient.
    """
    if token_loss == "dft":
        return log_p.detach().exp()
    # 1 - p via expm1 keeps its precision when p is close to 1 (the tokens focal
    # weighting is about); the clamp guards a log_p rounded above 0.
    q = torch.clamp(-torch.expm1(log_p), min=0.0)
    if token_loss == "focal":
        return q.detach().pow(focal_gamma)
    if focal_gamma == 0:
        return torch.ones_like(q)
    # d q^gamma / dq is infinite at q = 0 for gamma < 1; take the weight's limit 0
    # there, with a zero gradient (the chunked backend does the same).
    positive = q > 0
    safe = torch.where(positive, q, torch.ones_like(q))
    return torch.where(positive, safe.pow(focal_gamma), torch.zeros_like(q))
