"""Knowledge distillation: match a teacher's next-token distribution.

Per scored position (the targets of ``causal_lm_loss``: ``labels != ignore_index``,
shifted the same way), with student logits ``s``, teacher logits ``t``, the
temperature ``tau`` and the mixing weight ``alpha``:

    kd   = tau^2 * KL(softmax(t / tau) || softmax(s / tau))      (Hinton et al. 2015)
    loss = alpha * kd + (1 - alpha) * CE(s, label)               (CE at temperature 1)

The ``tau^2`` keeps the gradient's scale independent of ``tau``: ``d kd / d s =
tau * (softmax(s / tau) - softmax(t / tau))``. Token weights, ``normalize`` and the
reductions (``num_items_in_batch`` included) work exactly as in
:func:`lmloss.causal_lm_loss`: the divisor of ``"mean"`` is the number of target
tokens of the step, whatever ``alpha``.

Two entry points:

- :func:`distillation_loss` on logits: rows are upcast to float32 one chunk at a
  time (and recomputed in backward), so no float32 copy of the ``[N, V]`` logits exists.
- :func:`linear_distillation_loss` from the hidden states and ``lm_head`` weights of
  both models: chunk by chunk, neither model's ``[N, V]`` logits ever exist, and the
  student's gradients are made during the forward pass (as in the chunked
  cross-entropy backend, whose buffers and products it shares).

The teacher never gets a gradient: its logits are constants of the loss.
"""

from __future__ import annotations

from functools import partial

import torch

from lmloss._engine.autograd import Job, Run, rows_loss
from lmloss._engine.chunks import (
    Buffers,
    Grads,
    Rows,
    accumulate,
    autocast_inputs,
    buffer_rows,
    default_chunk_rows,
    hidden_chunks,
    logits_into,
)
from lmloss._engine.logits_rows import LOGITS_CHUNK_BYTES, scored_row_losses
from lmloss._engine.plan import compute_dtype, finish, prepare
from lmloss._spec import LossSpec, Normalize, Reduction, check_loss_options
from lmloss._validation import (
    check_labels_on,
    check_logits,
    check_real,
    check_temperature,
)
from lmloss.fused import check_backend_options, check_linear

__all__ = ["distillation_loss", "linear_distillation_loss", "check_distill_options"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    shift: bool = True,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items_in_batch: torch.Tensor | int | float | None = None,
    token_weights: torch.Tensor | None = None,
    normalize: Normalize = "token",
) -> torch.Tensor:
    """Forward KL from the teacher to the student, ``tau^2``-scaled, on the target positions.

    Args:
        student_logits: ``[..., T, V]`` student scores, any float dtype (math in float32).
        teacher_logits: ``[..., T, V]`` teacher scores (same shape; no gradient flows into them).
        labels: ``[..., T]`` as for :func:`lmloss.causal_lm_loss`: they choose the
            scored positions (and give the hard targets when ``alpha < 1``).
        temperature: ``tau > 0``; both distributions are ``softmax(logits / tau)``.
        alpha: weight of the distillation term in ``alpha * kd + (1 - alpha) * ce``,
            in ``[0, 1]``; 1 (default) is pure distillation.
        shift, ignore_index, reduction, num_items_in_batch, token_weights, normalize:
            as in :func:`lmloss.causal_lm_loss`.

    Returns:
        A float32 scalar (float64 for float64 student logits), or ``[..., T]``
        aligned with ``labels`` for ``reduction="none"``. No target: an exact 0
        attached to the graph.
    """
    check_distill_options(temperature, alpha, shift, ignore_index, reduction, normalize)
    student_logits = check_logits(student_logits)
    teacher_logits = _check_teacher_logits(teacher_logits, student_logits)
    labels = check_labels_on(labels, student_logits.shape[:-1], student_logits.device, "student_logits")
    vocab_size = student_logits.shape[-1]
    spec = _spec(shift, ignore_index, reduction, normalize)
    dtype = compute_dtype(student_logits.dtype)
    plan, num_items = prepare(labels, token_weights, num_items_in_batch, vocab_size, spec, dtype)
    # Rows are upcast chunk by chunk (only the scored ones); the per-row math is _kd_rows.
    per_token = scored_row_losses(
        partial(_kd_rows, temperature=float(temperature), alpha=float(alpha)),
        (student_logits.reshape(-1, vocab_size), teacher_logits.detach().reshape(-1, vocab_size)),
        plan.targets.reshape(-1),
        (plan.coef != 0).reshape(-1),
        dtype,
        LOGITS_CHUNK_BYTES,  # student and teacher chunks together
    ).view(labels.shape)
    weighted = per_token * plan.coef
    return finish(weighted if reduction == "none" else weighted.sum(), plan, labels.shape, spec, num_items)


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 1.0,
    shift: bool = True,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items_in_batch: torch.Tensor | int | float | None = None,
    token_weights: torch.Tensor | None = None,
    normalize: Normalize = "token",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`distillation_loss` of ``student_hidden @ student_weight.T + student_bias``
    against ``teacher_hidden @ teacher_weight.T + teacher_bias``, without either
    model's ``[tokens, vocab]`` logits.

    Args:
        student_hidden: ``[..., T, D]`` the student's final hidden states.
        student_weight: ``[V, D]`` the student's ``lm_head`` weight (same dtype as its hidden states).
        teacher_hidden: ``[..., T, D_t]`` the teacher's final hidden states (``D_t`` may differ from ``D``).
        teacher_weight: ``[V, D_t]`` the teacher's ``lm_head`` weight (same vocabulary ``V``).
        labels: ``[..., T]`` as for :func:`lmloss.causal_lm_loss`.
        student_bias, teacher_bias: ``[V]`` optional ``lm_head`` biases.
        temperature, alpha, shift, ignore_index, reduction, num_items_in_batch,
        token_weights, normalize: as in :func:`distillation_loss`.
        chunk_size: tokens per chunk; default from a memory budget
            (``lmloss.fused.chunked.default_chunk_rows``).

    Returns:
        As :func:`distillation_loss`. Gradients flow into the student's hidden
        states, weight and bias only. With ``"mean"``/``"sum"`` they are computed
        in forward, so ``backward`` may run once per call (no ``retain_graph``).
    """
    check_distill_options(temperature, alpha, shift, ignore_index, reduction, normalize)
    check_backend_options("chunked", chunk_size)
    h, w, b = check_linear(*autocast_inputs(student_hidden, student_weight, student_bias), prefix="student_")
    th, tw, tb = check_linear(*autocast_inputs(teacher_hidden, teacher_weight, teacher_bias), prefix="teacher_")
    _check_teacher_head(h, w, th, tw)
    labels = check_labels_on(labels, h.shape[:-1], h.device, "student_hidden")
    spec = _spec(shift, ignore_index, reduction, normalize)
    plan, num_items = prepare(labels, token_weights, num_items_in_batch, w.shape[0], spec, compute_dtype(h.dtype))
    teacher = (th.detach().reshape(-1, th.shape[-1]), tw.detach(), None if tb is None else tb.detach())
    options = (float(temperature), float(alpha))
    with torch.autocast(h.device.type, enabled=False):
        result = _linear_kd(Rows.of(h, w, b, plan), teacher, options, reduction != "none", chunk_size)
    return finish(result, plan, labels.shape, spec, num_items)


# --- checks and shared steps ------------------------------------------------------------


def check_distill_options(
    temperature: object, alpha: object, shift: object, ignore_index: object, reduction: object, normalize: object
) -> None:
    """The options of both distillation losses; raises ``ValueError``/``TypeError``."""
    check_loss_options(shift=shift, ignore_index=ignore_index, reduction=reduction, normalize=normalize)
    check_temperature(temperature)
    alpha = check_real("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the distillation term) must be in [0, 1], got {alpha}")


def _check_teacher_logits(teacher_logits: object, student_logits: torch.Tensor) -> torch.Tensor:
    teacher_logits = check_logits(teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has shape "
            f"{tuple(student_logits.shape)}; the two models must score the same positions over the same vocabulary"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits are on {teacher_logits.device} but student_logits are on {student_logits.device}"
        )
    return teacher_logits


def _check_teacher_head(h: torch.Tensor, w: torch.Tensor, th: torch.Tensor, tw: torch.Tensor) -> None:
    if th.shape[:-1] != h.shape[:-1]:
        raise ValueError(
            f"teacher_hidden has shape {tuple(th.shape)} but student_hidden has shape {tuple(h.shape)}; "
            "all dimensions but the last (the hidden size) must match"
        )
    if tw.shape[0] != w.shape[0]:
        raise ValueError(
            f"teacher_weight has a vocabulary of {tw.shape[0]} but student_weight of {w.shape[0]}; "
            "distillation needs the same vocabulary"
        )
    if th.device != h.device:
        raise ValueError(f"teacher_hidden is on {th.device} but student_hidden is on {h.device}")


def _spec(shift: bool, ignore_index: int, reduction: Reduction, normalize: Normalize) -> LossSpec:
    """The target options of a distillation loss (no per-token CE options)."""
    return LossSpec(shift=shift, ignore_index=ignore_index, reduction=reduction, normalize=normalize)


# --- on logits ------------------------------------------------------------------------------


def _kd_rows(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """``[n]`` losses ``alpha * tau^2 * KL(p_t || p_s) + (1 - alpha) * CE`` of ``[n, V]`` logits."""
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    p = log_p.exp()
    # A teacher may mask tokens with -inf logits (p = 0): they add 0, not 0 * inf = NaN.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    loss = temperature**2 * terms.sum(dim=-1)
    if alpha == 1.0:
        return loss
    ce = torch.logsumexp(s, dim=-1) - s.gather(1, y.unsqueeze(1)).squeeze(1)
    return alpha * loss + (1.0 - alpha) * ce


# --- from hidden states ---------------------------------------------------------------------


def _linear_kd(
    rows: Rows,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    options: tuple[float, float],
    reduce_sum: bool,
    chunk_rows: int | None,
) -> torch.Tensor:
    """``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms, from the student's
    ``[N, D]`` rows and the teacher's ``([N, D_t] hidden, [V, D_t] weight, [V] bias or None)``
    (detached); ``options``: ``(temperature, alpha)``."""
    hidden, weight = rows.hidden, rows.weight
    if chunk_rows is None:
        compute = rows.coef.element_size()
        # float32 student, teacher and scratch chunks, plus low-precision product outputs.
        row_bytes = 3 * compute + sum(t.element_size() for t in (hidden, teacher[0]) if t.element_size() < compute)
        chunk_rows = default_chunk_rows(
            hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.element_size(), row_bytes
        )
    runner = partial(_runner, teacher, options, chunk_rows)
    job = Job("linear_distillation_loss", "use distillation_loss on logits", runner)
    return rows_loss(rows, job, reduce_sum)


def _runner(
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    options: tuple[float, float],
    chunk_rows: int,
    rows: Rows,
    scored: torch.Tensor | None,
) -> Run:
    """The student's chunk loop; the teacher's tensors are constants of the loss, held as they are."""
    return lambda coef, grads: _run(rows.with_coef(coef), scored, teacher, options, chunk_rows, grads)


def _run(
    rows: Rows,
    scored: torch.Tensor | None,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    options: tuple[float, float],
    chunk_rows: int,
    grads: Grads | None,
) -> torch.Tensor:
    """Loop over chunks of the scored rows (``scored``: their indices, None for every row);
    returns the ``[N]`` weighted per-position losses."""
    (hidden, weight, bias), coef = rows.inputs, rows.coef
    t_hidden, t_weight, t_bias = teacher
    losses = torch.zeros(hidden.shape[0], dtype=coef.dtype, device=hidden.device)
    size = buffer_rows(hidden.shape[0], scored, chunk_rows)
    student_buffers = Buffers(size, weight.shape[0], weight.dtype, coef.dtype, hidden.device)
    teacher_buffers = Buffers(size, weight.shape[0], t_weight.dtype, coef.dtype, hidden.device)
    for index, h in hidden_chunks(hidden, coef, scored, chunk_rows):
        a = coef[index]
        zs = logits_into(h, weight, bias, student_buffers)
        zt = logits_into(t_hidden[index], t_weight, t_bias, teacher_buffers)
        loss = _kd_chunk_(zs, zt, rows.targets[index], a, *options, want_grad=grads is not None)
        if grads is not None:
            accumulate(zs, h, weight, grads, student_buffers, index)
        losses[index] = torch.where(a != 0, loss * a, torch.zeros_like(loss))
    return losses


def _kd_chunk_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    temperature: float,
    alpha: float,
    *,
    want_grad: bool,
) -> torch.Tensor:
    """``[c]`` unweighted losses of one chunk; with ``want_grad``, ``zs`` <- d(sum a*loss)/d zs.

    Works in place on both ``[c, V]`` logits buffers (``zt`` is consumed) plus one
    scratch chunk. With ``q = softmax(zs/tau)``, ``p = softmax(zt/tau)`` and
    ``s1 = softmax(zs)``, the gradient is
    ``a * (alpha * tau * (q - p) + (1 - alpha) * (s1 - onehot(y)))``.
    """
    y = torch.where(a != 0, y, torch.zeros_like(y))  # unscored rows (static mode) may hold ignore_index
    tau, hard = temperature, 1.0 - alpha
    ce = lse1 = None
    if hard > 0:
        lse1 = torch.logsumexp(zs, dim=1)
        ce = lse1 - zs.gather(1, y.unsqueeze(1)).squeeze(1)
    if tau != 1.0:
        zs.div_(tau)
        zt.div_(tau)
    z_y = zs.gather(1, y.unsqueeze(1)).squeeze(1) if hard > 0 and tau != 1.0 else None
    torch.ops.aten._log_softmax.out(zs, 1, False, out=zs)  # log q
    torch.ops.aten._log_softmax.out(zt, 1, False, out=zt)  # log p
    scratch = torch.sub(zt, zs)  # log p - log q
    zt.exp_()  # p
    # p * (log p - log q) where the teacher masks a token (p = 0, log p = -inf) is 0, not NaN.
    loss = tau**2 * scratch.mul_(zt).masked_fill_(zt == 0, 0.0).sum(dim=1)
    if ce is not None:
        loss = alpha * loss + hard * ce
    if not want_grad:
        return loss
    if z_y is not None and lse1 is not None:  # lse1 is always set with z_y (both need hard > 0)
        # s1 = exp(zs - lse1) with zs = tau * (log q + lse_tau) and lse_tau = z_y - log q_y.
        shift = tau * (z_y - zs.gather(1, y.unsqueeze(1)).squeeze(1)) - lse1
        torch.mul(zs, tau, out=scratch).add_(shift.unsqueeze(1)).exp_()
    soft = a * (alpha * tau)
    # At tau = 1, s1 is q itself: its CE coefficient joins the distillation one.
    zs.exp_().mul_((soft + a * hard if hard > 0 and tau == 1.0 else soft).unsqueeze(1))
    zs.sub_(zt.mul_(soft.unsqueeze(1)))
    if hard > 0:
        if tau != 1.0:
            zs.add_(scratch.mul_((a * hard).unsqueeze(1)))
        zs.scatter_add_(1, y.unsqueeze(1), (-(a * hard)).unsqueeze(1).to(zs.dtype))
    return loss
