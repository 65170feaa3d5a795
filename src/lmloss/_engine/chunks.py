"""The chunk machinery: scored rows, ``[c, V]`` buffers, the chunk loop and gradient accumulation.

For each chunk of ``c`` scored rows the logits ``[c, V]`` are computed into one reused
float32 (float64) buffer; a reducer (:mod:`lmloss._engine.reducer`) turns them into
the row statistics in place; the row math (:mod:`lmloss._engine.rowmath`) gives the
losses and, when a gradient is needed, overwrites the buffer with the gradient of the
logits, which feeds the two other products (``dh = dz @ W``, ``dW += dz^T @ h``).
So a chunk costs the three matrix products plus a few passes over one buffer.

Unscored rows (coefficient 0) are dropped before any product, found by one
``nonzero`` (a host synchronisation on GPU). With ``lmloss.validation(False)`` every
row is computed instead (static shapes) and the unscored rows' hidden states are
zeroed first, so a non-finite hidden state there cannot reach the products.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from lmloss._engine.plan import TargetPlan, compute_dtype, finish, prepare
from lmloss._engine.reducer import RowRecord, RowStats
from lmloss._engine.rowmath import LossMath, logits_grad_, softcap_, token_terms
from lmloss._spec import LossSpec
from lmloss._validation import value_checks_enabled

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
    "CPU_VOCAB_BLOCK",
    "Reducer",
    "Rows",
    "LinearCall",
    "Grads",
    "Buffers",
    "default_chunk_rows",
    "scored_rows",
    "chunk_indices",
    "hidden_chunks",
    "run_chunks",
    "buffer_rows",
    "logits_into",
    "accumulate",
    "autocast_inputs",
    "needs_grad",
]

# Bytes of the [rows, V] chunk buffers that the default chunk size aims for. The
# weight is streamed from memory about four times per chunk (two products read
# it, the third reads and writes its gradient), so small chunks make a CPU run
# memory-bound: on the Qwen2-0.5B head, 110-row chunks (64 MiB) cost 1.5x the
# matrix products, 441-row chunks (256 MiB) 1.2x (BENCHMARKS.md).
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Never fewer rows than this (unless there are fewer tokens): below it the
# products lose most of their speed whatever the memory saved.
MIN_CHUNK_ROWS = 64
# Vocabulary columns per matrix product on CPU (see logits_into).
CPU_VOCAB_BLOCK = 32768


class Reducer(Protocol):
    """What the chunk loop asks for a chunk's row statistics (see :mod:`lmloss._engine.reducer`)."""

    vocab_size: int

    def stats_(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        math: LossMath,
        index: torch.Tensor | slice,
        *,
        first: bool,
        probs: bool,
    ) -> RowStats: ...


@dataclass(frozen=True)
class Rows:
    """A loss on rows: ``[N, D]`` hidden states (rows are positions), the ``[V, D]`` head
    weight and ``[V]`` bias (or None), ``[N]`` targets (any value where ``coef`` is 0) and
    ``[N]`` coefficients (float32/float64; 0: not scored), and ``[V]`` class weights or None.
    The token log-probs, which weigh no row, give a bool ``coef``: the scored rows."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    coef: torch.Tensor
    class_weights: torch.Tensor | None = None

    @classmethod
    def of(cls, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: TargetPlan) -> Rows:
        """The rows of ``[..., T, D]`` hidden states and their target plan."""
        targets, coef = plan.targets.reshape(-1), plan.coef.reshape(-1)
        return cls(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets, coef, plan.class_weights)

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(hidden, weight, bias)``: what gets gradients."""
        return self.hidden, self.weight, self.bias

    def with_coef(self, coef: torch.Tensor) -> Rows:
        """The same rows with other ``[N]`` coefficients (e.g. with the upstream gradient folded in)."""
        return replace(self, coef=coef)


@dataclass(frozen=True)
class LinearCall:
    """One checked call of a loss on hidden states, as a backend receives it:
    ``[..., T, D]`` hidden states, the ``[V, D]`` weight and ``[V]`` bias, ``[..., T]``
    labels, the spec, and the per-call data (token weights, item count, chunk size, class weights)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    spec: LossSpec
    token_weights: object = None
    num_items_in_batch: object = None
    chunk_size: int | None = None
    class_weights: object = None

    def planned(self) -> tuple[Rows, TargetPlan, torch.Tensor | float | None]:
        """The per-call checks and the target plan: the rows to score, the plan, the item count."""
        dtype = compute_dtype(self.hidden.dtype)
        plan, num_items = prepare(
            self.labels,
            self.token_weights,
            self.num_items_in_batch,
            self.weight.shape[0],
            self.spec,
            dtype,
            self.class_weights,
        )
        return Rows.of(self.hidden, self.weight, self.bias, plan), plan, num_items

    def finish(self, result: torch.Tensor, plan: TargetPlan, num_items: torch.Tensor | float | None) -> torch.Tensor:
        """The reduction asked for, of ``[N]`` weighted losses or their sum."""
        return finish(result, plan, self.labels.shape, self.spec, num_items)


def default_chunk_rows(n_rows: int, vocab_size: int, hidden_size: int, itemsize: int, row_bytes: int = 4) -> int:
    """Rows per chunk: ``rows * V * row_bytes`` fits ``DEFAULT_CHUNK_BYTES``, or the
    size of the hidden states themselves when those are larger (the chunk then
    costs no more memory than the input it is computed from).

    ``row_bytes`` is the bytes per logit of all chunk buffers together: 4 for the
    float32 buffer, +2 for a bf16/fp16 copy, +4 for the softcap derivative.
    """
    budget = max(DEFAULT_CHUNK_BYTES, n_rows * hidden_size * itemsize)
    rows = max(MIN_CHUNK_ROWS, budget // (row_bytes * vocab_size))
    return int(max(1, min(n_rows, rows)))


def scored_rows(coef: torch.Tensor) -> torch.Tensor | None:
    """Indices of the scored positions, or None to process every row (static shapes)."""
    if not value_checks_enabled():
        return None
    rows = coef.nonzero().squeeze(1)
    return None if rows.numel() == coef.numel() else rows


def chunk_indices(n_rows: int, rows: torch.Tensor | None, chunk_rows: int) -> list[torch.Tensor | slice]:
    """Row indices of each chunk: slices of every row, or pieces of the scored rows."""
    if rows is None:
        return [slice(s, min(s + chunk_rows, n_rows)) for s in range(0, n_rows, chunk_rows)]
    return list(rows.split(chunk_rows)) if rows.numel() else []  # split() of nothing gives one empty piece


def buffer_rows(n_rows: int, rows: torch.Tensor | None, chunk_rows: int) -> int:
    """Rows of the chunk buffers: a chunk, or fewer when fewer rows are scored (at least 1)."""
    n_scored = n_rows if rows is None else rows.numel()
    return min(chunk_rows, max(n_scored, 1))


def hidden_chunks(
    hidden: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor | None, chunk_rows: int
) -> Iterator[tuple[torch.Tensor | slice, torch.Tensor]]:
    """``(index, hidden[index])`` of each chunk. When every row is computed (static shapes,
    or all scored), the unscored rows (``coef == 0``) come zeroed, so that a non-finite
    hidden state there cannot reach the products (a ``[c, D]`` pass, next to ``[c, V]`` ones)."""
    for index in chunk_indices(hidden.shape[0], rows, chunk_rows):
        h = hidden[index]
        if rows is None:
            h = torch.where((coef[index] != 0).unsqueeze(1), h, torch.zeros_like(h))
        yield index, h


def needs_grad(*tensors: torch.Tensor | None) -> tuple[bool, ...]:
    """Which of ``tensors`` want a gradient in this grad mode."""
    on = torch.is_grad_enabled()
    return tuple(on and t is not None and t.requires_grad for t in tensors)


def autocast_inputs(*tensors: Any) -> tuple[Any, ...]:
    """Under autocast, the products take autocast's dtype, as ``F.linear`` would."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


@dataclass
class Grads:
    """Gradient buffers in float32 or wider (a low-precision gradient is rounded once,
    after the upstream scale, not before)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype | None]
    weight_written: bool = False

    @classmethod
    def allocate(
        cls,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs: tuple[bool, ...],
        *,
        zero_weight: bool = False,
    ) -> Grads:
        """``zero_weight``: fill the weight's buffer now (for code that only adds into it)."""

        def buffer(t: torch.Tensor | None, needed: bool, fill: bool = True) -> torch.Tensor | None:
            if t is None or not needed:
                return None
            make = torch.zeros if fill else torch.empty
            return make(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)

        needs = tuple(needs) + (False,) * (3 - len(needs))
        return cls(
            buffer(hidden, needs[0]),
            # The weight's gradient is as large as the weight: the first chunk writes it
            # (no zero-fill pass over it); zeroed only if no chunk ever does.
            buffer(weight, needs[1], fill=zero_weight),
            buffer(bias, needs[2]),
            (hidden.dtype, weight.dtype, None if bias is None else bias.dtype),
            weight_written=zero_weight,
        )

    def finished(self) -> Grads:
        """Cast the accumulators back to the inputs' dtypes."""
        self._zero_unwritten()
        hidden_dtype, weight_dtype, bias_dtype = self.dtypes
        if self.hidden is not None:
            self.hidden = self.hidden.to(hidden_dtype)
        if self.weight is not None:
            self.weight = self.weight.to(weight_dtype)
        if self.bias is not None and bias_dtype is not None:
            self.bias = self.bias.to(bias_dtype)
        return self

    def _zero_unwritten(self) -> None:
        if self.weight is not None and not self.weight_written:
            self.weight.zero_()  # no scored row: the gradient is exactly zero
            self.weight_written = True

    def scaled_(self, scale: torch.Tensor) -> Grads:
        """Multiply by the upstream scalar in place (no second gradient-sized buffer)."""
        self._zero_unwritten()
        for grad in (self.hidden, self.weight, self.bias):
            if grad is not None:
                grad.mul_(scale.to(grad.dtype))  # float32: the scale is not rounded to bf16
        return self.finished()


class Buffers:
    """The reused ``[c, V]`` buffers: float32 logits/gradient, and an input-dtype one
    for low-precision products (the product's output, then the gradient's copy)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, compute: torch.dtype, device: torch.device):
        self.z = torch.empty(rows, vocab, dtype=compute, device=device)
        self.low = None if dtype == compute else torch.empty(rows, vocab, dtype=dtype, device=device)
        self.cap: torch.Tensor | None = None

    def cap_buffer(self, like: torch.Tensor) -> torch.Tensor:
        if self.cap is None:
            self.cap = torch.empty_like(self.z)
        return self.cap[: like.shape[0]]


def run_chunks(
    rows: Rows,
    scored: torch.Tensor | None,
    math: LossMath,
    chunk_rows: int,
    grads: Grads | None,
    reducer: Reducer,
    record: RowRecord | None = None,
) -> torch.Tensor:
    """Loop over chunks of the scored rows (``scored``: their indices, None for every
    row); returns the ``[N]`` weighted per-position losses (``rows.coef`` * loss).

    With ``grads``, adds each chunk's gradients of ``sum(coef * loss)``; with
    ``record``, keeps each row's statistics. ``rows.class_weights`` is not read: the
    reducer gives the class weights of each chunk.
    """
    (hidden, weight, bias), targets, coef = rows.inputs, rows.targets, rows.coef
    losses = torch.zeros(hidden.shape[0], dtype=coef.dtype, device=hidden.device)
    size = buffer_rows(hidden.shape[0], scored, chunk_rows)
    buffers = Buffers(size, weight.shape[0], weight.dtype, coef.dtype, hidden.device)
    for i, (index, h) in enumerate(hidden_chunks(hidden, coef, scored, chunk_rows)):
        a = coef[index]
        y = torch.where(a != 0, targets[index], torch.zeros_like(targets[index]))  # may hold ignore_index
        losses[index] = _chunk(h, weight, bias, y, a, math, buffers, grads, index, reducer, i == 0, record)
    return losses


def _chunk(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    a: torch.Tensor,
    math: LossMath,
    buffers: Buffers,
    grads: Grads | None,
    index: torch.Tensor | slice,
    reducer: Reducer,
    first: bool,
    record: RowRecord | None,
) -> torch.Tensor:
    """One chunk: ``[c]`` weighted losses; with ``grads``, accumulate this chunk's gradients."""
    z = logits_into(h, weight, bias, buffers)
    derivative = buffers.cap_buffer(z) if math.softcap is not None and grads is not None else None
    cap = softcap_(z, math.softcap, derivative)
    stats = reducer.stats_(z, y, math, index, first=first, probs=grads is not None)
    terms = token_terms(stats.lse, stats.nll, stats.sum_z, math, reducer.vocab_size, stats.classes)
    if record is not None:
        record.store(index, stats)
    if grads is not None:
        logits_grad_(
            z,
            stats.y,
            a,
            stats.lse,
            terms,
            math,
            reducer.vocab_size,
            to_softmax=stats.to_softmax,
            own=stats.own,
            cap=cap,
            classes=stats.classes,
        )
        accumulate(z, h, weight, grads, buffers, index)
    return torch.where(a != 0, terms.loss * a, torch.zeros_like(terms.loss))


def logits_into(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffers: Buffers) -> torch.Tensor:
    """``[c, V]`` logits of the chunk, in the float32 (float64) buffer."""
    z = buffers.z[: h.shape[0]]
    out = z if buffers.low is None else buffers.low[: h.shape[0]]
    # On CPU the BLAS library holds a scratch copy of a product's output: blocks
    # of the vocabulary keep that scratch small instead of a second [c, V] buffer.
    block = CPU_VOCAB_BLOCK if h.device.type == "cpu" else max(weight.shape[0], 1)
    for start in range(0, weight.shape[0], block):
        torch.mm(h, weight[start : start + block].t(), out=out[:, start : start + block])
    if buffers.low is not None:  # low precision: the product in the input dtype, then one upcast
        z.copy_(out)
    if bias is not None:
        z.add_(bias.to(z.dtype))
    return z


def accumulate(
    dz: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    grads: Grads,
    buffers: Buffers,
    index: torch.Tensor | slice,
) -> None:
    """The two products of the backward pass for one chunk, plus the bias gradient."""
    if buffers.low is not None:  # products in the input dtype, as the naive path does
        low = buffers.low[: dz.shape[0]]
        low.copy_(dz)
    else:
        low = dz
    if grads.hidden is not None:
        grads.hidden[index] = torch.mm(low, weight).to(grads.hidden.dtype)
    if grads.weight is not None:
        # float32 accumulation: a low-precision weight's gradient takes the float32 dz.
        left, right = (low, h) if grads.weight.dtype == h.dtype else (dz, h.to(dz.dtype))
        if grads.weight_written:
            grads.weight.addmm_(left.t(), right)
        else:
            torch.mm(left.t(), right, out=grads.weight)
            grads.weight_written = True
    if grads.bias is not None:
        grads.bias += dz.sum(dim=0).to(grads.bias.dtype)
