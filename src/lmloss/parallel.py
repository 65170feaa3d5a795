"""Vocab-parallel cross-entropy: the ``lm_head`` sharded by vocabulary over a process group.

Tensor parallelism splits the ``[V, D]`` output weight by rows: rank ``r`` of a group
of ``P`` holds ``W_r = W[start_r : start_r + V_r]`` (contiguous shards that tile
``[0, V)``, equal or not), while the hidden states ``[..., T, D]`` and the labels are
the same on every rank. No rank ever holds full-vocabulary logits. Per target token,
the loss only needs four numbers from each rank's slice ``z_r`` of the logits:

    m_r = max(z_r)               s_r = sum(exp(z_r - m_r))
    t_r = z_r[y] if y is in r's shard, else 0      u_r = sum(z_r)  (label smoothing)

and then, identically on every rank,

    M = max_r m_r     lse = M + log(sum_r s_r * exp(m_r - M))     z_y = sum_r t_r
    ce = (1-e) * (lse - z_y) + e * (lse - sum_r u_r / V)
    loss = w * ce + c * lse**2

where ``w`` is 1 for plain cross-entropy, or the DFT/focal weight of the token
(``token_loss``): with ``p = exp(z_y - lse)`` the target probability, DFT ``w = p``,
focal ``w = (1 - p)^gamma``. ``p`` is known on every rank once the statistics are
combined, so the weight costs no collective. Its gradient is folded into each row's
coefficients (``a`` the token's coefficient, ``s`` the global softmax):

    d loss / dz = a * ((w + 2c*lse + k) * s - ((1-e) * w + k) * onehot(y) - w * e / V)

with ``k = gamma * (1-p)^(gamma-1) * p * ce`` for ``"focal_attached"`` (the weight's
own derivative, Lin et al. 2017) and ``k = 0`` for the detached forms.

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
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from lmloss._validation import (
    check_int,
    check_label_range,
    check_labels,
    check_loss_options,
    check_num_items,
    check_tensor,
    check_token_weights,
    resolve_focal_gamma,
    value_checks_enabled,
)
from lmloss.reference import (
    Normalize,
    Reduction,
    TargetPlan,
    TokenLoss,
    mean_over_items,
    plan_targets,
    target_weight,
    to_label_alignment,
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


# --- the math of one chunk ----------------------------------------------------------------


@dataclass(frozen=True)
class _Math:
    label_smoothing: float
    z_loss: float
    softcap: float | None
    token_loss: str = "ce"  # "ce", "dft", "focal" or "focal_attached"
    focal_gamma: float = 0.0

    @property
    def weighted(self) -> bool:
        """Whether each token's cross-entropy is scaled by a DFT/focal weight ``w``."""
        return self.token_loss != "ce"

    @property
    def attached(self) -> bool:
        """Whether the weight's own derivative (the term ``k``) enters the gradient."""
        return self.token_loss == "focal_attached" and self.focal_gamma != 0


def _local_targets(y: torch.Tensor, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets as columns of this shard (0 where the target lives elsewhere) and which are here."""
    own = (y >= layout.start) & (y < layout.start + layout.size)
    return torch.where(own, y - layout.start, torch.zeros_like(y)), own


def _softcap_(z: torch.Tensor, softcap: float | None, derivative: bool) -> torch.Tensor | None:
    """``z <- s * tanh(z / s)`` in place; returns ``1 - (z/s)^2`` (its derivative) if asked."""
    if softcap is None:
        return None
    z.div_(softcap).tanh_()
    cap = (1.0 - z * z) if derivative else None
    z.mul_(softcap)
    return cap


def _local_stats_(z: torch.Tensor, y_local: torch.Tensor, own: torch.Tensor, math: _Math) -> torch.Tensor:
    """``[c, 4]`` (max, sum of exp below the max, target logit, sum of logits) of this shard.

    Overwrites ``z`` with ``exp(z - max)``: the gradient needs exactly that, rescaled.
    """
    rows = z.shape[0]
    if z.shape[1] == 0:  # an empty shard: contributes exp(-inf) = 0 to every sum
        empty = z.new_zeros(rows, 4)
        empty[:, 0] = -_math.inf
        return empty
    target = torch.where(own, z.gather(1, y_local.unsqueeze(1)).squeeze(1), z.new_zeros(()))
    total = z.sum(dim=1) if math.label_smoothing > 0 else z.new_zeros(rows)
    peak = z.amax(dim=1)
    z.sub_(peak.unsqueeze(1)).exp_()
    return torch.stack([peak, z.sum(dim=1), target, total], dim=1)


def _combine(gathered: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[P, c, 4]`` statistics -> global log-sum-exp, target logit, sum of logits (each ``[c]``, ``dtype``)."""
    peaks = gathered[..., 0]
    peak = peaks.amax(dim=0)
    lse = peak + (gathered[..., 1] * torch.exp(peaks - peak)).sum(dim=0).log()
    return lse.to(dtype), gathered[..., 2].sum(dim=0).to(dtype), gathered[..., 3].sum(dim=0).to(dtype)


@dataclass(frozen=True)
class _Terms:
    """Per-token results of the combine step (each ``[c]``).

    ``w`` is the DFT/focal weight (None for plain cross-entropy) and ``k`` the
    attached focal loss's gradient term (None otherwise); backward needs both.
    """

    loss: torch.Tensor
    w: torch.Tensor | None
    k: torch.Tensor | None


def _token_loss(lse: torch.Tensor, z_y: torch.Tensor, sum_z: torch.Tensor, math: _Math, vocab_size: int) -> _Terms:
    """The per-token loss from global statistics, as ``causal_lm_loss`` defines it."""
    nll = lse - z_y
    ce = nll
    if math.label_smoothing > 0:
        ce = (1.0 - math.label_smoothing) * nll + math.label_smoothing * (lse - sum_z / vocab_size)
    w = k = None
    loss = ce
    if math.weighted:
        # The weight uses the hard target's probability, as the reference does.
        w = target_weight(-nll, math.token_loss, math.focal_gamma)
        loss = ce * w
        if math.attached:
            k = _focal_term(nll, ce, math.focal_gamma)
    if math.z_loss > 0:
        loss = loss + math.z_loss * lse.square()  # not weighted: it regularizes the normalizer
    return _Terms(loss, w, k)


def _focal_term(nll: torch.Tensor, ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """``k = gamma (1-p)^(gamma-1) p ce``: ``d w / dz = k / ce * (softmax - onehot(y))``.

    0 where ``p`` rounds to 1 (the weight's limit, as the reference takes it), which
    also keeps ``(1-p)^(gamma-1)`` finite for ``gamma < 1``.
    """
    p = torch.exp(-nll)
    q = torch.clamp(-torch.expm1(-nll), min=0.0)  # 1 - p, precise near p = 1
    positive = q > 0
    safe = torch.where(positive, q, torch.ones_like(q))
    return torch.where(positive, gamma * safe.pow(gamma - 1.0) * p * ce, torch.zeros_like(q))


def _logit_grad_(
    z: torch.Tensor,
    to_softmax: torch.Tensor,
    lse: torch.Tensor,
    y_local: torch.Tensor,
    own: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor | None,
    k: torch.Tensor | None,
    math: _Math,
    vocab_size: int,
    cap: torch.Tensor | None,
) -> None:
    """``z`` (holding ``exp(z - ref)``) <- d(sum of a * loss)/d(raw logits of this shard).

    ``to_softmax[i] = exp(ref_i - lse_i)`` turns row ``i`` into the global softmax;
    then ``a * ((w + 2c*lse + k) * softmax - ((1-e) * w + k) * onehot(y) - w * e / V)``
    (``w = 1``, ``k = 0`` for plain cross-entropy), times the softcap derivative.
    """
    aw = a if w is None else a * w
    row_scale = aw + 2.0 * math.z_loss * a * lse if math.z_loss > 0 else aw
    onehot = (1.0 - math.label_smoothing) * aw
    if k is not None:
        row_scale, onehot = row_scale + a * k, onehot + a * k
    z.mul_((row_scale * to_softmax).unsqueeze(1))
    if math.label_smoothing > 0:
        z.sub_((aw * (math.label_smoothing / vocab_size)).unsqueeze(1))
    if z.shape[1] > 0:  # the one-hot term lives on the rank that owns the target
        hit = torch.where(own, -onehot, torch.zeros_like(onehot))
        z.scatter_add_(1, y_local.unsqueeze(1), hit.unsqueeze(1).to(z.dtype))
    if cap is not None:
        z.mul_(cap)


def _chunks(n_rows: int, rows: torch.Tensor | None, chunk_rows: int) -> list[torch.Tensor | slice]:
    """Row indices of each chunk: slices of every row, or pieces of the scored rows."""
    if rows is None:
        return [slice(s, min(s + chunk_rows, n_rows)) for s in range(0, n_rows, chunk_rows)]
    return list(rows.split(chunk_rows)) if rows.numel() else []  # split() of nothing gives one empty piece


def _scored_rows(coef: torch.Tensor) -> torch.Tensor | None:
    """Indices of the scored rows, or None for every row (static shapes, value checks off).

    ``coef`` comes from the replicated labels, so every rank finds the same rows and
    runs the same number of chunks (and collectives).
    """
    if not value_checks_enabled():
        return None
    rows = coef.nonzero().squeeze(1)
    return None if rows.numel() == coef.numel() else rows


# --- fused: hidden states and the weight shard ---------------------------------------------


@dataclass
class _Grads:
    """float32 (or float64) accumulators; cast to the inputs' dtypes when finished."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    dtypes: tuple[torch.dtype, torch.dtype]

    @classmethod
    def allocate(cls, hidden: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, bool]) -> _Grads:
        def buffer(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
            if not needed:
                return None
            return torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)

        return cls(buffer(hidden, needs[0]), buffer(weight, needs[1]), (hidden.dtype, weight.dtype))

    def finish(self, scale: torch.Tensor | None, layout: _Layout, any_row: bool) -> tuple[torch.Tensor | None, ...]:
        if self.hidden is not None and any_row and layout.world_size > 1:
            # Each rank holds dz_r @ W_r, its shard's part of d loss / d hidden.
            dist.all_reduce(self.hidden, op=dist.ReduceOp.SUM, group=layout.group)
        out = []
        for grad, dtype in zip((self.hidden, self.weight), self.dtypes):
            if grad is not None and scale is not None:
                grad.mul_(scale.to(grad.dtype))  # in the wide dtype: the scale is not rounded first
            out.append(None if grad is None else grad.to(dtype))
        return tuple(out)


@dataclass
class _RowTerms:
    """``[N]`` per-row results kept for backward: log-sum-exp, and ``w``/``k`` when used."""

    lse: torch.Tensor
    w: torch.Tensor | None
    k: torch.Tensor | None

    @classmethod
    def zeros(cls, like: torch.Tensor, math: _Math) -> _RowTerms:
        def buffer(needed: bool) -> torch.Tensor | None:
            return torch.zeros_like(like) if needed else None

        return cls(torch.zeros_like(like), buffer(math.weighted), buffer(math.attached))

    def store(self, index: torch.Tensor | slice, lse: torch.Tensor, terms: _Terms) -> None:
        self.lse[index] = lse
        if self.w is not None and terms.w is not None:
            self.w[index] = terms.w
        if self.k is not None and terms.k is not None:
            self.k[index] = terms.k

    def rows(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return self.lse[index], _at(self.w, index), _at(self.k, index)


def _at(values: torch.Tensor | None, index: torch.Tensor | slice) -> torch.Tensor | None:
    return None if values is None else values[index]


def _fused_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coef: torch.Tensor,
    rows: torch.Tensor | None,
    layout: _Layout,
    math: _Math,
    chunk_rows: int,
    grads: _Grads | None,
    saved: _RowTerms | None = None,
) -> tuple[torch.Tensor, _RowTerms]:
    """Chunks of scored rows: ``[N]`` weighted losses and the per-row terms of backward.

    With ``saved`` (backward of ``reduction="none"``) the statistics are known:
    no collective, only the gradients (``coef`` then holds the upstream gradients).
    """
    losses = torch.zeros(hidden.shape[0], dtype=coef.dtype, device=hidden.device)
    kept = _RowTerms.zeros(losses, math)
    for i, index in enumerate(_chunks(hidden.shape[0], rows, chunk_rows)):
        h, y, a = hidden[index], targets[index], coef[index]
        z = torch.mm(h, weight.t()).to(coef.dtype)  # products in the inputs' dtype, math in float32+
        cap = _softcap_(z, math.softcap, derivative=grads is not None)
        y_local, own = _local_targets(y, layout)
        if saved is None:
            stats = _local_stats_(z, y_local, own, math)
            lse, z_y, sum_z = _combine(_gather_stats(stats, layout, first=i == 0), coef.dtype)
            terms = _token_loss(lse, z_y, sum_z, math, layout.vocab_size)
            losses[index] = torch.where(a != 0, terms.loss * a, torch.zeros_like(terms.loss))
            kept.store(index, lse, terms)
            w, k = terms.w, terms.k
            to_softmax = torch.exp(stats[:, 0] - lse)
        else:
            lse, w, k = saved.rows(index)
            z.sub_(lse.unsqueeze(1)).exp_()
            to_softmax = torch.ones_like(lse)
        if grads is not None:
            _logit_grad_(z, to_softmax, lse, y_local, own, a, w, k, math, layout.vocab_size, cap)
            _accumulate(z, h, weight, grads, index)
    return losses, kept


def _accumulate(
    dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grads: _Grads, index: torch.Tensor | slice
) -> None:
    """``dh[index] = dz @ W_r`` (this shard's part) and ``dW_r += dz^T @ h``, accumulated wide."""
    if grads.hidden is not None:
        grads.hidden[index] = torch.mm(dz.to(weight.dtype), weight).to(grads.hidden.dtype)
    if grads.weight is not None:
        grads.weight.addmm_(dz.t(), h.to(dz.dtype))


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        coef: torch.Tensor,
        layout: _Layout,
        math: _Math,
        reduce_sum: bool,
        chunk_rows: int,
        needs: tuple[bool, bool],
    ) -> torch.Tensor:
        rows = _scored_rows(coef)
        ctx.layout, ctx.math, ctx.chunk_rows, ctx.needs, ctx.reduce_sum = layout, math, chunk_rows, needs, reduce_sum
        ctx.any_row = rows is None or rows.numel() > 0
        if reduce_sum:
            # The loss is linear in the gradients: make them now, scale them in backward.
            grads = _Grads.allocate(hidden, weight, needs) if any(needs) else None
            losses, _ = _fused_loop(hidden, weight, targets, coef, rows, layout, math, chunk_rows, grads)
            ctx.grads, ctx.weight, ctx.weight_version = grads, weight, weight._version
            return losses.sum()
        losses, kept = _fused_loop(hidden, weight, targets, coef, rows, layout, math, chunk_rows, None)
        ctx.save_for_backward(hidden, weight, targets, coef, rows, kept.lse, kept.w, kept.k)
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.reduce_sum:
            if ctx.grads is None:
                raise RuntimeError(
                    "lmloss vocab_parallel_linear_cross_entropy: backward was called twice; its gradients are "
                    "made in forward and scaled in place, so retain_graph is not supported"
                )
            if ctx.weight._version != ctx.weight_version:
                raise RuntimeError(
                    "lmloss vocab_parallel_linear_cross_entropy: the weight shard was modified in place between "
                    "forward and backward; its gradients were made in forward and would be stale"
                )
            grads, ctx.grads = ctx.grads, None
            d_hidden, d_weight = grads.finish(grad_output, ctx.layout, ctx.any_row)
        else:
            hidden, weight, targets, coef, rows, lse, w, k = ctx.saved_tensors
            grads = _Grads.allocate(hidden, weight, ctx.needs)
            upstream = coef * grad_output.to(coef.dtype)  # each token's own upstream gradient
            saved = _RowTerms(lse, w, k)
            with torch.autocast(hidden.device.type, enabled=False):
                _fused_loop(hidden, weight, targets, upstream, rows, ctx.layout, ctx.math, ctx.chunk_rows, grads, saved)
            d_hidden, d_weight = grads.finish(None, ctx.layout, ctx.any_row)
        return d_hidden, d_weight, None, None, None, None, None, None, None


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
    gamma = _check_options(shift, ignore_index, reduction, label_smoothing, z_loss, softcap, normalize,
                           token_loss, focal_gamma, chunk_size)
    hidden, weight_shard = _autocast_inputs(hidden, weight_shard)
    hidden = _check_hidden(hidden)
    labels = _check_labels_on(labels, hidden.shape[:-1], hidden.device)
    # Everything above is replicated (fails alike everywhere); the shard is this rank's own.
    problem = _weight_problem(hidden, weight_shard)
    shard_rows = 0 if problem is not None else weight_shard.shape[0]
    layout, problem = _resolve_layout(group, shard_rows, vocab_start, vocab_size, problem)
    plan, num_items = _plan(labels, token_weights, num_items_in_batch, layout, hidden.dtype,
                            shift=shift, ignore_index=ignore_index, normalize=normalize)
    math = _Math(float(label_smoothing), float(z_loss), None if softcap is None else float(softcap), token_loss, gamma)
    hidden2d = hidden.reshape(labels.numel(), hidden.shape[-1])
    if chunk_size is None:
        chunk_size = _default_chunk_rows(hidden2d, layout, plan.coef.dtype)
    if problem is not None:
        _fail_together(problem, _first_gather_rows(plan.coef, chunk_size), layout, labels.device)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight_shard.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        result = _VocabParallelLinearCE.apply(
            hidden2d, weight_shard, plan.targets.reshape(-1), plan.coef.reshape(-1),
            layout, math, reduction != "none", chunk_size, needs,
        )
    return _reduce(result, plan, labels, reduction, shift, num_items)


# --- logits shard given ---------------------------------------------------------------------


class _VocabParallelCE(torch.autograd.Function):
    """``[N, V_r]`` logits shard -> ``[N]`` weighted per-row losses; one all-gather in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        coef: torch.Tensor,
        layout: _Layout,
        math: _Math,
        chunk_rows: int,
    ) -> torch.Tensor:
        rows = _scored_rows(coef)
        chunks = _chunks(logits.shape[0], rows, chunk_rows)
        losses = torch.zeros(logits.shape[0], dtype=coef.dtype, device=logits.device)
        kept = _RowTerms.zeros(losses, math)
        if chunks:
            # Local statistics of every chunk first, then one all-gather for all of them:
            # nothing here needs the global numbers before the end.
            stats = []
            for index in chunks:
                z = logits[index].to(coef.dtype, copy=True)
                _softcap_(z, math.softcap, derivative=False)
                stats.append(_local_stats_(z, *_local_targets(targets[index], layout), math))
            lse, z_y, sum_z = _combine(_gather_stats(torch.cat(stats), layout, first=True), coef.dtype)
            scored = slice(None) if rows is None else rows
            a = coef[scored]
            terms = _token_loss(lse, z_y, sum_z, math, layout.vocab_size)
            losses[scored] = torch.where(a != 0, terms.loss * a, torch.zeros_like(terms.loss))
            kept.store(scored, lse, terms)
        ctx.layout, ctx.math, ctx.chunk_rows = layout, math, chunk_rows
        ctx.save_for_backward(logits, targets, coef, rows, kept.lse, kept.w, kept.k)
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        logits, targets, coef, rows, lse_all, w_all, k_all = ctx.saved_tensors
        saved = _RowTerms(lse_all, w_all, k_all)
        grad = torch.zeros_like(logits)
        upstream = coef * grad_output.to(coef.dtype)
        math, layout = ctx.math, ctx.layout
        for index in _chunks(logits.shape[0], rows, ctx.chunk_rows):
            z = logits[index].to(coef.dtype, copy=True)
            cap = _softcap_(z, math.softcap, derivative=True)
            lse, w, k = saved.rows(index)
            z.sub_(lse.unsqueeze(1)).exp_()  # the global softmax, from the saved log-sum-exp
            y_local, own = _local_targets(targets[index], layout)
            _logit_grad_(z, torch.ones_like(lse), lse, y_local, own, upstream[index], w, k, math, layout.vocab_size,
                         cap)
            grad[index] = z.to(grad.dtype)
        return grad, None, None, None, None, None


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

    Returns:
        As :func:`lmloss.causal_lm_loss`, the same on every rank. Backward gives
        ``logits_shard`` its own gradient (no collective): reducing the gradient of
        whatever produced the shard (replicated hidden states) is the producer's job.

    Raises:
        ValueError: as :func:`vocab_parallel_linear_cross_entropy`; a bad
            ``logits_shard`` on one rank raises on every rank.
    """
    gamma = _check_options(shift, ignore_index, reduction, label_smoothing, z_loss, softcap, normalize,
                           token_loss, focal_gamma, None)
    labels = check_labels(labels)
    if labels.ndim < 1:
        raise ValueError("labels must have shape [..., T] (at least 1-D), got a 0-D tensor")
    # Labels are replicated (fail alike everywhere); the logits shard is this rank's own.
    problem = _logits_problem(logits_shard, labels)
    shard_columns = 0 if problem is not None else logits_shard.shape[-1]
    layout, problem = _resolve_layout(group, shard_columns, vocab_start, vocab_size, problem)
    dtype = torch.float32 if problem is not None else logits_shard.dtype
    plan, num_items = _plan(labels, token_weights, num_items_in_batch, layout, dtype,
                            shift=shift, ignore_index=ignore_index, normalize=normalize)
    if problem is not None:  # the forward gathers the statistics of every scored row at once
        _fail_together(problem, _first_gather_rows(plan.coef, max(1, labels.numel())), layout, labels.device)
    math = _Math(float(label_smoothing), float(z_loss), None if softcap is None else float(softcap), token_loss, gamma)
    # Explicit row count: an empty shard ([..., T, 0]) leaves -1 ambiguous.
    logits2d = logits_shard.reshape(labels.numel(), logits_shard.shape[-1])
    itemsize = torch.finfo(plan.coef.dtype).bits // 8
    chunk_rows = max(1, _CHUNK_BYTES // max(1, logits2d.shape[1] * itemsize))  # local: no collective per chunk
    per_row = _VocabParallelCE.apply(
        logits2d, plan.targets.reshape(-1), plan.coef.reshape(-1), layout, math, chunk_rows
    )
    return _reduce(per_row, plan, labels, reduction, shift, num_items)


# --- shared plumbing ------------------------------------------------------------------------


def _plan(
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    num_items_in_batch: object,
    layout: _Layout,
    dtype: torch.dtype,
    *,
    shift: bool,
    ignore_index: int,
    normalize: Normalize,
) -> tuple[TargetPlan, torch.Tensor | float | None]:
    # Labels are replicated, so every rank raises alike (or none does).
    check_label_range(labels, layout.vocab_size, ignore_index)
    weights = None if token_weights is None else check_token_weights(token_weights, labels)
    num_items = check_num_items(num_items_in_batch)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    plan = plan_targets(labels, weights, shift=shift, ignore_index=ignore_index, normalize=normalize, dtype=compute)
    return plan, num_items


def _reduce(
    result: torch.Tensor,
    plan: TargetPlan,
    labels: torch.Tensor,
    reduction: str,
    shift: bool,
    num_items: torch.Tensor | float | None,
) -> torch.Tensor:
    if reduction == "none":
        return to_label_alignment(result.view(labels.shape), shift)
    total = result if result.ndim == 0 else result.sum()
    return total if reduction == "sum" else mean_over_items(total, plan.item_count, num_items)


def _default_chunk_rows(hidden2d: torch.Tensor, layout: _Layout, dtype: torch.dtype) -> int:
    """Rows per chunk from rank-independent numbers (``V / P``, not ``V_r``): uneven
    shards must still run the same number of chunks, i.e. of collectives."""
    n_rows, width = hidden2d.shape
    columns = -(-layout.vocab_size // layout.world_size)
    row_bytes = torch.finfo(dtype).bits // 8
    budget = max(_CHUNK_BYTES, n_rows * width * hidden2d.element_size())
    return int(max(1, min(max(n_rows, 1), max(_MIN_CHUNK_ROWS, budget // (row_bytes * columns)))))


def _check_options(
    shift: object,
    ignore_index: object,
    reduction: object,
    label_smoothing: object,
    z_loss: object,
    softcap: object,
    normalize: object,
    token_loss: object,
    focal_gamma: object,
    chunk_size: object,
) -> float:
    """Replicated options; returns the focal gamma to use."""
    check_loss_options(shift=shift, ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, normalize=normalize)
    gamma = resolve_focal_gamma(token_loss, focal_gamma)
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    return gamma


def _first_gather_rows(coef: torch.Tensor, chunk_rows: int) -> int:
    """Rows of the first statistics gather of a call (0: the call gathers nothing).

    Follows the forward's own chunking of the replicated ``coef``, so a bad rank
    can join exactly the gather the good ranks make.
    """
    flat = coef.reshape(-1)
    chunks = _chunks(flat.shape[0], _scored_rows(flat), chunk_rows)
    if not chunks:
        return 0
    first = chunks[0]
    return len(range(flat.shape[0])[first]) if isinstance(first, slice) else first.numel()


def _check_labels_on(labels: object, shape: torch.Size, device: torch.device) -> torch.Tensor:
    labels = check_labels(labels, shape)
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the scores are on {device}")
    return labels


def _autocast_inputs(hidden: object, weight: object) -> tuple[object, object]:
    """Under autocast the products take autocast's dtype, as ``F.linear`` would."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight
    dtype = torch.get_autocast_dtype(hidden.device.type)
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (hidden, weight)]
    return cast[0], cast[1]


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
