"""Per-token log-probabilities and entropies by chunks, on one process or a vocabulary shard.

For post-training (policy gradients, KL to a reference model, entropy bonuses) the
loss needs, per target token, ``log softmax(z / temperature)[label]`` and optionally
the entropy of that distribution, where ``z`` are the (softcapped) logits of
``hidden @ weight.T + bias``. Each chunk of scored rows is computed into the
engine's reused buffers (:mod:`lmloss._engine.chunks`); backward recomputes the
chunks with any upstream gradients of both outputs folded in.

Per row, with ``x = z / tau``, ``p = softmax(x)``, the outputs ``lp = log p_y`` and
``H = -sum(p * log p)``, and upstream gradients ``g`` (of ``lp``) and ``u`` (of ``H``):

    d lp / dx = onehot(y) - p
    d H / dx  = -p * (log p + H)            (= -p * (x - E_p[x]))
    d / dz    = (g * (onehot(y) - p) - u * p * (log p + H)) / tau

times the softcap's ``1 - (z / s)^2`` for the raw logits.

The row statistics come from a *log-prob reducer*, which leaves ``log p`` in the
chunk buffer (the gradient's starting point):

- :class:`LocalLogprobs`: the whole vocabulary is in the chunk; an in-place
  log-softmax, the entropy as a row-wise dot product of ``p`` and ``log p``.
- :class:`ShardLogprobs`: this process holds a vocabulary shard. Per row it sends
  ``(m_r, s_r, t_r, q_r)``: the shard's max, ``sum exp(x - m_r)``, the target's ``x``
  (0 where the target lives elsewhere) and ``sum exp(x - m_r) * (x - m_r)``, in the one
  ``[c, 4]`` exchange of a :class:`~lmloss._engine.reducer.ShardReducer`. With
  ``M = max m_r``, ``a_r = exp(m_r - M)`` and ``S = sum a_r s_r``: ``lse = M + log S``,
  ``lp = sum t_r - lse`` and ``H = log S - sum a_r (q_r + (m_r - M) s_r) / S``, a sum
  of two non-negative terms (no cancellation). Forward keeps each row's ``lse`` and
  ``H`` (:class:`SavedLogprobs`), so backward exchanges nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmloss._engine.autograd import apply_rows, save_rows, saved_rows
from lmloss._engine.chunks import (
    Buffers,
    Grads,
    Rows,
    accumulate,
    buffer_rows,
    hidden_chunks,
    logits_into,
)
from lmloss._engine.guard import refuse_create_graph
from lmloss._engine.plan import compute_dtype
from lmloss._engine.reducer import ShardReducer
from lmloss._engine.rowmath import softcap_

__all__ = [
    "LocalLogprobs",
    "LogprobOptions",
    "LogprobReducer",
    "LogprobStats",
    "SavedLogprobs",
    "ShardLogprobs",
    "linear_logprobs",
]


@dataclass(frozen=True)
class LogprobOptions:
    """Temperature, softcap, whether the entropy is wanted, rows per chunk."""

    temperature: float
    softcap: float | None
    with_entropy: bool
    chunk_rows: int


@dataclass(frozen=True)
class LogprobStats:
    """``[c]`` log-probs of the targets, entropies (None unless asked), log-sum-exps
    (None where not kept), the targets as columns of this block and whether the block
    holds them (None: always)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None
    y: torch.Tensor
    own: torch.Tensor | None = None


class LogprobReducer(Protocol):
    """Turns a chunk's ``[c, V_r]`` scaled logits into ``log p`` in place and its row statistics."""

    needs_scratch: bool

    def stats_(
        self, x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor | None, index: Any, *, first: bool, entropy: bool
    ) -> LogprobStats: ...

    def for_backward(self, lse: torch.Tensor, entropy: torch.Tensor) -> LogprobReducer: ...


class LocalLogprobs:
    """Every column of the vocabulary is in the chunk; backward recomputes the statistics."""

    needs_scratch = False

    def stats_(
        self, x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor | None, index: Any, *, first: bool, entropy: bool
    ) -> LogprobStats:
        torch.ops.aten._log_softmax.out(x, 1, False, out=x)  # log p, in place (row-wise: safe)
        lp = x.gather(1, y.unsqueeze(1)).squeeze(1)
        return LogprobStats(lp, _entropy(x, scratch) if entropy else None, None, y)

    def for_backward(self, lse: torch.Tensor, entropy: torch.Tensor) -> LogprobReducer:
        return self


def _entropy(log_p: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """``[c]`` entropies ``-sum(p * log p)`` of ``[c, V]`` log-probabilities (no ``[c, V]`` temporary)."""
    p = torch.exp(log_p, out=scratch[: log_p.shape[0]]) if scratch is not None else log_p.exp()
    # A row-wise dot product as a batched [1, V] @ [V, 1] product (finite logits: log p is finite).
    return -torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)


class ShardLogprobs:
    """This process holds the columns of ``shard`` (its layout and its ``[c, 4]`` exchange)."""

    needs_scratch = True  # exp(x - m) beside x, which must stay to become log p

    def __init__(self, shard: ShardReducer) -> None:
        self.shard = shard

    def stats_(
        self, x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor | None, index: Any, *, first: bool, entropy: bool
    ) -> LogprobStats:
        y_local, own = self.shard.columns(y)
        rows = x.shape[0]
        local = x.new_zeros(rows, 4)
        if x.shape[1] == 0:  # an empty shard: exp(-inf) = 0 in every sum
            local[:, 0] = -math.inf
        else:
            local[:, 2] = torch.where(own, x.gather(1, y_local.unsqueeze(1)).squeeze(1), local[:, 2])
            local[:, 0] = x.amax(dim=1)
            x.sub_(local[:, 0].unsqueeze(1))  # x - m_r <= 0
            e = torch.exp(x, out=scratch[:rows]) if scratch is not None else x.exp()
            local[:, 1] = e.sum(dim=1)
            if entropy:
                local[:, 3] = torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(-1)
        lse, target, ent = _combine(self.shard.gather(local, first))
        if x.shape[1] > 0:
            x.sub_((lse.to(x.dtype) - local[:, 0]).unsqueeze(1))  # log p = (x - m_r) - (lse - m_r)
        dtype = x.dtype
        return LogprobStats((target - lse).to(dtype), ent.to(dtype) if entropy else None, lse.to(dtype), y_local, own)

    def for_backward(self, lse: torch.Tensor, entropy: torch.Tensor) -> LogprobReducer:
        return SavedLogprobs(lse, entropy, self.shard)


def _combine(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[P, c, 4]`` shard statistics -> ``[c]`` log-sum-exp, target logit and entropy (float64)."""
    peaks, sums = gathered[..., 0], gathered[..., 1]
    peak = peaks.amax(dim=0)
    scale = torch.exp(peaks - peak)  # 0 for an empty shard (its peak is -inf)
    total = (scale * sums).sum(dim=0)
    # sum over the shard's columns of exp(x - M) * (x - M); an empty shard adds nothing
    # (its (m_r - M) * s_r would be -inf * 0).
    moment = torch.where(sums > 0, scale * (gathered[..., 3] + (peaks - peak) * sums), torch.zeros_like(sums))
    log_total = total.log()
    return peak + log_total, gathered[..., 2].sum(dim=0), log_total - moment.sum(dim=0) / total


class SavedLogprobs:
    """Backward of a shard: ``log p = x - lse`` from forward's statistics, no exchange."""

    needs_scratch = False

    def __init__(self, lse: torch.Tensor, entropy: torch.Tensor, shard: ShardReducer) -> None:
        self.lse, self.entropy, self.shard = lse, entropy, shard

    def stats_(
        self, x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor | None, index: Any, *, first: bool, entropy: bool
    ) -> LogprobStats:
        lse = self.lse[index]
        x.sub_(lse.unsqueeze(1))
        y_local, own = self.shard.columns(y)
        return LogprobStats(torch.zeros_like(lse), self.entropy[index] if entropy else None, lse, y_local, own)

    def for_backward(self, lse: torch.Tensor, entropy: torch.Tensor) -> LogprobReducer:
        return self


# Sums the hidden-state gradient over the shards, in place (each holds dz_r @ W_r).
SumHidden = Callable[[torch.Tensor], None]


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scored: torch.Tensor,
    options: LogprobOptions,
    reducer: LogprobReducer,
    sum_hidden: SumHidden | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` log-probs and entropies (zeros unless ``options.with_entropy``) of ``[N, D]``
    rows against a ``[V_r, D]`` weight (and ``[V_r]`` bias); 0 where ``scored`` is False.

    ``targets``: ``[N]`` (any value where not scored); ``sum_hidden``: all-reduces the
    hidden-state gradient in backward for a shard (each process holds its part).
    """
    # The rows' coefficients are the bool mask: only which rows are scored matters here.
    rows = Rows(hidden, weight, bias, targets, scored)
    with torch.autocast(hidden.device.type, enabled=False):
        return apply_rows(rows, _TokenLogprobs(options, reducer, sum_hidden))


@dataclass(frozen=True)
class _TokenLogprobs:
    """The :class:`~lmloss._engine.autograd.RowsMethod` of the token log-probs: forward
    keeps each row's log-sum-exp and entropy, backward recomputes the chunks."""

    options: LogprobOptions
    reducer: LogprobReducer
    sum_hidden: SumHidden | None

    def forward(self, ctx: Any, rows: Rows, scored: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = rows.hidden
        logprobs = torch.zeros(hidden.shape[0], dtype=compute_dtype(hidden.dtype), device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        lse = torch.zeros_like(logprobs)
        _run(rows, scored, self.options, self.reducer, (logprobs, entropy, lse), None)
        ctx.any_row = scored is None or scored.numel() > 0
        save_rows(ctx, rows, scored, lse, entropy)
        ctx.mark_non_differentiable(*(() if self.options.with_entropy else (entropy,)))
        return logprobs, entropy

    def backward(self, ctx: Any, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor) -> Grads:
        refuse_create_graph("token log-probs", "compute them from materialized logits")
        rows, (scored, lse, entropy) = saved_rows(ctx)
        grads = Grads.allocate(*rows.inputs, ctx.needs)
        upstream = (grad_logprobs, grad_entropy if self.options.with_entropy else None)
        reducer = self.reducer.for_backward(lse, entropy)
        with torch.autocast(rows.hidden.device.type, enabled=False):
            _run(rows, scored, self.options, reducer, None, (upstream, grads))
        # Each shard holds dz_r @ W_r, its part of the hidden-state gradient (none without a scored row,
        # on every rank alike: the scored rows are replicated).
        if self.sum_hidden is not None and ctx.any_row and grads.hidden is not None:
            self.sum_hidden(grads.hidden)
        return grads.finished()


def _run(
    rows: Rows,
    scored: torch.Tensor | None,
    options: LogprobOptions,
    reducer: LogprobReducer,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    backward: tuple[tuple[torch.Tensor, torch.Tensor | None], Grads] | None,
) -> None:
    """Forward (write log-probs, entropies, log-sum-exps into ``out``) or backward
    (accumulate ``grads``) over the chunks of the scored rows (``rows.coef``: the bool
    mask; ``scored``: their indices, None for every row)."""
    (hidden, weight, bias), targets, mask = rows.inputs, rows.targets, rows.coef
    dtype = compute_dtype(hidden.dtype)
    size = buffer_rows(hidden.shape[0], scored, options.chunk_rows)
    buffers = Buffers(size, weight.shape[0], weight.dtype, dtype, hidden.device)
    with_scratch = options.with_entropy or (reducer.needs_scratch and backward is None)
    scratch = torch.empty_like(buffers.z) if with_scratch else None
    for i, (index, h) in enumerate(hidden_chunks(hidden, mask, scored, options.chunk_rows)):
        keep = mask[index]
        y = torch.where(keep, targets[index], torch.zeros_like(targets[index]))
        z = logits_into(h, weight, bias, buffers)
        cap = softcap_(z, options.softcap, buffers.cap_buffer(z) if backward and options.softcap else None)
        z.div_(options.temperature)
        stats = reducer.stats_(z, y, scratch, index, first=i == 0, entropy=options.with_entropy)
        if backward is None:
            if out is not None:
                _store(out, index, keep, stats)
            continue
        (g_all, u_all), grads = backward
        g = torch.where(keep, g_all[index].to(dtype), torch.zeros_like(keep, dtype=dtype))
        ent = stats.entropy
        u = None if u_all is None or ent is None else torch.where(keep, u_all[index].to(dtype), torch.zeros_like(g))
        _grad_(z, stats, g, u, scratch, options.temperature, cap)
        accumulate(z, h, weight, grads, buffers, index)


def _store(
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], index: Any, keep: torch.Tensor, stats: LogprobStats
) -> None:
    logprobs, entropy, lse = out
    zero = torch.zeros_like(stats.logprobs)
    logprobs[index] = torch.where(keep, stats.logprobs, zero)
    if stats.entropy is not None:
        entropy[index] = torch.where(keep, stats.entropy, zero)
    if stats.lse is not None:
        lse[index] = stats.lse


def _grad_(
    z: torch.Tensor,
    stats: LogprobStats,
    g: torch.Tensor,
    u: torch.Tensor | None,
    scratch: torch.Tensor | None,
    temperature: float,
    cap: torch.Tensor | None,
) -> None:
    """``z`` (holding ``log p``) <- the gradient of ``sum(g * lp + u * H)`` w.r.t. the raw logits, in place."""
    ent = stats.entropy
    if u is None or ent is None or scratch is None:
        z.exp_().mul_((-g).unsqueeze(1))  # -g * p
    else:
        p = scratch[: z.shape[0]]
        torch.exp(z, out=p)
        z.add_(ent.unsqueeze(1)).mul_(p).mul_((-u).unsqueeze(1))  # -u * p * (log p + H)
        z.sub_(p.mul_(g.unsqueeze(1)))  # - g * p
    if z.shape[1] > 0:  # + g * onehot(y), on the block that holds the target
        hit = g if stats.own is None else torch.where(stats.own, g, torch.zeros_like(g))
        z.scatter_add_(1, stats.y.unsqueeze(1), hit.unsqueeze(1).to(z.dtype))
    z.div_(temperature)
    if cap is not None:
        z.mul_(cap)
