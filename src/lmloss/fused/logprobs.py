"""Per-token log-probabilities and entropies from hidden states, chunk by chunk.

For post-training (policy gradients, KL to a reference model, entropy bonuses) the
loss needs, per target token, ``log softmax(z / temperature)[label]`` and optionally
the entropy of that distribution, where ``z`` are the (softcapped) logits of
``hidden @ weight.T + bias``. This computes both without ``[N, V]`` logits: each
chunk of scored rows is computed into the engine's reused buffers, and backward
recomputes the chunks with any upstream gradients of both outputs folded in.

Per row, with ``x = z / tau``, ``p = softmax(x)``, the outputs ``lp = log p_y`` and
``H = -sum(p * log p)``, and upstream gradients ``g`` (of ``lp``) and ``u`` (of ``H``):

    d lp / dx = onehot(y) - p
    d H / dx  = -p * (log p + H)            (= -p * (x - E_p[x]))
    d / dz    = (g * (onehot(y) - p) - u * p * (log p + H)) / tau

times the softcap's ``1 - (z / s)^2`` for the raw logits; the products are the
engine's (``dh = dz @ W``, ``dW += dz^T @ h``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmloss._engine.chunks import (
    Buffers,
    Grads,
    accumulate,
    autocast_inputs,
    buffer_rows,
    default_chunk_rows,
    hidden_chunks,
    logits_into,
    needs_grad,
    scored_rows,
)
from lmloss._engine.guard import refuse_create_graph
from lmloss._engine.plan import compute_dtype, plan_targets, to_label_alignment
from lmloss._engine.rowmath import softcap_
from lmloss._spec import check_softcap
from lmloss._validation import check_bool, check_int, check_label_range, check_labels, check_real
from lmloss.fused import check_backend_options, check_linear

__all__ = ["chunked_token_logprobs"]


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(z / temperature)[label]`` (and the entropy) per target, without ``[N, V]`` logits.

    Args:
        hidden: ``[..., T, D]`` final hidden states; weight: ``[V, D]``; bias: ``[V]`` or None.
        labels: ``[..., T]`` token ids, ``ignore_index`` where nothing is scored; with
            ``shift=True`` position ``t - 1`` predicts ``labels[..., t]``.
        temperature: ``tau > 0``; the distribution is ``softmax(z / tau)``.
        softcap: ``s``: the logits are ``s * tanh((h W^T + b) / s)`` (before the temperature).
        with_entropy: also return the entropy of each scoring position's distribution.
        chunk_size: rows per chunk; default from a memory budget.

    Returns:
        ``(logprobs, entropy)``, each ``[..., T]`` aligned with ``labels`` (entry ``t``
        belongs to the target ``labels[..., t]``), float32 (float64 for float64 inputs),
        exactly 0 where nothing is scored; ``entropy`` is None unless ``with_entropy``.
        Both are differentiable with any upstream gradient (backward recomputes the chunks).
    """
    check_bool("shift", shift)
    check_int("ignore_index", ignore_index)
    check_bool("with_entropy", with_entropy)
    check_real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    check_softcap(softcap)
    check_backend_options("chunked", chunk_size)
    hidden, weight, bias = check_linear(*autocast_inputs(hidden, weight, bias))
    labels = check_labels(labels, hidden.shape[:-1])
    check_label_range(labels, weight.shape[0], ignore_index)
    dtype = compute_dtype(hidden.dtype)
    plan = plan_targets(labels, None, shift=shift, ignore_index=ignore_index, normalize="token", dtype=dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    if chunk_size is None:
        row_bytes = 3 * (8 if dtype == torch.float64 else 4) + (h.element_size() if h.element_size() < 4 else 0)
        chunk_size = default_chunk_rows(h.shape[0], weight.shape[0], h.shape[1], h.element_size(), row_bytes)
    options = _Options(float(temperature), None if softcap is None else float(softcap), with_entropy, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs, entropy = _TokenLogprobs.apply(
            h, weight, bias, plan.targets.reshape(-1), plan.coef.reshape(-1) != 0, options,
            needs_grad(h, weight, bias),
        )
    logprobs = to_label_alignment(logprobs.view(labels.shape), shift)
    return logprobs, (to_label_alignment(entropy.view(labels.shape), shift) if with_entropy else None)


@dataclass(frozen=True)
class _Options:
    """Temperature, softcap, whether the entropy is wanted, rows per chunk."""

    temperature: float
    softcap: float | None
    with_entropy: bool
    chunk_rows: int


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        scored: torch.Tensor,
        options: _Options,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = scored_rows(scored)
        ctx.options, ctx.needs = options, needs
        ctx.save_for_backward(hidden, weight, bias, targets, scored, rows)
        dtype = compute_dtype(hidden.dtype)
        logprobs = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        _run(hidden, weight, bias, targets, scored, rows, options, logprobs, entropy, None)
        ctx.mark_non_differentiable(*(() if options.with_entropy else (entropy,)))
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor):
        refuse_create_graph("chunked_token_logprobs", "compute them from materialized logits")
        hidden, weight, bias, targets, scored, rows = ctx.saved_tensors
        grads = Grads.allocate(hidden, weight, bias, ctx.needs)
        upstream = (grad_logprobs, grad_entropy if ctx.options.with_entropy else None)
        with torch.autocast(hidden.device.type, enabled=False):
            _run(hidden, weight, bias, targets, scored, rows, ctx.options, None, None, (upstream, grads))
        grads.finished()
        return grads.hidden, grads.weight, grads.bias, None, None, None, None


def _run(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scored: torch.Tensor,
    rows: torch.Tensor | None,
    options: _Options,
    logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    backward: tuple[tuple[torch.Tensor, torch.Tensor | None], Grads] | None,
) -> None:
    """Forward (write ``logprobs``/``entropy``) or backward (accumulate ``grads``) over the chunks."""
    dtype = compute_dtype(hidden.dtype)
    size = buffer_rows(hidden.shape[0], rows, options.chunk_rows)
    buffers = Buffers(size, weight.shape[0], weight.dtype, dtype, hidden.device)
    scratch = torch.empty_like(buffers.z) if options.with_entropy else None
    for index, h in hidden_chunks(hidden, scored, rows, options.chunk_rows):
        keep = scored[index]
        y = torch.where(keep, targets[index], torch.zeros_like(targets[index]))
        z = logits_into(h, weight, bias, buffers)
        cap = softcap_(z, options.softcap, buffers.cap_buffer(z) if backward and options.softcap else None)
        z.div_(options.temperature)
        torch.ops.aten._log_softmax.out(z, 1, False, out=z)  # log p, in place
        lp = z.gather(1, y.unsqueeze(1)).squeeze(1)
        ent = _entropy(z, scratch) if options.with_entropy else None
        if backward is None:
            logprobs[index] = torch.where(keep, lp, torch.zeros_like(lp))  # type: ignore[index]
            if ent is not None:
                entropy[index] = torch.where(keep, ent, torch.zeros_like(ent))  # type: ignore[index]
            continue
        (g_all, u_all), grads = backward
        g = torch.where(keep, g_all[index].to(dtype), torch.zeros_like(lp))
        u = None if u_all is None or ent is None else torch.where(keep, u_all[index].to(dtype), torch.zeros_like(lp))
        _grad_(z, y, g, u, ent, scratch, options.temperature, cap)
        accumulate(z, h, weight, grads, buffers, index)


def _entropy(log_p: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """``[c]`` entropies ``-sum(p * log p)`` of ``[c, V]`` log-probabilities (no ``[c, V]`` temporary)."""
    p = torch.exp(log_p, out=scratch[: log_p.shape[0]]) if scratch is not None else log_p.exp()
    # A row-wise dot product as a batched [1, V] @ [V, 1] product (finite logits: log p is finite).
    return -torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)


def _grad_(
    z: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor | None,
    ent: torch.Tensor | None,
    scratch: torch.Tensor | None,
    temperature: float,
    cap: torch.Tensor | None,
) -> None:
    """``z`` (holding ``log p``) <- the gradient of ``sum(g * lp + u * H)`` w.r.t. the raw logits, in place."""
    if u is None or ent is None or scratch is None:
        z.exp_().mul_((-g).unsqueeze(1))  # -g * p
    else:
        p = scratch[: z.shape[0]]
        torch.exp(z, out=p)
        z.add_(ent.unsqueeze(1)).mul_(p).mul_((-u).unsqueeze(1))  # -u * p * (log p + H)
        z.sub_(p.mul_(g.unsqueeze(1)))  # - g * p
    z.scatter_add_(1, y.unsqueeze(1), g.unsqueeze(1).to(z.dtype))  # + g * onehot(y)
    z.div_(temperature)
    if cap is not None:
        z.mul_(cap)
