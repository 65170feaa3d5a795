"""Triton backends of ``linear_cross_entropy``: ``"triton"`` (speed) and ``"triton-lowmem"`` (memory).

Both follow the contract of :func:`lmloss.causal_lm_loss` on ``hidden @ weight.T + bias``
and share the target planning of the chunked backend (``plan_targets``: shift,
ignore_index, token weights, sequence normalization folded into one coefficient per
position). They differ in where the ``[tokens, vocab]`` logits live:

``"triton"`` (Liger-style): chunks of tokens; each chunk's logits come from the vendor
matrix product (cuBLAS; on CUDA with bf16/fp16 inputs ``torch.mm(..., out_dtype=float32)``
when this PyTorch has it, so the logits are not rounded), then ONE Triton kernel per
chunk computes every row's statistics (online log-sum-exp in float32, target logit,
logit sum, after the softcap) and, in a second sweep of the row, overwrites the chunk
buffer with the gradient of the logits (in the inputs' dtype, computed in float32). With
a DFT/focal weight the second sweep is a second launch: the weight comes from the
row's statistics, computed on the host between the two. Two more
products give ``dh = dz @ W`` and ``dW += dz^T @ h`` (float32 accumulation). With
``reduction="sum"``/``"mean"`` the gradients are complete after forward and backward
only scales them; with ``"none"`` backward recomputes the chunks with each token's
upstream gradient folded in (Liger #968).

``"triton-lowmem"`` (Cut Cross-Entropy-style, :mod:`lmloss.fused.triton_lowmem`): logits
exist only as register tiles, recomputed in backward; ``O(tokens)`` memory besides the
inputs and float32 gradient accumulators. Backward may run more than once.

Ignored targets. With value checks on (the default) the scored rows are found with
one ``nonzero`` (a host synchronisation on GPU) and only they enter the products:
the speed mode gathers them chunk by chunk, the memory mode reads them through an
index vector. Under ``lmloss.validation(False)`` nothing synchronises: every row is
computed and the unscored ones get a zero coefficient (static shapes, for CUDA graphs
and ``torch.compile``). A device-side compaction (a sort that moves scored rows
first) would avoid the sync but not the work: the number of chunks, and so the size
of the products, would still have to be read on the host, so it buys nothing here.

On CPU tensors the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1``
set before ``triton`` is imported; slow, for tests): otherwise a ``ValueError``.
float64 inputs use the chunked backend (the kernels compute in float32).

One row math. The kernels hold no loss formula: each row's loss comes from the kernels'
row statistics through the engine's ``token_terms``, and the kernels apply the gradient
of its logits with per-row coefficients derived from the engine's gradient, so every
option of the row math is computed exactly as there (:mod:`lmloss.fused.triton_launch`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from lmloss._engine.autograd import Job, Run, rows_loss
from lmloss._engine.chunks import (
    Grads,
    LinearCall,
    Rows,
    buffer_rows,
    default_chunk_rows,
    hidden_chunks,
)
from lmloss._engine.rowmath import LossMath
from lmloss._spec import SPEC_OPTIONS
from lmloss.fused.chunked import chunked_linear_cross_entropy
from lmloss.fused.triton_launch import (
    contiguous_rows,
    grad_coefficients,
    interpreting,
    kernels_for,
    math_constexprs,
    row_classes,
    terms_of_stats,
    tiles_for,
)
from lmloss.fused.triton_lowmem import lowmem_rows_linear_cross_entropy

__all__ = ["TRITON_BACKENDS", "triton_backend", "triton_rows_linear_cross_entropy"]

TRITON_BACKENDS: tuple[str, ...] = ("triton", "triton-lowmem")
# The LossSpec options the kernels compute (the others must be off; see _refuse_unsupported).
KERNEL_OPTIONS = (
    "shift", "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "normalize", "token_loss",
    "focal_gamma",
)  # fmt: skip

# aten::mm.dtype / addmm.dtype (bf16 in, float32 out) exist on CUDA from PyTorch 2.8 on.
_HAS_OUT_DTYPE = all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def triton_backend(call: LinearCall, *, lowmem: bool) -> torch.Tensor:
    """The ``"triton"`` (``lowmem=False``) or ``"triton-lowmem"`` backend, as
    ``lmloss.linear_cross_entropy`` calls it: one call whose shapes, dtypes and options
    it has checked (autocast off). Returns the loss of ``call.spec``'s reduction: a float32
    scalar, or ``[..., T]`` aligned with the labels (float64 for float64 inputs)."""
    # Every spec option the kernels do not compute must be off (a new option is refused
    # here until the kernels learn it, instead of being silently ignored).
    _refuse_unsupported({name: getattr(call.spec, name) for name in SPEC_OPTIONS if name not in KERNEL_OPTIONS})
    if call.hidden.dtype != torch.float64:
        kernels_for(call.hidden.device)  # fail fast where the kernels cannot run
    rows, plan, num_items = call.planned()
    math, reduce_sum = LossMath.from_spec(call.spec), call.spec.reduction != "none"
    if call.hidden.dtype == torch.float64:
        # The kernels compute in float32; float64 (a CPU test dtype) keeps its precision.
        result = chunked_linear_cross_entropy(rows, math=math, reduce_sum=reduce_sum, chunk_rows=call.chunk_size)
    elif lowmem:
        result = lowmem_rows_linear_cross_entropy(rows, math=math, reduce_sum=reduce_sum)
    else:
        result = triton_rows_linear_cross_entropy(rows, math=math, reduce_sum=reduce_sum, chunk_rows=call.chunk_size)
    return call.finish(result, plan, num_items)


def _refuse_unsupported(options: dict[str, Any]) -> None:
    """Options the kernels do not compute yet are refused unless they are off (None, False or 0)."""
    for name, value in options.items():
        if value is not None and value is not False and value != 0:
            raise ValueError(
                f"{name}={value!r} is not supported by the triton backends yet; use backend='chunked' "
                "or backend='reference'"
            )


# --- speed mode ---------------------------------------------------------------------------


def triton_rows_linear_cross_entropy(
    rows: Rows, *, math: LossMath, reduce_sum: bool, chunk_rows: int | None = None
) -> torch.Tensor:
    """Speed mode on rows: ``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms.

    Args:
        rows: float32/bf16/fp16 ``[N, D]`` hidden states, the head, ``[N]`` targets and
            float32 coefficients (``_engine.chunks.Rows``).
        math: the row math's options (label smoothing, z-loss, softcap, DFT/focal weights).
        reduce_sum: the scalar sum, with gradients made during forward.
        chunk_rows: rows per chunk; default from ``default_chunk_rows``.
    """
    rows = contiguous_rows(rows)
    hidden, weight = rows.hidden, rows.weight
    if chunk_rows is None:
        row_bytes = (4 + hidden.element_size()) if _wide_logits(hidden) else hidden.element_size()
        chunk_rows = default_chunk_rows(
            hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.element_size(), row_bytes
        )
    # The products add into the weight's gradient: it is zeroed first.
    job = Job(
        "linear_cross_entropy (triton)",
        "use backend='triton-lowmem'",
        partial(_runner, math, chunk_rows),
        zero_weight=True,
    )
    return rows_loss(rows, job, reduce_sum)


def _wide_logits(hidden: torch.Tensor) -> bool:
    """Whether the chunk's logits are a float32 product of low-precision inputs (CUDA only)."""
    return _HAS_OUT_DTYPE and hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16)


def _runner(math: LossMath, chunk_rows: int, rows: Rows, scored: torch.Tensor | None) -> Run:
    """``run(g, grads)``: the losses weighted by ``coef``, the gradients of ``sum(g * loss)``."""
    return lambda g, grads: _run_chunks(rows, g, scored, math, chunk_rows, grads)


def _run_chunks(
    rows: Rows, g: torch.Tensor, scored: torch.Tensor | None, math: LossMath, chunk_rows: int, grads: Grads | None
) -> torch.Tensor:
    """``[N]`` weighted losses (``coef`` * loss); with ``grads``, add each chunk's gradients
    of ``sum(g * loss)``."""
    hidden, weight, bias = rows.inputs
    n_rows = hidden.shape[0]
    losses = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    chunk = _Chunk(
        buffer_rows(n_rows, scored, chunk_rows), weight, grads is not None, _wide_logits(hidden), rows.class_weights
    )
    # Static shapes: the unscored rows' hidden states come zeroed (a NaN there must not reach dW).
    for index, h in hidden_chunks(hidden, g, scored, chunk_rows):
        a = rows.coef[index]
        loss = chunk.run(h, weight, bias, rows.targets[index], g[index], math, grads, index)
        losses[index] = torch.where(a != 0, loss * a, torch.zeros_like(loss))
    return losses


class _Chunk:
    """The reused ``[c, V]`` buffers of a chunk and the work done on one chunk.

    ``z`` holds the logits (float32 when the product can write float32, else the
    inputs' dtype); ``dz`` the gradient in the inputs' dtype, the same buffer as ``z``
    unless ``z`` is the wider float32 one. ``class_weights``: float32 ``[V]`` or None.
    """

    def __init__(
        self, rows: int, weight: torch.Tensor, with_grad: bool, wide: bool, class_weights: torch.Tensor | None
    ):
        vocab, dtype, device = weight.shape[0], weight.dtype, weight.device
        self.class_weights = class_weights
        self.z = torch.empty(rows, vocab, dtype=torch.float32 if wide else dtype, device=device)
        self.dz = torch.empty(rows, vocab, dtype=dtype, device=device) if wide and with_grad else self.z
        self.wide = wide
        self.kernels = kernels_for(device)
        self.tiles = tiles_for(vocab, interpreting())

    def run(
        self,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        y: torch.Tensor,
        g: torch.Tensor,
        math: LossMath,
        grads: Grads | None,
        index: torch.Tensor | slice,
    ) -> torch.Tensor:
        """Unweighted ``[c]`` losses of the chunk; with ``grads``, accumulate its gradients
        of ``sum(g * loss)``.

        Plain cross-entropy: one launch, both sweeps (the coefficients are known before
        it). With a DFT/focal weight: a statistics launch, the weights from the row
        math on the host, then a gradient launch (one more read of the chunk).
        """
        c, vocab = h.shape[0], weight.shape[0]
        z, dz = self.z[:c], self.dz[:c]
        if self.wide:
            torch.mm(h, weight.t(), out_dtype=torch.float32, out=z)
        else:
            torch.mm(h, weight.t(), out=z)
        stats = torch.empty(3, c, dtype=torch.float32, device=h.device)
        classes = row_classes(self.class_weights, y)
        fused = grads is not None and not math.weighted
        coef = grad_coefficients(g, None, None, math, vocab, classes) if fused else stats
        self._launch(z, dz, bias, y, coef, stats, math, stats_pass=True, grad_pass=fused)
        terms = terms_of_stats(stats[0], stats[1], stats[2], vocab, math, classes)
        if grads is not None and not fused:
            coef = grad_coefficients(g, terms.w, terms.k, math, vocab, classes)
            self._launch(z, dz, bias, y, coef, stats, math, stats_pass=False, grad_pass=True)
        if grads is not None:
            _accumulate(dz, h, weight, grads, index, self.wide)
        return terms.loss

    def _launch(
        self,
        z: torch.Tensor,
        dz: torch.Tensor,
        bias: torch.Tensor | None,
        y: torch.Tensor,
        coef: torch.Tensor,
        stats: torch.Tensor,
        math: LossMath,
        *,
        stats_pass: bool,
        grad_pass: bool,
    ) -> None:
        """One row kernel launch over the chunk's ``[c, V]`` logits ``z`` (see ``row_loss_grad_kernel``)."""
        c, vocab = z.shape
        classes = self.class_weights
        self.kernels.row_loss_grad_kernel[(c,)](
            z, dz, z if bias is None else bias, stats if classes is None else classes, y, coef, stats,
            z.stride(0), dz.stride(0), c, vocab, 1.0 if math.softcap is None else math.softcap,
            **math_constexprs(math, bias is not None, classes is not None), STATS_PASS=stats_pass, GRAD_PASS=grad_pass,
            BLOCK_V=self.tiles.row_block_v, num_warps=self.tiles.row_warps,
        )  # fmt: skip


def _accumulate(
    dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grads: Grads, index: torch.Tensor | slice, wide: bool
) -> None:
    """``dh[index] = dz @ W``, ``dW += dz^T @ h``, ``db += sum(dz)``, all accumulated in float32."""
    if grads.hidden is not None:
        if wide:
            grads.hidden[index] = torch.mm(dz, weight, out_dtype=torch.float32)
        else:
            grads.hidden[index] = torch.mm(dz, weight).to(torch.float32)
    if grads.weight is not None:
        if wide:  # bf16 operands, float32 accumulator: cuBLAS adds into it directly
            torch.addmm(grads.weight, dz.t(), h, out_dtype=torch.float32, out=grads.weight)
        elif dz.dtype == torch.float32:
            grads.weight.addmm_(dz.t(), h)
        else:  # low precision without a float32-output product: widen the operands
            grads.weight.addmm_(dz.t().to(torch.float32), h.to(torch.float32))
    if grads.bias is not None:
        grads.bias += dz.sum(dim=0, dtype=torch.float32)
