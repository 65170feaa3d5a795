"""The process group of a vocab-parallel call: layout, chunking, collectives, fail-together.

What :mod:`lmloss.parallel` needs to coordinate the ranks that each hold a vocabulary
shard of the ``lm_head``, apart from the loss math (the engine's):

* the layout (:class:`ShardLayout`): this rank's rows ``[start, start + size)`` of a
  ``vocab_size`` vocabulary, given or gathered in one all-gather that also checks
  that the shards tile ``[0, V)``;
* the chunking: rows per chunk from rank-independent numbers, so that every rank
  runs the same number of chunks, i.e. of collectives;
* the collectives: the all-gather of each rank's ``[c, 4]`` row statistics, in
  float64;
* the fail-together protocol: a rank whose own input is bad tells the others in the
  first collective of the call (a flag in the layout gather, or a marked block in the
  first statistics gather), and every rank raises the same ``ValueError`` (the
  module doc of :mod:`lmloss.parallel` describes it for users).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from lmloss._engine.chunks import DEFAULT_CHUNK_BYTES, chunk_indices, scored_rows
from lmloss._validation import check_int, value_checks_enabled

__all__ = [
    "CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
    "ShardLayout",
    "check_initialized",
    "default_chunk_rows",
    "fail_together",
    "first_gather_rows",
    "gather_layout",
    "gather_stats",
    "logits_chunk_rows",
    "resolve_layout",
]

# Bytes of one [rows, V_r] chunk that the default chunk size aims for: the
# single-process chunked backend's budget (named here so tests can patch it).
CHUNK_BYTES = DEFAULT_CHUNK_BYTES
MIN_CHUNK_ROWS = 64
# A sum of exponentials is never negative: a bad rank's statistics carry this instead.
_BAD_INPUT_MARK = -1.0


# --- the vocabulary layout ----------------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard lies: rows ``[start, start + size)`` of a ``vocab_size`` vocabulary."""

    group: dist.ProcessGroup | None
    world_size: int
    start: int
    size: int
    vocab_size: int


def gather_layout(
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


def resolve_layout(
    group: dist.ProcessGroup | None,
    shard_size: int,
    vocab_start: int | None,
    vocab_size: int | None,
    problem: str | None,
) -> tuple[ShardLayout, str | None]:
    """The layout, and this rank's bad-input message (``None`` if its input is fine).

    When the layout is gathered, a bad input on any rank raises here on every rank.
    When it is given, a bad input comes back to the caller, which tells the other
    ranks in the first statistics gather (:func:`fail_together`).
    """
    check_initialized(group)
    if vocab_size is not None:
        check_int("vocab_size", vocab_size)
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
        problem = problem or f"vocab_start must be an int or None, got {vocab_start!r}"
        vocab_start = 0
    if vocab_start is None or vocab_size is None:
        start, total = gather_layout(shard_size, group, vocab_start, problem)
        if vocab_size is not None and vocab_size != total:
            raise ValueError(f"vocab_size={vocab_size} but the shards of the group add up to {total} rows")
        vocab_start, vocab_size = start, total
    # Given both, nothing is gathered, so only this rank's own shard can be checked.
    elif problem is None and (vocab_size < 1 or vocab_start < 0 or vocab_start + shard_size > vocab_size):
        problem = (
            f"this rank's shard, rows [{vocab_start}, {vocab_start + shard_size}), does not fit in a "
            f"vocabulary of vocab_size={vocab_size}"
        )
    layout = ShardLayout(group, dist.get_world_size(group), vocab_start, shard_size, max(vocab_size, 1))
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


def fail_together(problem: str, first_rows: int, layout: ShardLayout, device: torch.device) -> NoReturn:
    """Join the other ranks' first statistics gather with a marked block, then raise.

    ``first_rows`` is the row count of that gather, known from the replicated labels;
    with none there is no collective to join and nobody waits.
    """
    rank = dist.get_rank(layout.group)
    if first_rows == 0 or layout.world_size == 1:
        raise _together_error([rank], problem)
    marked = torch.full((first_rows, 4), math.nan, dtype=torch.float64, device=device)
    marked[:, 1] = _BAD_INPUT_MARK
    gathered = gather_stats(marked, layout, first=False)
    flagged = (gathered[:, 0, 1] < 0).nonzero().flatten().tolist()
    raise _together_error(flagged or [rank], problem)


def check_initialized(group: dist.ProcessGroup | None) -> None:
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


def gather_stats(stats: torch.Tensor, layout: ShardLayout, *, first: bool) -> torch.Tensor:
    """``[c, 4]`` local statistics -> ``[P, c, 4]`` float64 statistics of every rank.

    They travel in float64 whatever the compute dtype: the exchange then does not
    depend on a per-rank dtype (logits shards may differ), and ``P * c * 4`` numbers
    are tiny next to a ``[c, V_r]`` chunk. On the ``first`` gather of a call, a block
    marked by a bad rank (:func:`fail_together`) makes every rank raise.
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


# --- chunking: the same number of collectives on every rank ---------------------------------


def default_chunk_rows(hidden2d: torch.Tensor, layout: ShardLayout, dtype: torch.dtype, buffers: int = 1) -> int:
    """Rows per chunk from rank-independent numbers (``V / P``, not ``V_r``): uneven
    shards must still run the same number of chunks, i.e. of collectives.
    ``buffers``: how many ``[chunk, V_r]`` buffers of ``dtype`` a chunk holds."""
    n_rows, width = hidden2d.shape
    columns = -(-layout.vocab_size // layout.world_size)
    row_bytes = buffers * (torch.finfo(dtype).bits // 8)
    budget = max(CHUNK_BYTES, n_rows * width * hidden2d.element_size())
    return int(max(1, min(max(n_rows, 1), max(MIN_CHUNK_ROWS, budget // (row_bytes * columns)))))


def logits_chunk_rows(columns: int, dtype: torch.dtype) -> int:
    """Rows per chunk of a ``[rows, columns]`` logits shard: local, as that form gathers
    once per call whatever its chunks."""
    itemsize = torch.finfo(dtype).bits // 8
    return max(1, CHUNK_BYTES // max(1, columns * itemsize))


def first_gather_rows(coef: torch.Tensor, chunk_rows: int) -> int:
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
