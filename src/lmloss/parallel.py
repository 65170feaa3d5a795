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
code as on one process); the weight costs no collective. This module holds what is
about parallelism: the layout, the collectives and the fail-together protocol.

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
* Either: one more all-gather (of each rank's ``(start, size)``) when
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

import math as _math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from lmloss._engine.chunks import (
    autocast_inputs,
    chunk_indices,
    needs_grad,
    scored_rows,
)
from lmloss._engine.plan import compute_dtype, finish, prepare
from lmloss._engine.reducer import ShardReducer
from lmloss._engine.rowmath import LossMath
from lmloss._engine.sharded import ShardedLinearCE, ShardedLogitsCE
from lmloss._spec import LossSpec, Normalize, Reduction, TokenLoss
from lmloss._validation import (
    check_int,
    check_labels,
    check_tensor,
    value_checks_enabled,
)

__all__ = [
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_cross_entropy",
    "vocab_layout",
    "vocab_shard_bounds",
]

# Bytes of one [rows, V_r] chunk that the default chunk size aims for (as the
# single-process chunked backend: large enough for fast products).
_CHUNK_BYTES = 256 * 2**20
_MIN_CHUNK_ROWS = 64
# A sum of exponentials is never negative: a bad rank's statistics carry this instead.
_BAD_INPUT_MARK = -1.0


# --- the vocabulary layout ----------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where this rank's shard lies: rows ``[start, start + size)`` of a ``vocab_size`` vocabulary."""

    group: dist.ProcessGroup | None
    world_size: int
    start: int
    size: int
    vocab_size: int


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
    _check_initialized(group)
    shard_size = check_int("shard_size", shard_size)
    if vocab_start is not None:
        check_int("vocab_start", vocab_start)
    return _gather_layout(shard_size, group, vocab_start, None)


def _gather_layout(
    shard_size: int, group: dist.ProcessGroup | None, vocab_start: int | None, problem: str | None
) -> tuple[int, int]:
    """One all-gather of ``(start, size, bad-input flag)`` per rank; raises on every rank alike."""
    mine = torch.tensor(
        [-1 if vocab_start is None else vocab_start, shard_size, int(problem is not None)], dtype=torch.int64
    )
    world = dist.get_world_size(group)
    gathered = torch.empty(world * 3, dtype=torch.int64, device=_collective_device(group))
    _all_gather(gathered, mine.to(gathered.device), group)
    starts, sizes, flags = gathered.view(world, 3).cpu().T.tolist()
    flagged = [r for r in range(world) if flags[r]]
    if flagged:
        raise _together_error(flagged, problem)
    in_order = 0
    for r in range(world):  # ranks without a start follow the previous ones
        if starts[r] < 0:
            starts[r] = in_order
        in_order = starts[r] + sizes[r]
    _check_tiling(starts, sizes)
    return starts[dist.get_rank(group)], sum(sizes)


def _check_tiling(starts: list[int], sizes: list[int]) -> None:
    """The same gathered numbers on every rank, so every rank raises alike (no hang)."""
    if any(size < 0 for size in sizes) or sum(sizes) < 1:
        raise ValueError(f"vocabulary shard sizes must be >= 0 with a total >= 1, got {sizes}")
    expected = 0
    for start, size, rank in sorted(zip(starts, sizes, range(len(sizes)))):
        if start != expected:
            raise ValueError(
                f"vocabulary shards must tile [0, V) without gap or overlap: rank {rank} starts at {start} "
                f"but the shards before it end at {expected} (starts {starts}, sizes {sizes})"
            )
        expected = start + size


def _resolve_layout(
    group: dist.ProcessGroup | None,
    shard_size: int,
    vocab_start: int | None,
    vocab_size: int | None,
    problem: str | None,
) -> tuple[_Layout, str | None]:
    """The layout, and this rank's bad-input message (``None`` if its input is fine).

    When the layout is gathered, a bad input on any rank raises here on every rank.
    When it is given, a bad input comes back to the caller, which tells the other
    ranks in the first statistics gather (:func:`_fail_together`).
    """
    _check_initialized(group)
    if vocab_size is not None:
        check_int("vocab_size", vocab_size)
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
        problem = problem or f"vocab_start must be an int or None, got {vocab_start!r}"
        vocab_start = 0
    if vocab_start is None or vocab_size is None:
        start, total = _gather_layout(shard_size, group, vocab_start, problem)
        if vocab_size is not None and vocab_size != total:
            raise ValueError(f"vocab_size={vocab_size} but the shards of the group add up to {total} rows")
        vocab_start, vocab_size = start, total
    # Given both, nothing is gathered, so only this rank's own shard can be checked.
    elif problem is None and (vocab_size < 1 or vocab_start < 0 or vocab_start + shard_size > vocab_size):
        problem = (
            f"this rank's shard, rows [{vocab_start}, {vocab_start + shard_size}), does not fit in a "
            f"vocabulary of vocab_size={vocab_size}"
        )
    layout = _Layout(group, dist.get_world_size(group), vocab_start, shard_size, max(vocab_size, 1))
    return layout, problem


def _together_error(flagged: list[int], problem: str | None) -> ValueError:
    """The same error on every rank once the bad-input flags of all ranks are known.

    ``problem`` is this rank's own finding (``None`` on the good ranks).
    """
    where = f"rank {flagged[0]}" if len(flagged) == 1 else "ranks " + ", ".join(map(str, flagged))
    message = f"vocab-parallel loss: bad input on {where} of the group"
    if problem is not None:
        message += f": {problem}"
    else:
        message += " (that rank's own error says what is wrong)"
    return ValueError(message + "; every rank of the group raises this, so that none waits in a collective")


def _fail_together(problem: str, first_rows: int, layout: _Layout, device: torch.device) -> NoReturn:
    """Join the other ranks' first statistics gather with a marked block, then raise.

    ``first_rows`` is the row count of that gather, known from the replicated labels;
    with none there is no collective to join and nobody waits.
    """
    rank = dist.get_rank(layout.group)
    if first_rows == 0 or layout.world_size == 1:
        raise _together_error([rank], problem)
    marked = torch.full((first_rows, 4), _math.nan, dtype=torch.float64, device=device)
    marked[:, 1] = _BAD_INPUT_MARK
    gathered = _gather_stats(marked, layout, first=False)
    flagged = (gathered[:, 0, 1] < 0).nonzero().flatten().tolist()
    raise _together_error(flagged or [rank], problem)


def _check_initialized(group: dist.ProcessGroup | None) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "vocab-parallel losses need torch.distributed initialized (dist.init_process_group); "
            "on one process use lmloss.linear_cross_entropy / lmloss.causal_lm_loss"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


# --- collectives --------------------------------------------------------------------------


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    # NCCL moves CUDA tensors only; gloo (and the others) CPU tensors.
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(out: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """``out`` (flat, ``P * mine.numel()``) <- every rank's ``mine``, in rank order."""
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine.contiguous().view(-1), group=group)


def _gather_stats(stats: torch.Tensor, layout: _Layout, *, first: bool) -> torch.Tensor:
    """``[c, 4]`` local statistics -> ``[P, c, 4]`` float64 statistics of every rank.

    They travel in float64 whatever the compute dtype: the exchange then does not
    depend on a per-rank dtype (logits shards may differ), and ``P * c * 4`` numbers
    are tiny next to a ``[c, V_r]`` chunk. On the ``first`` gather of a call, a block
    marked by a bad rank (:func:`_fail_together`) makes every rank raise.
    """
    wide = stats.to(torch.float64)
    if layout.world_size == 1:
        return wide.unsqueeze(0)
    out = wide.new_empty(layout.world_size * wide.numel())
    _all_gather(out, wide, layout.group)
    out = out.view(layout.world_size, *stats.shape)
    # Reading the flag is one small host synchronisation per call on a GPU, so it waits
    # for value checks there; on the CPU (gloo) it costs nothing and is always done.
    if first and (value_checks_enabled() or out.device.type == "cpu"):
        flagged = (out[:, 0, 1] < 0).nonzero().flatten().tolist()
        if flagged:
            raise _together_error(flagged, None)
    return out


# --- the engine's seam: statistics of a vocabulary shard ----------------------------------------


def _reducer(layout: _Layout, class_weights: torch.Tensor | None = None) -> ShardReducer:
    """The engine's reducer for this rank's shard: one all-gather of ``[c, 4]`` per exchange
    (with ``[V]`` class weights, the fourth number is the shard's ``sum(u * z)``)."""
    return ShardReducer(
        layout.start, layout.size, layout.vocab_size, lambda stats, first: _gather_stats(stats, layout, first=first),
        class_weights,
    )


def _sum_hidden(layout: _Layout) -> Callable[[torch.Tensor], None] | None:
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``linear_cross_entropy(hidden, W, labels)`` with ``W`` sharded by vocabulary over ``group``.

    Args:
        hidden: ``[..., T, D]`` final hidden states, the same on every rank of ``group``.
        weight_shard: ``[V_r, D]`` this rank's rows ``[vocab_start, vocab_start + V_r)``
            of the ``lm_head`` weight, same dtype as ``hidden``. Shards may differ in size.
        labels: ``[..., T]`` *global* token ids (``ignore_index`` where nothing is
            trained), the same on every rank.
        group: the tensor-parallel process group (``None``: the default group).
            Every rank of it must call (collectives inside, see the module doc).
        vocab_start, vocab_size: this shard's first row and the full vocabulary size.
            If either is ``None`` both come from one all-gather of the shard sizes
            (shards in rank order unless ``vocab_start`` is given), which also checks
            that the shards tile the vocabulary; pass both (``lmloss.parallel.vocab_layout``
            once) to skip it.
        shift, ignore_index, reduction, num_items_in_batch, label_smoothing, z_loss,
        softcap, token_weights, normalize, token_loss, focal_gamma: exactly as in
            :func:`lmloss.causal_lm_loss` on the full logits (label smoothing, the
            z-loss and the DFT/focal target probability cover the full vocabulary).
        class_weights: ``[V]``, *all* the class weights (not this rank's shard), the
            same on every rank, as in :func:`lmloss.causal_lm_loss`: a rank needs the
            weight of every target and their total, and a ``[V]`` vector is small.
        chunk_size: tokens per chunk (one all-gather each); default from a 256 MiB
            budget for a ``[chunk, V / P]`` float32 buffer. Must be the same on every rank.

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
    spec = LossSpec(shift=shift, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                    z_loss=z_loss, softcap=softcap, normalize=normalize, token_loss=token_loss, focal_gamma=focal_gamma)
    _check_chunk_size(chunk_size)
    hidden, weight_shard = autocast_inputs(hidden, weight_shard)
    hidden = _check_hidden(hidden)
    labels = _check_labels_on(labels, hidden.shape[:-1], hidden.device)
    # Everything above is replicated (fails alike everywhere); the shard is this rank's own.
    problem = _weight_problem(hidden, weight_shard)
    shard_rows = 0 if problem is not None else weight_shard.shape[0]
    layout, problem = _resolve_layout(group, shard_rows, vocab_start, vocab_size, problem)
    # Labels are replicated, so every rank raises alike (or none does).
    plan, num_items = prepare(labels, token_weights, num_items_in_batch, layout.vocab_size, spec,
                              compute_dtype(hidden.dtype), class_weights)
    hidden2d = hidden.reshape(labels.numel(), hidden.shape[-1])
    if chunk_size is None:
        chunk_size = _default_chunk_rows(hidden2d, layout, plan.coef.dtype)
    if problem is not None:
        _fail_together(problem, _first_gather_rows(plan.coef, chunk_size), layout, labels.device)
    needs = needs_grad(hidden, weight_shard)
    with torch.autocast(hidden.device.type, enabled=False):
        result = ShardedLinearCE.apply(
            hidden2d, weight_shard, plan.targets.reshape(-1), plan.coef.reshape(-1),
            _reducer(layout, plan.class_weights), LossMath.from_spec(spec), reduction != "none", chunk_size, needs,
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
    """``causal_lm_loss(logits, labels)`` where each rank holds a vocabulary slice of the logits.

    Args:
        logits_shard: ``[..., T, V_r]`` this rank's columns ``[vocab_start, vocab_start + V_r)``
            of the logits (e.g. the output of a column-parallel ``lm_head``), any float dtype.
        labels: ``[..., T]`` *global* token ids, the same on every rank.
        group, vocab_start, vocab_size: as in :func:`vocab_parallel_linear_cross_entropy`.
        shift, ignore_index, reduction, num_items_in_batch, label_smoothing, z_loss,
        softcap, token_weights, normalize, token_loss, focal_gamma: exactly as in
            :func:`lmloss.causal_lm_loss` on the full ``[..., T, V]`` logits.
        class_weights: ``[V]``, all of them, the same on every rank (as in
            :func:`vocab_parallel_linear_cross_entropy`).

    Returns:
        As :func:`lmloss.causal_lm_loss`, the same on every rank. Backward gives
        ``logits_shard`` its own gradient (no collective): reducing the gradient of
        whatever produced the shard (replicated hidden states) is the producer's job.

    Raises:
        ValueError: as :func:`vocab_parallel_linear_cross_entropy`; a bad
            ``logits_shard`` on one rank raises on every rank.
    """
    spec = LossSpec(shift=shift, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                    z_loss=z_loss, softcap=softcap, normalize=normalize, token_loss=token_loss, focal_gamma=focal_gamma)
    labels = check_labels(labels)
    if labels.ndim < 1:
        raise ValueError("labels must have shape [..., T] (at least 1-D), got a 0-D tensor")
    # Labels are replicated (fail alike everywhere); the logits shard is this rank's own.
    problem = _logits_problem(logits_shard, labels)
    shard_columns = 0 if problem is not None else logits_shard.shape[-1]
    layout, problem = _resolve_layout(group, shard_columns, vocab_start, vocab_size, problem)
    dtype = compute_dtype(torch.float32 if problem is not None else logits_shard.dtype)
    plan, num_items = prepare(labels, token_weights, num_items_in_batch, layout.vocab_size, spec, dtype, class_weights)
    if problem is not None:  # the forward gathers the statistics of every scored row at once
        _fail_together(problem, _first_gather_rows(plan.coef, max(1, labels.numel())), layout, labels.device)
    # Explicit row count: an empty shard ([..., T, 0]) leaves -1 ambiguous.
    logits2d = logits_shard.reshape(labels.numel(), logits_shard.shape[-1])
    itemsize = torch.finfo(plan.coef.dtype).bits // 8
    chunk_rows = max(1, _CHUNK_BYTES // max(1, logits2d.shape[1] * itemsize))  # local: no collective per chunk
    per_row = ShardedLogitsCE.apply(
        logits2d, plan.targets.reshape(-1), plan.coef.reshape(-1), _reducer(layout, plan.class_weights),
        LossMath.from_spec(spec),
        chunk_rows,
    )
    return finish(per_row, plan, labels.shape, spec, num_items)


# --- shared plumbing ------------------------------------------------------------------------


def _default_chunk_rows(hidden2d: torch.Tensor, layout: _Layout, dtype: torch.dtype) -> int:
    """Rows per chunk from rank-independent numbers (``V / P``, not ``V_r``): uneven
    shards must still run the same number of chunks, i.e. of collectives."""
    n_rows, width = hidden2d.shape
    columns = -(-layout.vocab_size // layout.world_size)
    row_bytes = torch.finfo(dtype).bits // 8
    budget = max(_CHUNK_BYTES, n_rows * width * hidden2d.element_size())
    return int(max(1, min(max(n_rows, 1), max(_MIN_CHUNK_ROWS, budget // (row_bytes * columns)))))


def _check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")


def _first_gather_rows(coef: torch.Tensor, chunk_rows: int) -> int:
    """Rows of the first statistics gather of a call (0: the call gathers nothing).

    Follows the forward's own chunking of the replicated ``coef``, so a bad rank
    can join exactly the gather the good ranks make.
    """
    flat = coef.reshape(-1)
    chunks = chunk_indices(flat.shape[0], scored_rows(flat), chunk_rows)
    if not chunks:
        return 0
    first = chunks[0]
    return len(range(flat.shape[0])[first]) if isinstance(first, slice) else first.numel()


def _check_labels_on(labels: object, shape: torch.Size, device: torch.device) -> torch.Tensor:
    labels = check_labels(labels, shape)
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the scores are on {device}")
    return labels


def _check_hidden(hidden: object) -> torch.Tensor:
    hidden = check_tensor("hidden", hidden)
    if not hidden.is_floating_point() or hidden.ndim < 2:
        raise ValueError(
            f"hidden must be a floating-point tensor of shape [..., T, D], got dtype {hidden.dtype} "
            f"and shape {tuple(hidden.shape)}"
        )
    return hidden


def _weight_problem(hidden: torch.Tensor, weight: object) -> str | None:
    """What is wrong with this rank's ``weight_shard`` (``None``: nothing)."""
    if not isinstance(weight, torch.Tensor):
        return f"weight_shard must be a torch.Tensor, got {type(weight).__name__}"
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        return (
            f"weight_shard must have shape [V_r, D] with D = hidden.shape[-1] = {hidden.shape[-1]} "
            f"(rows of an lm_head.weight), got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        return f"hidden ({hidden.dtype}) and weight_shard ({weight.dtype}) must have the same dtype"
    if weight.device != hidden.device:
        return f"weight_shard is on {weight.device} but hidden is on {hidden.device}"
    return None


def _logits_problem(logits: object, labels: torch.Tensor) -> str | None:
    """What is wrong with this rank's ``logits_shard`` (``None``: nothing)."""
    if not isinstance(logits, torch.Tensor):
        return f"logits_shard must be a torch.Tensor, got {type(logits).__name__}"
    if not logits.is_floating_point() or logits.ndim < 2:
        return (
            f"logits_shard must be a floating-point tensor of shape [..., T, V_r], got dtype "
            f"{logits.dtype} and shape {tuple(logits.shape)}"
        )
    if logits.shape[:-1] != labels.shape:
        return (
            f"logits_shard has shape {tuple(logits.shape)} but its leading dimensions must match labels, "
            f"{tuple(labels.shape)}"
        )
    if logits.device != labels.device:
        return f"logits_shard is on {logits.device} but labels are on {labels.device}"
    return None
