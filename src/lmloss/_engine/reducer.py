"""Row statistics of a chunk of logits: the seam that vocabulary parallelism plugs into.

The loss of a row needs four numbers about its logits ``z``: the log-sum-exp, the
target logit, the sum of the logits (label smoothing) and, for the gradient, the
softmax. A *reducer* turns a chunk's ``[c, V_r]`` logits into those statistics,
leaving in the chunk buffer what the gradient needs (the softmax, or ``exp(z - m)``
and a per-row factor that turns it into the softmax):

- :class:`LocalReducer`: the whole vocabulary is in the chunk (one process). An
  in-place log-softmax gives the log-sum-exp and the target's log-probability in one
  pass, and ``exp`` of it the softmax.
- :class:`ShardReducer`: each process holds a vocabulary shard. Per row it computes
  ``(max, sum of exp(z - max), target logit or 0, sum of logits)`` of its shard, asks
  the ``gather`` it was given for every shard's ``[c, 4]`` and combines them
  (``lmloss.parallel`` passes its single all-gather).
- :class:`SavedReducer`: statistics kept from an earlier pass (a backward that must
  not communicate again): no collective, only the softmax from the saved log-sum-exp.

With class weights ``u`` (``[V]``, every process holds all of them) the sum of the
logits becomes ``sum(u * z)`` (over the block's columns), and each chunk's
:class:`~lmloss._engine.rowmath.RowClasses` come with its statistics.
"""

from __future__ import annotations

import math as _math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmloss._engine.rowmath import LossMath, RowClasses

__all__ = ["RowStats", "RowRecord", "ClassColumns", "LocalReducer", "ShardReducer", "SavedReducer", "combine_stats"]


@dataclass(frozen=True)
class RowStats:
    """Statistics of ``c`` rows (each ``[c]``).

    ``nll`` is ``lse - z_y``; ``sum_z`` the sum of the (softcapped) logits (weighted
    by the class weights, if any), or None without label smoothing; ``to_softmax`` the factor that turns the chunk buffer's
    rows into the softmax (None: they already are). ``y``/``own``: the targets as
    columns of this chunk's block and whether the block holds them (None: always).
    """

    lse: torch.Tensor
    nll: torch.Tensor
    sum_z: torch.Tensor | None
    y: torch.Tensor
    own: torch.Tensor | None = None
    to_softmax: torch.Tensor | None = None
    classes: RowClasses | None = None


class ClassColumns:
    """``[V]`` class weights (compute dtype) seen from a block of columns ``[start, start + size)``."""

    def __init__(self, weights: torch.Tensor, start: int, size: int) -> None:
        self.weights, self.total = weights, weights.sum()
        self.columns = weights[start : start + size]

    def rows(self, y: torch.Tensor) -> RowClasses:
        """The :class:`RowClasses` of rows with *global* targets ``y`` (any value on a row
        that is not scored: the clamp keeps the gather in range)."""
        return RowClasses(self.weights[y.clamp(0, self.weights.shape[0] - 1)], self.columns, self.total)

    def weighted_sum(self, z: torch.Tensor) -> torch.Tensor:
        """``[c]`` ``sum_j u_j * z_j`` over the block's columns of ``[c, size]`` logits."""
        return z @ self.columns.to(z.dtype)


def _columns(class_weights: torch.Tensor | None, start: int, size: int) -> ClassColumns | None:
    return None if class_weights is None else ClassColumns(class_weights, start, size)


class LocalReducer:
    """Every column of the vocabulary is in the chunk; ``class_weights``: ``[V]`` or None."""

    def __init__(self, vocab_size: int, class_weights: torch.Tensor | None = None) -> None:
        self.vocab_size = vocab_size
        self.classes = _columns(class_weights, 0, vocab_size)

    def row_classes(self, y: torch.Tensor) -> RowClasses | None:
        return None if self.classes is None else self.classes.rows(y)

    def stats_(
        self, z: torch.Tensor, y: torch.Tensor, math: LossMath, index: object, *, first: bool, probs: bool
    ) -> RowStats:
        """``z <- log_softmax(z)`` in place (``softmax(z)`` when ``probs``)."""
        z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
        sum_z = None
        if math.label_smoothing > 0:
            sum_z = z.sum(dim=1) if self.classes is None else self.classes.weighted_sum(z)
        # Row-wise log-softmax reads each row fully before writing it, so out=z is safe.
        torch.ops.aten._log_softmax.out(z, 1, False, out=z)
        log_p_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
        if probs:
            z.exp_()
        return RowStats(z_y - log_p_y, -log_p_y, sum_z, y, classes=self.row_classes(y))


def combine_stats(gathered: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[P, c, 4]`` shard statistics -> global log-sum-exp, target logit, sum of logits (``[c]``, ``dtype``)."""
    peaks = gathered[..., 0]
    peak = peaks.amax(dim=0)
    lse = peak + (gathered[..., 1] * torch.exp(peaks - peak)).sum(dim=0).log()
    return lse.to(dtype), gathered[..., 2].sum(dim=0).to(dtype), gathered[..., 3].sum(dim=0).to(dtype)


class ShardReducer:
    """This process holds columns ``[start, start + size)`` of a ``vocab_size`` vocabulary.

    ``gather(stats, first)`` takes this shard's ``[c, 4]`` statistics and returns every
    shard's, ``[P, c, 4]`` (``first``: the first exchange of the call). ``class_weights``:
    all ``[V]`` of them (the same on every process), or None.
    """

    def __init__(
        self,
        start: int,
        size: int,
        vocab_size: int,
        gather: Callable[[torch.Tensor, bool], torch.Tensor],
        class_weights: torch.Tensor | None = None,
    ) -> None:
        self.start, self.size, self.vocab_size, self.gather = start, size, vocab_size, gather
        self.classes = _columns(class_weights, start, size)

    def row_classes(self, y: torch.Tensor) -> RowClasses | None:
        """Class weights of rows with *global* targets ``y``."""
        return None if self.classes is None else self.classes.rows(y)

    def columns(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets as columns of this shard (0 where the target lives elsewhere) and which are here."""
        own = (y >= self.start) & (y < self.start + self.size)
        return torch.where(own, y - self.start, torch.zeros_like(y)), own

    def local_stats_(self, z: torch.Tensor, y_local: torch.Tensor, own: torch.Tensor, math: LossMath) -> torch.Tensor:
        """``[c, 4]`` (max, sum of exp below the max, target logit, sum of logits) of this shard.

        Overwrites ``z`` with ``exp(z - max)``: the gradient needs exactly that, rescaled.
        """
        rows = z.shape[0]
        if z.shape[1] == 0:  # an empty shard: contributes exp(-inf) = 0 to every sum
            empty = z.new_zeros(rows, 4)
            empty[:, 0] = -_math.inf
            return empty
        target = torch.where(own, z.gather(1, y_local.unsqueeze(1)).squeeze(1), z.new_zeros(()))
        if math.label_smoothing == 0:
            total = z.new_zeros(rows)
        else:
            total = z.sum(dim=1) if self.classes is None else self.classes.weighted_sum(z)
        peak = z.amax(dim=1)
        z.sub_(peak.unsqueeze(1)).exp_()
        return torch.stack([peak, z.sum(dim=1), target, total], dim=1)

    def stats_(
        self, z: torch.Tensor, y: torch.Tensor, math: LossMath, index: object, *, first: bool, probs: bool
    ) -> RowStats:
        """One exchange of the chunk's statistics; ``z <- exp(z - max)`` (softmax up to ``to_softmax``)."""
        y_local, own = self.columns(y)
        stats = self.local_stats_(z, y_local, own, math)
        lse, z_y, sum_z = combine_stats(self.gather(stats, first), z.dtype)
        to_softmax = torch.exp(stats[:, 0].to(lse.dtype) - lse)
        smoothing_sum = sum_z if math.label_smoothing > 0 else None
        return RowStats(lse, lse - z_y, smoothing_sum, y_local, own, to_softmax, self.row_classes(y))


@dataclass
class RowRecord:
    """``[N]`` statistics kept per row for a later pass (log-sum-exp, nll, logit sums)."""

    lse: torch.Tensor
    nll: torch.Tensor
    sum_z: torch.Tensor

    @classmethod
    def zeros(cls, n_rows: int, dtype: torch.dtype, device: torch.device) -> RowRecord:
        return cls(*(torch.zeros(n_rows, dtype=dtype, device=device) for _ in range(3)))

    def store(self, index: torch.Tensor | slice, stats: RowStats) -> None:
        self.lse[index] = stats.lse
        self.nll[index] = stats.nll
        if stats.sum_z is not None:
            self.sum_z[index] = stats.sum_z


class SavedReducer:
    """Statistics from a :class:`RowRecord` (no exchange); ``columns`` maps targets and
    ``row_classes`` gives class weights as the reducer that made the record did."""

    def __init__(
        self,
        record: RowRecord,
        vocab_size: int,
        columns: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        row_classes: Callable[[torch.Tensor], RowClasses | None] | None = None,
    ) -> None:
        self.record, self.vocab_size, self.columns = record, vocab_size, columns
        self.row_classes = row_classes if row_classes is not None else (lambda y: None)

    def stats_(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        math: LossMath,
        index: torch.Tensor | slice,
        *,
        first: bool,
        probs: bool,
    ) -> RowStats:
        lse = self.record.lse[index]
        z.sub_(lse.unsqueeze(1)).exp_()  # the global softmax, from the saved log-sum-exp
        y_local, own = self.columns(y)
        sum_z = self.record.sum_z[index] if math.label_smoothing > 0 else None
        return RowStats(lse, self.record.nll[index], sum_z, y_local, own, classes=self.row_classes(y))
