"""Pure PyTorch fused linear cross-entropy: chunks of tokens, never ``[N, V]`` logits.

For each chunk of ``c`` tokens the logits ``[c, V]`` are computed into one reused
float32 buffer, turned into log-probabilities in place, and, when a gradient is
needed, overwritten in place by the gradient of the loss with respect to the
logits. That gradient then feeds the two other matrix products (``dh = dz @ W`` and
``dW += dz^T @ h``) and the buffer moves on to the next chunk. So the whole
forward+backward costs the three matrix products plus a few passes over one chunk,
and the memory on top of the inputs and their gradients is one ``[c, V]`` buffer.

With ``reduction="sum"``/``"mean"`` the gradients are complete after the forward
pass (the loss is linear in them), and backward only scales them by the upstream
scalar, in place. With ``reduction="none"`` every token has its own upstream
gradient, so backward recomputes the chunks with those folded in before the
products (Liger #968 is what goes wrong otherwise).

Ignored targets (coefficient 0) are dropped before any product: their rows cost
nothing. Finding them is one ``nonzero`` (a host synchronisation on GPU); with
``lmloss.validation(False)`` they are masked instead, so shapes stay static.

Per-token math on logits ``z`` (after the softcap), target ``y``, log-sum-exp
``L``, smoothing ``e``, z-loss ``c``, the token's coefficient ``a``, and its
DFT/focal weight ``w`` (1 for plain cross-entropy):

    ce = (1-e) * (L - z_y) + e * (L - mean(z))
    loss = a * (w * ce + c * L^2)
    dloss/dz = a * ((w + 2cL + k) * softmax(z) - ((1-e) * w + k) * onehot(y) - w * e / V)
    softcap s: z = s * tanh(r / s), so dz/dr = 1 - (z / s)^2

The weight comes from the target log-probability ``log p_y`` that the in-place
log-softmax already yields (no extra pass over the vocabulary): DFT ``w = p_y``,
focal ``w = (1 - p_y)^gamma``, both detached (``k = 0``). For the attached focal
loss, ``dw/dz = gamma (1-p_y)^(gamma-1) p_y (softmax(z) - onehot(y))``, which adds
``k = gamma (1-p_y)^(gamma-1) p_y ce`` to both terms.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass

import torch

from lmloss._validation import value_checks_enabled

__all__ = ["chunked_linear_cross_entropy", "default_chunk_rows"]

# Bytes of the [rows, V] chunk buffers that the default chunk size aims for. The
# weight is streamed from memory about four times per chunk (two products read
# it, the third reads and writes its gradient), so small chunks make a CPU run
# memory-bound: on the Qwen2-0.5B head, 110-row chunks (64 MiB) cost 1.5x the
# matrix products, 441-row chunks (256 MiB) 1.2x (BENCHMARKS.md).
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Never fewer rows than this (unless there are fewer tokens): below it the
# products lose most of their speed whatever the memory saved.
MIN_CHUNK_ROWS = 64
# Vocabulary columns per matrix product on CPU (see _logits_into).
CPU_VOCAB_BLOCK = 32768


@dataclass(frozen=True)
class LossMath:
    """The per-token options, as plain Python floats."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    token_loss: str = "ce"  # "ce", "dft", "focal" or "focal_attached"
    focal_gamma: float = 0.0


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


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coef: torch.Tensor,
    *,
    math: LossMath,
    reduce_sum: bool,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms themselves.

    Args:
        hidden: ``[N, D]`` hidden states (rows are positions).
        weight: ``[V, D]`` the ``lm_head`` weight; bias: ``[V]`` or None.
        targets: ``[N]`` target ids; any value where ``coef`` is 0.
        coef: ``[N]`` float32/float64 factor of each position's loss (0: not scored).
        math: label smoothing, z-loss, softcap.
        reduce_sum: return the scalar sum (gradients computed during forward)
            instead of the ``[N]`` per-position terms (gradients recomputed in backward).
        chunk_rows: tokens per chunk; default from ``default_chunk_rows``.
    """
    if chunk_rows is None:
        row_bytes = 4 * (2 if coef.dtype == torch.float64 else 1)
        row_bytes += hidden.element_size() if hidden.element_size() < 4 else 0
        row_bytes += 4 if math.softcap is not None else 0
        chunk_rows = default_chunk_rows(
            hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.element_size(), row_bytes
        )
    needs = (
        torch.is_grad_enabled() and hidden.requires_grad,
        torch.is_grad_enabled() and weight.requires_grad,
        torch.is_grad_enabled() and bias is not None and bias.requires_grad,
    )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, coef, math, reduce_sum, chunk_rows, needs)


def remember_weight(ctx: Any, weight: torch.Tensor) -> None:
    """For :func:`check_forward_gradients`: the gradients are already made in forward, so a
    weight changed in place before backward (e.g. ``optimizer.step()`` too early) would get
    stale ones. The weight is a live parameter: watching its version counter costs nothing."""
    ctx.consumed, ctx.weight, ctx.weight_version = False, weight, weight._version


def check_forward_gradients(ctx: Any, what: str, retain_hint: str) -> None:
    """In the backward of a loss whose gradients were made in forward: refuse a second
    backward (they were consumed) and a weight modified in place since forward."""
    if ctx.consumed:
        raise RuntimeError(
            f"lmloss {what}: backward was called twice; its gradients are computed in forward and consumed "
            f"by the first backward, so retain_graph is not supported ({retain_hint})"
        )
    ctx.consumed = True
    if ctx.weight._version != ctx.weight_version:
        raise RuntimeError(
            f"lmloss {what}: the weight was modified in place between forward and backward; its gradients "
            f"were computed in forward and would be stale"
        )


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        coef: torch.Tensor,
        math: LossMath,
        reduce_sum: bool,
        chunk_rows: int,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        rows = _scored_rows(coef)
        ctx.math, ctx.reduce_sum, ctx.chunk_rows, ctx.needs = math, reduce_sum, chunk_rows, needs
        if reduce_sum:
            # No gradient wanted (evaluation, frozen head and inputs): the loss alone.
            grads = _Grads.allocate(hidden, weight, bias, needs) if any(needs) else None
            losses = _run(hidden, weight, bias, targets, coef, rows, math, chunk_rows, grads)
            ctx.grads = grads
            remember_weight(ctx, weight)
            return losses.sum()
        losses = _run(hidden, weight, bias, targets, coef, rows, math, chunk_rows, None)
        ctx.save_for_backward(hidden, weight, bias, targets, coef, rows)
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.reduce_sum:
            check_forward_gradients(ctx, "linear_cross_entropy", "use backend='reference'")
            # Drop ctx's reference: AccumulateGrad then adopts the buffers instead of copying them.
            grads, ctx.grads = ctx.grads.scaled_(grad_output), None
        else:
            hidden, weight, bias, targets, coef, rows = ctx.saved_tensors
            grads = _Grads.allocate(hidden, weight, bias, ctx.needs)
            # Fold each token's upstream gradient into its coefficient before the products.
            upstream = coef * grad_output.to(coef.dtype)
            with torch.autocast(hidden.device.type, enabled=False):  # the recompute matches forward
                _run(hidden, weight, bias, targets, upstream, rows, ctx.math, ctx.chunk_rows, grads)
            grads = grads.finished()
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None


@dataclass
class _Grads:
    """Gradient buffers in float32 or wider (a low-precision gradient is rounded once,
    after the upstream scale, not before)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype | None]

    @classmethod
    def allocate(
        cls, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple[bool, bool, bool]
    ) -> _Grads:
        def buffer(t: torch.Tensor | None, needed: bool, fill: bool = True) -> torch.Tensor | None:
            if t is None or not needed:
                return None
            make = torch.zeros if fill else torch.empty
            return make(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)

        return cls(
            buffer(hidden, needs[0]),
            # The weight's gradient is as large as the weight: the first chunk writes it
            # (no zero-fill pass over it); zeroed only if no chunk ever does.
            buffer(weight, needs[1], fill=False),
            buffer(bias, needs[2]),
            (hidden.dtype, weight.dtype, None if bias is None else bias.dtype),
        )

    weight_written: bool = False

    def finished(self) -> _Grads:
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

    def scaled_(self, scale: torch.Tensor) -> _Grads:
        """Multiply by the upstream scalar in place (no second gradient-sized buffer)."""
        self._zero_unwritten()
        for grad in (self.hidden, self.weight, self.bias):
            if grad is not None:
                grad.mul_(scale.to(grad.dtype))  # float32: the scale is not rounded to bf16
        return self.finished()


def _scored_rows(coef: torch.Tensor) -> torch.Tensor | None:
    """Indices of the scored positions, or None to process every row (static shapes)."""
    if not value_checks_enabled():
        return None
    rows = coef.nonzero().squeeze(1)
    return None if rows.numel() == coef.numel() else rows


def _run(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coef: torch.Tensor,
    rows: torch.Tensor | None,
    math: LossMath,
    chunk_rows: int,
    grads: _Grads | None,
) -> torch.Tensor:
    """Loop over chunks of scored rows; returns the ``[N]`` weighted per-position losses."""
    n_scored = hidden.shape[0] if rows is None else rows.numel()
    losses = torch.zeros(hidden.shape[0], dtype=coef.dtype, device=hidden.device)
    buffers = _Buffers(min(chunk_rows, max(n_scored, 1)), weight.shape[0], weight.dtype, coef.dtype, hidden.device)
    for start in range(0, n_scored, chunk_rows):
        if rows is None:
            index: torch.Tensor | slice = slice(start, min(start + chunk_rows, n_scored))
        else:
            index = rows[start : start + chunk_rows]
        chunk_loss = _chunk(hidden[index], weight, bias, targets[index], coef[index], math, buffers, grads, index)
        losses[index] = chunk_loss
    return losses


class _Buffers:
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


def _chunk(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    a: torch.Tensor,
    math: LossMath,
    buffers: _Buffers,
    grads: _Grads | None,
    index: torch.Tensor | slice,
) -> torch.Tensor:
    """One chunk: ``[c]`` weighted losses; with ``grads``, accumulate this chunk's gradients."""
    z = _logits_into(h, weight, bias, buffers)
    y = torch.where(a != 0, y, torch.zeros_like(y))  # unscored rows (static mode) may hold ignore_index
    cap = _softcap_(z, math.softcap, buffers) if math.softcap is not None and grads is not None else None
    if math.softcap is not None and cap is None:
        z.div_(math.softcap).tanh_().mul_(math.softcap)
    loss, lse, w, k = _log_softmax_(z, y, math)
    if grads is not None:
        _gradient_(z, y, a, lse, math, cap, w, k)
        _accumulate(z, h, weight, grads, buffers, index)
    return torch.where(a != 0, loss * a, torch.zeros_like(loss))


def _logits_into(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffers: _Buffers) -> torch.Tensor:
    """``[c, V]`` logits of the chunk, in the float32 (float64) buffer."""
    z = buffers.z[: h.shape[0]]
    out = z if buffers.low is None else buffers.low[: h.shape[0]]
    # On CPU the BLAS library holds a scratch copy of a product's output: blocks
    # of the vocabulary keep that scratch small instead of a second [c, V] buffer.
    block = CPU_VOCAB_BLOCK if h.device.type == "cpu" else weight.shape[0]
    for start in range(0, weight.shape[0], block):
        torch.mm(h, weight[start : start + block].t(), out=out[:, start : start + block])
    if buffers.low is not None:  # low precision: the product in the input dtype, then one upcast
        z.copy_(out)
    if bias is not None:
        z.add_(bias.to(z.dtype))
    return z


def _softcap_(z: torch.Tensor, softcap: float, buffers: _Buffers) -> torch.Tensor:
    """``z <- s * tanh(z / s)`` in place; returns ``1 - (z/s)^2``, its derivative."""
    z.div_(softcap).tanh_()
    derivative = torch.mul(z, z, out=buffers.cap_buffer(z)).neg_().add_(1.0)
    z.mul_(softcap)
    return derivative


def _log_softmax_(
    z: torch.Tensor, y: torch.Tensor, math: LossMath
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``z <- log_softmax(z)`` in place.

    Returns the ``[c]`` losses before the coefficient ``a``, the log-sum-exp, and the
    DFT/focal weight ``w`` and gradient term ``k`` (None when not used).
    """
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    mean_z = z.mean(dim=1) if math.label_smoothing > 0 else None
    # Row-wise log-softmax reads each row fully before writing it, so out=z is safe.
    torch.ops.aten._log_softmax.out(z, 1, False, out=z)
    log_p_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    lse = z_y - log_p_y
    loss = -log_p_y
    if mean_z is not None:
        loss = (1.0 - math.label_smoothing) * loss + math.label_smoothing * (lse - mean_z)
    w, k = _token_weight(log_p_y, loss, math)
    if w is not None:
        loss = loss * w
    if math.z_loss > 0:
        loss = loss + math.z_loss * lse.square()  # not weighted by w (see causal_lm_loss)
    return loss, lse, w, k


def _token_weight(
    log_p_y: torch.Tensor, ce: torch.Tensor, math: LossMath
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """DFT/focal weight ``w`` of each row and, for the attached focal loss, ``k``."""
    if math.token_loss == "ce":
        return None, None
    p = log_p_y.exp()
    if math.token_loss == "dft":
        return p, None
    q = torch.clamp(-torch.expm1(log_p_y), min=0.0)  # 1 - p, precise near p = 1
    if math.focal_gamma == 0:
        return torch.ones_like(q), None
    w = q.pow(math.focal_gamma)
    if math.token_loss != "focal_attached":
        return w, None
    # dw/dp is infinite at p = 1 for gamma < 1; the reference takes the limit 0 there.
    k = math.focal_gamma * q.pow(math.focal_gamma - 1.0) * p * ce
    return w, torch.where(q > 0, k, torch.zeros_like(k))


def _gradient_(
    z: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    lse: torch.Tensor,
    math: LossMath,
    cap: torch.Tensor | None,
    w: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
) -> None:
    """``z`` (log-probabilities) <- d(sum of a * loss)/d(raw logits), in place.

    ``w`` is the (detached) DFT/focal weight of each row, folded in here so that the
    products that follow carry it; ``k`` the attached focal loss's extra term.
    """
    z.exp_()
    aw = a if w is None else a * w
    row_scale = aw + 2.0 * math.z_loss * a * lse if math.z_loss > 0 else aw
    onehot = (1.0 - math.label_smoothing) * aw
    if k is not None:
        row_scale, onehot = row_scale + a * k, onehot + a * k
    z.mul_(row_scale.unsqueeze(1))
    if math.label_smoothing > 0:
        z.sub_((aw * (math.label_smoothing / z.shape[1])).unsqueeze(1))
    z.scatter_add_(1, y.unsqueeze(1), (-onehot).unsqueeze(1).to(z.dtype))
    if cap is not None:
        z.mul_(cap)


def _accumulate(
    dz: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    grads: _Grads,
    buffers: _Buffers,
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
