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

``"triton-lowmem"`` (Cut Cross-Entropy-style): logits exist only as register tiles.
Forward writes per-row log-sum-exp statistics (``O(tokens)`` memory); backward
recomputes the tiles and accumulates ``dh`` and ``dW`` with float32 atomics. Memory on
top of inputs and gradients: float32 ``dh``/``dW`` accumulators and a few ``[tokens]``
vectors. Backward may run more than once (``retain_graph`` works).

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

One row math. The kernels hold no loss formula: each row's loss is computed on the host
from the kernels' row statistics by the engine's ``token_terms``, and the gradient of
its logits is applied by the kernels in the form ``(a0 + a1*L) * softmax - b * onehot - c``
with per-row coefficients derived from the engine's gradient (:func:`grad_coefficients`),
so every option of the engine's row math (label smoothing, z-loss, softcap, DFT and
focal weights, detached or attached, class weights) is computed here exactly as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any

import torch
import triton

from lmloss._engine.autograd import Job, Run, rows_loss
from lmloss._engine.chunks import (
    Grads,
    LinearCall,
    Rows,
    buffer_rows,
    default_chunk_rows,
    hidden_chunks,
    needs_grad,
    scored_rows,
)
from lmloss._engine.guard import refuse_create_graph
from lmloss._engine.plan import target_class_weights
from lmloss._engine.rowmath import LossMath, RowClasses, Terms, token_terms
from lmloss._spec import SPEC_OPTIONS, LossSpec, Normalize, Reduction
from lmloss.fused.chunked import chunked_linear_cross_entropy

__all__ = [
    "TRITON_BACKENDS",
    "triton_linear_cross_entropy",
    "triton_backend",
    "triton_rows_linear_cross_entropy",
    "lowmem_rows_linear_cross_entropy",
    "interpreting",
    "kernels_for",
    "tiles_for",
    "math_constexprs",
    "grad_coefficients",
    "row_classes",
]

TRITON_BACKENDS: tuple[str, ...] = ("triton", "triton-lowmem")
# The LossSpec options the kernels compute (the others must be off; see _refuse_unsupported).
KERNEL_OPTIONS = (
    "shift", "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "normalize", "token_loss",
    "focal_gamma",
)  # fmt: skip

# aten::mm.dtype / addmm.dtype (bf16 in, float32 out) exist on CUDA from PyTorch 2.8 on.
_HAS_OUT_DTYPE = all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def triton_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int | None,
    *,
    lowmem: bool = False,
    shift: bool,
    ignore_index: int,
    reduction: Reduction,
    num_items_in_batch: torch.Tensor | int | float | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    token_weights: torch.Tensor | None,
    normalize: Normalize,
    **other_options: Any,
) -> torch.Tensor:
    """The ``"triton"`` (``lowmem=False``) or ``"triton-lowmem"`` backend on checked inputs.

    Called by ``lmloss.linear_cross_entropy`` exactly like its chunked backend, after
    it has checked shapes, dtypes and options (and turned autocast off).

    Args:
        hidden: ``[..., T, D]`` hidden states; weight: ``[V, D]``; bias: ``[V]`` or None.
        labels: ``[..., T]`` integer labels.
        chunk_size: tokens per chunk of the speed mode (default from a memory budget);
            the memory mode has no chunks and ignores it.
        lowmem: ``True`` for ``"triton-lowmem"``.
        shift, ignore_index, reduction, num_items_in_batch, label_smoothing, z_loss,
        softcap, token_weights, normalize: as in :func:`lmloss.causal_lm_loss`.
        other_options: ``token_loss``, ``focal_gamma`` and ``class_weights`` (as in
            :func:`lmloss.causal_lm_loss`), and options newer than these backends,
            accepted only at a value that turns them off (False, 0 or None).

    Returns:
        A float32 scalar, or ``[..., T]`` aligned with ``labels`` for ``reduction="none"``
        (float64 for float64 inputs).
    """
    token_loss, focal_gamma = other_options.pop("token_loss", "ce"), other_options.pop("focal_gamma", None)
    class_weights = other_options.pop("class_weights", None)
    spec = LossSpec(
        shift=shift,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        normalize=normalize,
        token_loss=token_loss,
        focal_gamma=focal_gamma,
    )
    _refuse_unsupported(other_options)
    call = LinearCall(hidden, weight, bias, labels, spec, token_weights, num_items_in_batch, chunk_size, class_weights)
    return triton_backend(call, lowmem=lowmem)


def triton_backend(call: LinearCall, *, lowmem: bool) -> torch.Tensor:
    """The backend as ``lmloss.linear_cross_entropy`` calls it: one checked call."""
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


# --- kernels, compiled or interpreted -------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton runs kernels under its interpreter in this process.

    The interpreter is chosen once per process, by ``TRITON_INTERPRET=1`` set before
    ``triton`` is imported: Triton's own library functions (``tl.max``, ``tl.sum``)
    are made interpreted or compiled at that import.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


def kernels_for(device: torch.device) -> ModuleType:
    """The kernel module, after checking that its kernels can run on ``device``."""
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "backend='triton'/'triton-lowmem' runs on CUDA tensors; on CPU only under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is first imported, for tests). Use backend='chunked' on CPU"
        )
    from lmloss.fused import _triton_kernels

    return _triton_kernels


@dataclass(frozen=True)
class Tile:
    """One lowmem kernel's tile ``[block_m rows, block_v columns]``, stepping ``block_d``
    over the hidden size, and its launch options."""

    block_m: int
    block_v: int
    block_d: int
    warps: int
    stages: int

    def constexprs(self, dtype: torch.dtype) -> dict[str, Any]:
        """The kernel's tile arguments for inputs of ``dtype``."""
        return dict(
            BLOCK_M=self.block_m,
            BLOCK_V=self.block_v,
            BLOCK_D=self.block_d,
            # float32 inputs: true float32 products (Triton's default would be TF32, unlike torch).
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            DOT_IN_FP32=interpreting(),  # the interpreter's bf16 tl.dot is wrong (see _triton_kernels)
        )

    def launch(self) -> dict[str, int]:
        return dict(num_warps=self.warps, num_stages=self.stages)


@dataclass(frozen=True)
class Tiles:
    """Block sizes of every kernel.

    ``row_block_v``/``row_warps``: the speed-mode row kernel's vocabulary block.
    ``forward``/``backward``: the memory-mode kernels' tiles.
    """

    row_block_v: int
    row_warps: int
    forward: Tile
    backward: Tile


def tiles_for(vocab: int, interpret: bool) -> Tiles:
    """The block sizes. The interpreter gets small blocks, so that tests on tiny shapes
    still cross block boundaries (several vocabulary and hidden blocks per row).

    GPU: chosen so that ``ptxas`` reports no (forward) or little (backward, 136 bytes)
    register spilling for sm_90 with every option on; not yet timed on hardware.
    """
    if interpret:
        small = Tile(block_m=16, block_v=32, block_d=16, warps=1, stages=1)
        return Tiles(row_block_v=32, row_warps=1, forward=small, backward=small)
    return Tiles(
        row_block_v=min(triton.next_power_of_2(vocab), 16384),  # a 128k-256k row in a few blocks
        row_warps=16,
        forward=Tile(block_m=128, block_v=128, block_d=32, warps=8, stages=3),
        backward=Tile(block_m=128, block_v=128, block_d=32, warps=16, stages=3),
    )


def math_constexprs(math: LossMath, bias: bool, classes: bool = False) -> dict[str, bool]:
    """The option flags every kernel takes (each kernel compiles only what it uses). The
    z-loss, DFT/focal weights and the target's class weight are no flags: they live in
    the gradient's coefficients. ``classes``: class weights are given; the kernels read
    them per column only for the label smoothing term."""
    smoothing = math.label_smoothing > 0
    return dict(HAS_BIAS=bias, HAS_SMOOTHING=smoothing, HAS_SOFTCAP=math.softcap is not None,
                CLASS_WEIGHTED=classes and smoothing)  # fmt: skip


def row_classes(class_weights: torch.Tensor | None, y: torch.Tensor) -> RowClasses | None:
    """The row math's class weights of rows with targets ``y`` (any value on an unscored
    row): ``u_y``, all ``[V]`` columns and their sum; None without class weights."""
    if class_weights is None:
        return None
    return RowClasses(target_class_weights(class_weights, y), class_weights, class_weights.sum())


def _terms_of_stats(
    lse: torch.Tensor,
    nll: torch.Tensor,
    total: torch.Tensor | None,
    vocab: int,
    math: LossMath,
    classes: RowClasses | None,
) -> Terms:
    """The row math's terms from the ``[n]`` log-sum-exps, target negative log-likelihoods
    and logit sums (softcapped; class-weighted with ``classes``)."""
    return token_terms(lse, nll, total if math.label_smoothing > 0 else None, math, vocab, classes)


def grad_coefficients(
    g: torch.Tensor,
    w: torch.Tensor | None,
    k: torch.Tensor | None,
    math: LossMath,
    vocab: int,
    classes: RowClasses | None = None,
) -> torch.Tensor:
    """``[4, n]`` float32 rows ``(a0, a1, b, c)`` of the kernels' logits gradient
    ``d(g * loss)/dz = (a0 + a1 * L) * softmax(z) - b * onehot(y) - c * u`` (then times
    the softcap's derivative; ``u`` the class weights' columns, 1 without them), for
    ``[n]`` gradient factors ``g``.

    This is the engine's gradient (``lmloss._engine.rowmath``, whose docstring derives
    it, and ``logits_grad_``) with its coefficient ``a = g``::

        d loss/dz = a * ((w * ((1-e) u_y + e U / V) + 2c u_y L + k) * s
                         - ((1-e) * w * u_y + k) * onehot(y) - w * e / V * u)

    so ``a0 = g * (w * ((1-e) u_y + e U / V) + k)``, ``a1 = 2 c g u_y`` (the z-loss, whose
    ``L`` the row kernel may know only after its first sweep), ``b = g * ((1-e) w u_y + k)``,
    ``c = g * w * e / V``. ``w`` is the DFT/focal weight (None: 1), ``k`` the attached
    focal loss's term ``gamma * (1-p)^(gamma-1) * p * ce`` from ``d w / dz`` (None: 0),
    both from the row math's ``token_terms``; ``classes`` gives ``u_y`` and ``U = sum(u)``
    (None: ``u = 1``, ``U = V``). A row with ``g = 0`` gets zeros.
    """
    g = g.to(torch.float32)
    e = math.label_smoothing
    gw = g if w is None else g * w
    if classes is None:
        a0, b, gu = gw, (1.0 - e) * gw, g
    else:
        u_y = classes.target.to(torch.float32)
        hard = gw * u_y
        a0, b, gu = (1.0 - e) * hard + gw * (e * classes.total.to(torch.float32) / vocab), (1.0 - e) * hard, g * u_y
    if k is not None:
        gk = g * k
        a0, b = a0 + gk, b + gk
    a1 = 2.0 * math.z_loss * gu
    c = gw * (e / vocab)
    coef = torch.stack((a0, a1, b, c)).to(torch.float32)
    # Exact zeros where g = 0, even where an unscored row's statistics are not finite.
    return torch.where(g != 0, coef, torch.zeros_like(coef)).contiguous()


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
    rows = _contiguous(rows)
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


def _contiguous(rows: Rows) -> Rows:
    classes = None if rows.class_weights is None else rows.class_weights.to(torch.float32).contiguous()
    return Rows(rows.hidden.contiguous(), rows.weight.contiguous(), rows.bias, rows.targets, rows.coef, classes)


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
        terms = _terms_of_stats(stats[0], stats[1], stats[2], vocab, math, classes)
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


# --- memory mode --------------------------------------------------------------------------


def lowmem_rows_linear_cross_entropy(rows: Rows, *, math: LossMath, reduce_sum: bool) -> torch.Tensor:
    """Memory mode on rows: ``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms.

    Arguments as :func:`triton_rows_linear_cross_entropy` (no chunks). The gradients
    are made in backward by recomputing the logits tiles.
    """
    rows = _contiguous(rows)
    needs = needs_grad(*rows.inputs)
    return _LowMem.apply(*rows.inputs, rows.targets, rows.coef, rows.class_weights, math, reduce_sum, needs)


class _LowMem(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        coef: torch.Tensor,
        class_weights: torch.Tensor | None,
        math: LossMath,
        reduce_sum: bool,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        rows = scored_rows(coef)
        y, a = (targets, coef) if rows is None else (targets[rows], coef[rows])
        lse, terms = _lowmem_forward(hidden, weight, bias, rows, y, math, class_weights)
        weighted = torch.where(a != 0, terms.loss * a, torch.zeros_like(terms.loss))
        losses = weighted if rows is None else weighted.new_zeros(hidden.shape[0]).index_copy_(0, rows, weighted)
        ctx.math, ctx.reduce_sum, ctx.needs = math, reduce_sum, needs
        # The DFT/focal weight and its term are the row's, whatever the upstream gradient.
        ctx.save_for_backward(hidden, weight, bias, rows, y, a, lse, terms.w, terms.k, class_weights)
        return losses.sum() if reduce_sum else losses

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        refuse_create_graph("linear_cross_entropy (triton-lowmem)", "use backend='reference'")
        hidden, weight, bias, rows, y, a, lse, w, k, class_weights = ctx.saved_tensors
        grads = Grads.allocate(hidden, weight, bias, ctx.needs, zero_weight=True)
        if any(ctx.needs) and y.numel() > 0:
            upstream = grad_output.to(torch.float32)
            if not ctx.reduce_sum and rows is not None:
                upstream = upstream[rows]
            g = a * upstream  # each scored row's factor of d(loss)
            coef = grad_coefficients(g, w, k, ctx.math, weight.shape[0], row_classes(class_weights, y))
            _lowmem_backward(hidden, weight, bias, rows, y, coef, lse, ctx.math, grads, class_weights)
        grads.finished()
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None


def _lowmem_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    y: torch.Tensor,
    math: LossMath,
    class_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, Terms]:
    """``[n]`` log-sum-exp and the row math's terms (unweighted loss) of the ``n`` rows (compact order)."""
    n, vocab = y.numel(), weight.shape[0]
    tile = tiles_for(vocab, interpreting()).forward
    splits, per_split = _vocab_splits(hidden.device, n, vocab, tile)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        kernels_for(hidden.device).lowmem_forward_kernel[(triton.cdiv(n, tile.block_m), splits)](
            hidden, weight, hidden if bias is None else bias, part if class_weights is None else class_weights,
            y if rows is None else rows, y, part[0], part[1], part[2], part[3],
            n, vocab, hidden.shape[1], hidden.stride(0), weight.stride(0),
            1.0 if math.softcap is None else math.softcap, per_split,
            **math_constexprs(math, bias is not None, class_weights is not None), HAS_ROWS=rows is not None,
            **tile.constexprs(hidden.dtype), **tile.launch(),
        )  # fmt: skip
    # Merge the splits: every split saw at least one column, so each max is finite.
    top = part[0].amax(dim=0)
    log_s = torch.log((part[1] * torch.exp(part[0] - top)).sum(dim=0))
    lse = top + log_s
    # nll = lse - target without lse's rounding: exactly log_s when the target is the max
    # (p = exp(-nll) near 1 keeps its precision, which focal weights depend on).
    nll = (top - part[2].sum(dim=0)) + log_s
    total = part[3].sum(dim=0) if math.label_smoothing > 0 else None
    return lse, _terms_of_stats(lse, nll, total, vocab, math, row_classes(class_weights, y))


def _vocab_splits(device: torch.device, n: int, vocab: int, tile: Tile) -> tuple[int, int]:
    """``(splits, vocabulary blocks per split)``: enough programs to fill the GPU when
    the row blocks alone are few; every split gets at least one block."""
    blocks = triton.cdiv(vocab, tile.block_v)
    if device.type == "cuda" and not interpreting():
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(programs, max(1, triton.cdiv(n, tile.block_m)))
    else:
        splits = 2  # the interpreter (tests): exercise the merge of splits
    splits = max(1, min(splits, blocks))
    return splits, triton.cdiv(blocks, splits)


def _lowmem_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    y: torch.Tensor,
    coef: torch.Tensor,
    lse: torch.Tensor,
    math: LossMath,
    grads: Grads,
    class_weights: torch.Tensor | None,
) -> None:
    """Add the gradients of ``sum(g * loss)`` into ``grads`` (float32, atomically), with the
    ``[4, n]`` coefficients of ``g`` (:func:`grad_coefficients`)."""
    n, vocab = y.numel(), weight.shape[0]
    tile = tiles_for(vocab, interpreting()).backward
    dummy = lse  # any float32 tensor stands in for an absent gradient buffer
    dh, dw, db = grads.hidden, grads.weight, grads.bias
    grid = (triton.cdiv(n, tile.block_m), triton.cdiv(vocab, tile.block_v))
    kernels_for(hidden.device).lowmem_backward_kernel[grid](
        hidden, weight, hidden if bias is None else bias, lse if class_weights is None else class_weights,
        y if rows is None else rows, y, coef, lse,
        dummy if dh is None else dh, dummy if dw is None else dw, dummy if db is None else db,
        n, vocab, hidden.shape[1], hidden.stride(0), weight.stride(0),
        0 if dh is None else dh.stride(0), 0 if dw is None else dw.stride(0),
        1.0 if math.softcap is None else math.softcap,
        **math_constexprs(math, bias is not None, class_weights is not None), HAS_ROWS=rows is not None,
        NEED_DH=dh is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
        **tile.constexprs(hidden.dtype), **tile.launch(),
    )  # fmt: skip
