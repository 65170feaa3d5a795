"""Vocab-parallel cross-entropy: the ``lm_head`` sharded by vocabulary over a process group.

Tensor parallelism splits the ``[V, D]`` output weight by rows: rank ``r`` of a group
of ``P`` holds ``W_r = W[start_r : start_r + V_r]`` (contiguous shards that tile
``[0, V)``, equal or not), while the hidden states ``[..., T, D]`` and the labels are
the same on every rank. No rank ever holds full-vocabulary logits. Per target token,
the loss only needs four numbers from each rank's slice ``z_r`` of the logits:

    m_r = max(z_r)               s_r = sum(exp(z_r - m_r))
    t_r = z_r[y] if y is in r's shard, else 0      u_r = sum(z_r)  (label smoothing)

and then, identically on every rank, ``M = max_r m_r``, ``lse = M + log(sum_r s_r *
exp(m_r - M))``, ``z_y = sum_r t_r`` and ``sum(z) = sum_r u_r``. From these the loss,
its DFT/focal weight and the gradient of each shard's logits are the engine's
(``lmloss._engine.reducer.ShardReducer`` and ``lmloss._engine.rowmath``, the same
code as on one process); the weight costs no collective. What is about parallelism
(the layout, the chunking, the collectives and the fail-together protocol) is
``lmloss._shard_group``'s; this module holds the public functions.

**Collectives.** The four numbers of a chunk of ``c`` tokens travel in *one*
all-gather of a ``[c, 4]`` tensor and every rank combines them locally. The
alternative (an all-reduce MAX of ``m``, then an all-reduce SUM of a stacked
``[c, 3]``) needs two round trips for the same information; for the group sizes of
tensor parallelism (2 to 8) the gathered ``P * c * 4`` floats are still tiny next to
the ``[c, V_r]`` chunk of logits, so latency, not bandwidth, decides. Counts per call:

* ``vocab_parallel_linear_cross_entropy``: forward, one all-gather per chunk of
  scored tokens; backward, one all-reduce (SUM) of the hidden-state gradient.
* ``vocab_parallel_cross_entropy`` (logits given): forward, one all-gather for the
  whole call; backward, none.
* ``vocab_parallel_linear_token_logprobs``: forward, one all-gather per chunk of
  scored tokens (the entropy's statistic rides in the same ``[c, 4]``); backward,
  one all-reduce (SUM) of the hidden-state gradient (the statistics are kept).
* Any of them: one more all-gather (of each rank's ``(start, size)``) when
  ``vocab_start``/``vocab_size`` are not both given. With no scored token at all
  (an all-masked batch) that layout gather is the only collective left, so nothing
  can wait on a rank that skipped work.

**The hidden-state gradient** of the fused form is all-reduced *inside* (in
backward): each rank's product ``dz_r @ W_r`` is only its shard's part of
``d loss / d hidden``, and the hidden states are replicated, so after backward every
rank's ``hidden.grad`` is the full gradient, as if one process held all of ``W``. Do
not all-reduce it again (e.g. with Megatron's copy-to-tensor-parallel region). The
logits form leaves that reduction to whoever computed the logits shard: its only
gradient is the local one of ``logits_shard``.

Every rank must call with the same hidden states, labels, options and chunk size
(the number of chunks, and so of collectives, follows from them), as in any
tensor-parallel region.

**DTensor** (PyTorch's tensor parallelism): a weight sharded ``Shard(0)`` over a mesh
dimension, as ``ColwiseParallel`` makes ``lm_head.weight``, or logits sharded on the
last dim, give the group and the layout themselves (``lmloss._dtensor``: torch.chunk's
layout, checked against the local shard); the math runs on the local shard, and
autograd returns its gradient to the DTensor with the same placements.

**Bad input on one rank** (a shard of the wrong dtype, device or shape, a shard that
does not fit ``vocab_size``) must not leave the other ranks waiting in a collective
for it. Each rank checks its own inputs locally, then tells the others in the first
collective of the call, without any extra one:

* the layout all-gather (when ``vocab_start``/``vocab_size`` are not both given)
  carries a third number per rank, a bad-input flag;
* otherwise the bad rank joins the first statistics all-gather with a marked block
  (a negative sum of exponentials, which no real shard yields).

Every rank then raises the same ``ValueError`` naming the bad rank(s); the bad rank's
message also says what is wrong. Inputs that are the same on every rank (options,
labels, hidden states, token weights) are checked before that and fail alike
everywhere without communication. Two corners remain: with no scored token and the
layout given, a call has no collective at all, so only the bad rank raises (nobody
waits); and under ``lmloss.validation(False)`` with CUDA collectives (NCCL) the good
ranks cannot read the flag of the statistics gather without a host synchronisation,
so they go on with NaN statistics while the bad rank raises (its exit then ends the
job under torchrun). With gloo (CPU tensors) the flag is read whatever the setting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from typing_extensions import Unpack

from lmloss._dtensor import local_bias, localize
from lmloss._engine.chunks import autocast_inputs, needs_grad
from lmloss._engine.logprobs import ShardLogprobs, linear_logprobs
from lmloss._engine.plan import (
    compute_dtype,
    finish,
    prepare,
)
from lmloss._engine.reducer import ShardReducer
from lmloss._engine.rowmath import LossMath
from lmloss._engine.sharded import ShardedLinearCE, ShardedLogitsCE
from lmloss._shard_group import (
    ShardLayout,
    check_initialized,
    default_chunk_rows,
    fail_together,
    first_gather_rows,
    gather_layout,
    gather_stats,
    logits_chunk_rows,
    resolve_layout,
)
from lmloss._shard_inputs import (
    bias_problem,
    check_hidden,
    logits_problem,
    weight_problem,
)
from lmloss._spec import LossKeywords, spec_from_keywords
from lmloss._validation import check_int, check_label_range, check_labels, check_labels_on
from lmloss.logprobs import LogprobKeywords, LogprobSpec, TokenLogprobs

__all__ = [
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_token_logprobs",
    "vocab_layout",
    "vocab_shard_bounds",
]


# --- the vocabulary layout ----------------------------------------------------------------


def vocab_shard_bounds(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s share of a vocabulary split as evenly as possible.

    The first ``vocab_size % world_size`` ranks hold one row more; shard a weight
    with ``weight[start:stop]``.
    """
    for name, value in (("vocab_size", vocab_size), ("world_size", world_size), ("rank", rank)):
        check_int(name, value)
    if vocab_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need vocab_size >= 1, world_size >= 1 and 0 <= rank < world_size, got "
            f"vocab_size={vocab_size}, world_size={world_size}, rank={rank}"
        )
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def vocab_layout(
    shard_size: int, *, group: dist.ProcessGroup | None = None, vocab_start: int | None = None
) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` of this rank's shard, from one all-gather over ``group``.

    Compute it once and pass both to the losses to save that collective on every call.

    Args:
        shard_size: ``V_r``, the rows of this rank's ``lm_head`` shard.
        group: the tensor-parallel process group (``None``: the default group).
            A collective: every rank of the group must call.
        vocab_start: this rank's first row, if shards are not in rank order;
            ``None`` places the shards one after another in rank order.

    Raises:
        ValueError: on every rank alike when the shards do not tile ``[0, V)``
            exactly (overlap, gap, or a shard outside the vocabulary).
    """
    check_initialized(group)
    shard_size = check_int("shard_size", shard_size)
    if vocab_start is not None:
        check_int("vocab_start", vocab_start)
    return gather_layout(shard_size, group, vocab_start, None)


# --- the engine's seam: statistics of a vocabulary shard ----------------------------------------


def _reducer(layout: ShardLayout, class_weights: torch.Tensor | None = None) -> ShardReducer:
    """The engine's reducer for this rank's shard: one all-gather of ``[c, 4]`` per exchange
    (with ``[V]`` class weights, the fourth number is the shard's ``sum(u * z)``)."""
    return ShardReducer(
        layout.start,
        layout.size,
        layout.vocab_size,
        lambda stats, first: gather_stats(stats, layout, first=first),
        class_weights,
    )


def _sum_hidden(layout: ShardLayout) -> Callable[[torch.Tensor], None] | None:
    """The all-reduce of the hidden-state gradient: each rank holds ``dz_r @ W_r``, its shard's part."""
    if layout.world_size == 1:
        return None
    return lambda grad: dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=layout.group)


# --- fused: hidden states and the weight shard ---------------------------------------------


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    token_weights: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **options: Unpack[LossKeywords],
) -> torch.Tensor:
    """``linear_cross_entropy(hidden, W, labels)`` with ``W`` sharded by vocabulary over ``group``.

    Args:
        hidden: ``[..., T, D]`` final hidden states, the same on every rank of ``group``.
        weight_shard: ``[V_r, D]`` this rank's rows ``[vocab_start, vocab_start + V_r)``
            of the ``lm_head`` weight, same dtype as ``hidden``. Shards may differ in size.
            Or the ``[V, D]`` DTensor sharded on dim 0 that ``ColwiseParallel`` makes of
            ``lm_head.weight``: the group and the layout then come from its mesh and
            placements (``group``, ``vocab_start``, ``vocab_size`` may be None), ``hidden``
            and ``labels`` may be DTensors on that mesh (replicated over the shard's mesh
            dimension first), and its gradient is a DTensor with the same placements (the
            loss itself is a plain tensor, the same on every rank).
        labels: ``[..., T]`` *global* token ids (``ignore_index`` where nothing is
            trained), the same on every rank.
        group: the tensor-parallel process group (``None``: the default group, or the
            mesh's for a DTensor). Every rank of it must call (collectives inside, see the
            module doc).
        vocab_start, vocab_size: this shard's first row and the full vocabulary size.
            If either is ``None`` both come from one all-gather of the shard sizes
            (shards in rank order unless ``vocab_start`` is given), which also checks
            that the shards tile the vocabulary; pass both (``lmloss.parallel.vocab_layout``
            once) to skip it.
        num_items_in_batch, token_weights: as in :func:`lmloss.causal_lm_loss`.
        class_weights: ``[V]``, *all* the class weights (not this rank's shard), the
            same on every rank, as in :func:`lmloss.causal_lm_loss`: a rank needs the
            weight of every target and their total, and a ``[V]`` vector is small.
        chunk_size: tokens per chunk (one all-gather each); default from a 256 MiB
            budget for a ``[chunk, V / P]`` float32 buffer. Must be the same on every rank.
        **options: the loss options of :func:`lmloss.causal_lm_loss` (``shift``,
            ``ignore_index``, ``reduction``, ``label_smoothing``, ``z_loss``, ``softcap``,
            ``normalize``, ``token_loss``, ``focal_gamma``; :class:`lmloss.LossKeywords`),
            with its defaults, on the full logits (label smoothing, the z-loss and the
            DFT/focal target probability cover the full vocabulary).

    Returns:
        The same on every rank: a float32 scalar (float64 for float64 inputs), or
        ``[..., T]`` aligned with ``labels`` for ``reduction="none"``. Backward gives
        each rank the gradient of its own ``weight_shard`` and the full gradient of
        ``hidden`` (all-reduced inside). Nothing scored: an exact 0.0 attached to the
        graph, zero gradients, and no collective beyond the layout gather.

    Raises:
        ValueError: as :func:`lmloss.causal_lm_loss` (checked against the full
            vocabulary), on shards that do not fit the vocabulary, or when
            ``torch.distributed`` is not initialized. A bad ``weight_shard`` (or
            ``vocab_start``) on one rank raises on every rank (see the module doc).
    """
    spec = spec_from_keywords("vocab_parallel_linear_cross_entropy", options)
    _check_chunk_size(chunk_size)
    local = localize(
        weight_shard,
        0,
        "weight_shard",
        group,
        vocab_start,
        vocab_size,
        {"hidden": hidden, "labels": labels, "token_weights": token_weights},
    )
    weight_shard, group, vocab_start, vocab_size = local.shard, local.group, local.vocab_start, local.vocab_size
    hidden, labels, token_weights = local.replicated
    hidden, weight_shard = autocast_inputs(hidden, weight_shard)
    hidden = check_hidden(hidden)
    labels = check_labels_on(labels, hidden.shape[:-1], hidden.device)
    # Everything above is replicated (fails alike everywhere); the shard is this rank's own.
    problem = weight_problem(hidden, weight_shard)
    shard_rows = 0 if problem is not None else weight_shard.shape[0]
    layout, problem = resolve_layout(group, shard_rows, vocab_start, vocab_size, problem)
    # Labels are replicated, so every rank raises alike (or none does).
    plan, num_items = prepare(
        labels, token_weights, num_items_in_batch, layout.vocab_size, spec, compute_dtype(hidden.dtype), class_weights
    )
    hidden2d = hidden.reshape(labels.numel(), hidden.shape[-1])
    if chunk_size is None:
        chunk_size = default_chunk_rows(hidden2d, layout, plan.coef.dtype)
    if problem is not None:
        fail_together(problem, first_gather_rows(plan.coef, chunk_size), layout, labels.device)
    needs = needs_grad(hidden, weight_shard)
    with torch.autocast(hidden.device.type, enabled=False):
        result = ShardedLinearCE.apply(
            hidden2d,
            weight_shard,
            plan.targets.reshape(-1),
            plan.coef.reshape(-1),
            _reducer(layout, plan.class_weights),
            LossMath.from_spec(spec),
            spec.reduction != "none",
            chunk_size,
            needs,
            _sum_hidden(layout),
        )
    return finish(result, plan, labels.shape, spec, num_items)


# --- logits shard given ---------------------------------------------------------------------


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    token_weights: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    **options: Unpack[LossKeywords],
) -> torch.Tensor:
    """``causal_lm_loss(logits, labels)`` where each rank holds a vocabulary slice of the logits.

    Args:
        logits_shard: ``[..., T, V_r]`` this rank's columns ``[vocab_start, vocab_start + V_r)``
            of the logits (e.g. the output of a column-parallel ``lm_head``), any float dtype.
            Or the ``[..., T, V]`` DTensor sharded on the last dim that a ``ColwiseParallel``
            ``lm_head`` returns with ``use_local_output=False`` (what ``loss_parallel``
            takes): the group and the layout come from its mesh, as for a DTensor weight.
        labels: ``[..., T]`` *global* token ids, the same on every rank.
        group, vocab_start, vocab_size: as in :func:`vocab_parallel_linear_cross_entropy`.
        num_items_in_batch, token_weights: as in :func:`lmloss.causal_lm_loss`.
        class_weights: ``[V]``, all of them, the same on every rank (as in
            :func:`vocab_parallel_linear_cross_entropy`).
        **options: the loss options of :func:`lmloss.causal_lm_loss`, with its defaults,
            on the full ``[..., T, V]`` logits (:class:`lmloss.LossKeywords`).

    Returns:
        As :func:`lmloss.causal_lm_loss`, the same on every rank. Backward gives
        ``logits_shard`` its own gradient (no collective): reducing the gradient of
        whatever produced the shard (replicated hidden states) is the producer's job.

    Raises:
        ValueError: as :func:`vocab_parallel_linear_cross_entropy`; a bad
            ``logits_shard`` on one rank raises on every rank.
    """
    spec = spec_from_keywords("vocab_parallel_cross_entropy", options)
    local = localize(
        logits_shard,
        -1,
        "logits_shard",
        group,
        vocab_start,
        vocab_size,
        {"labels": labels, "token_weights": token_weights},
    )
    logits_shard, group, vocab_start, vocab_size = local.shard, local.group, local.vocab_start, local.vocab_size
    labels, token_weights = local.replicated
    labels = check_labels(labels)
    if labels.ndim < 1:
        raise ValueError("labels must have shape [..., T] (at least 1-D), got a 0-D tensor")
    # Labels are replicated (fail alike everywhere); the logits shard is this rank's own.
    problem = logits_problem(logits_shard, labels)
    shard_columns = 0 if problem is not None else logits_shard.shape[-1]
    layout, problem = resolve_layout(group, shard_columns, vocab_start, vocab_size, problem)
    dtype = compute_dtype(torch.float32 if problem is not None else logits_shard.dtype)
    plan, num_items = prepare(labels, token_weights, num_items_in_batch, layout.vocab_size, spec, dtype, class_weights)
    if problem is not None:  # the forward gathers the statistics of every scored row at once
        fail_together(problem, first_gather_rows(plan.coef, max(1, labels.numel())), layout, labels.device)
    # Explicit row count: an empty shard ([..., T, 0]) leaves -1 ambiguous.
    logits2d = logits_shard.reshape(labels.numel(), logits_shard.shape[-1])
    chunk_rows = logits_chunk_rows(logits2d.shape[1], plan.coef.dtype)
    per_row = ShardedLogitsCE.apply(
        logits2d,
        plan.targets.reshape(-1),
        plan.coef.reshape(-1),
        _reducer(layout, plan.class_weights),
        LossMath.from_spec(spec),
        chunk_rows,
    )
    return finish(per_row, plan, labels.shape, spec, num_items)


# --- token log-probs and entropy --------------------------------------------------------------


def vocab_parallel_linear_token_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **options: Unpack[LogprobKeywords],
) -> TokenLogprobs:
    """:func:`lmloss.linear_token_logprobs` with the ``lm_head`` sharded by vocabulary over ``group``.

    Each rank sends, per scored token and chunk, its shard's max, sum of exponentials,
    target logit and (for the entropy) ``sum exp(x - max) * (x - max)`` in the one
    all-gather of the chunk (:mod:`lmloss._engine.logprobs`); no rank holds full logits.

    Args:
        hidden: ``[..., T, D]`` final hidden states, the same on every rank of ``group``.
        weight_shard: ``[V_r, D]`` this rank's rows of ``lm_head.weight``, or its DTensor
            sharded on dim 0, as in :func:`vocab_parallel_linear_cross_entropy`.
        labels: ``[..., T]`` *global* token ids, the same on every rank.
        group, vocab_start, vocab_size: as in :func:`vocab_parallel_linear_cross_entropy`.
        bias: ``[V_r]`` this rank's rows of ``lm_head.bias`` (a DTensor like the weight's), or None.
        chunk_size: tokens per chunk (one all-gather each), the same on every rank;
            default from a 256 MiB budget for a ``[chunk, V / P]`` float32 buffer.
        **options: ``shift``, ``ignore_index``, ``temperature``, ``softcap``,
            ``with_entropy`` (:class:`lmloss.logprobs.LogprobKeywords`): as in
            :func:`lmloss.linear_token_logprobs` on the full weight, with its defaults.

    Returns:
        :class:`lmloss.TokenLogprobs`, the same on every rank: ``[..., T]`` float32
        (float64 for float64 inputs) aligned with ``labels``, 0 where nothing is scored.
        Both outputs are differentiable with any upstream gradients: backward recomputes
        each chunk's logits from the kept log-sum-exps (no exchange) and all-reduces the
        hidden-state gradient inside (each rank gets the full one; do not reduce it again),
        and each rank gets the gradient of its own shard (and bias).

    Raises:
        ValueError: on bad options, labels outside the full vocabulary, or shards that do
            not fit it; a bad shard on one rank raises on every rank (see the module doc).
    """
    spec = LogprobSpec.from_keywords("vocab_parallel_linear_token_logprobs", options)
    _check_chunk_size(chunk_size)
    local = localize(
        weight_shard, 0, "weight_shard", group, vocab_start, vocab_size, {"hidden": hidden, "labels": labels}
    )
    weight_shard, group, vocab_start, vocab_size = local.shard, local.group, local.vocab_start, local.vocab_size
    (hidden, labels), bias = local.replicated, local_bias(bias, local.piece)
    hidden, weight_shard, bias = autocast_inputs(hidden, weight_shard, bias)
    hidden = check_hidden(hidden)
    labels = check_labels_on(labels, hidden.shape[:-1], hidden.device)
    problem = weight_problem(hidden, weight_shard)
    problem = problem or bias_problem(weight_shard, bias)
    layout, problem = resolve_layout(group, 0 if problem else weight_shard.shape[0], vocab_start, vocab_size, problem)
    check_label_range(labels, layout.vocab_size, spec.ignore_index)  # replicated: raises alike everywhere
    dtype = compute_dtype(hidden.dtype)
    plan = spec.plan(labels, dtype)
    scored = plan.coef.reshape(-1) != 0
    hidden2d = hidden.reshape(labels.numel(), hidden.shape[-1])
    if chunk_size is None:
        chunk_size = default_chunk_rows(hidden2d, layout, dtype, buffers=2)  # the logits and exp(x - max)
    if problem is not None:
        fail_together(problem, first_gather_rows(scored, chunk_size), layout, labels.device)
    logprobs, entropy = linear_logprobs(
        hidden2d,
        weight_shard,
        bias,
        plan.targets.reshape(-1),
        scored,
        spec.engine_options(chunk_size),
        ShardLogprobs(_reducer(layout)),
        _sum_hidden(layout),
    )
    return spec.result(logprobs, entropy, labels.shape)


# --- argument checks ------------------------------------------------------------------------


def _check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
