"""Triton kernels of the fused linear cross-entropy (``lmloss.fused.triton`` launches them).

Three kernels share the per-logit math through small ``@jit`` helpers:

- ``row_loss_grad_kernel`` (speed mode): one program per row of a logits chunk that
  a vendor matrix product already wrote. Sweep 1 reads the row block by block and
  keeps an online max and sum of exponentials (float32), the target logit and the
  sum of the logits; sweep 2 overwrites the row with the gradient of the loss with
  respect to the raw logits. Either sweep can run alone (a row's DFT/focal weight
  is known only after sweep 1, on the host: then two launches).
- ``lowmem_forward_kernel`` / ``lowmem_backward_kernel`` (memory mode): the logits
  exist only as ``[BLOCK_M, BLOCK_V]`` tiles of ``h @ W^T`` in registers. Forward
  writes per-row partial log-sum-exp statistics (one set per vocabulary split);
  backward recomputes each tile, forms its gradient and adds ``dz @ W`` into ``dh``
  and ``dz^T @ h`` into ``dW`` with float32 atomics (as Cut Cross-Entropy does).

No loss formula lives here. The kernels produce row statistics (log-sum-exp ``L``,
target logit or its negative log-likelihood, logit sum), from which the host computes each token's loss with the
engine's row math (``lmloss._engine.rowmath.token_terms``), and they apply the
gradient in the one form that row math's gradient takes (``z`` after the softcap)::

    d loss / dz = (a0 + a1 * L) * softmax(z) - b * onehot(y) - c
    softcap s: z = s * tanh(r / s), dz/dr = 1 - tanh^2 = 4t / (1 + t)^2, t = exp(-2|r|/s)

with per-row coefficients ``(a0, a1, b, c)`` that the host derives from the row math
(``lmloss.fused.triton_launch.grad_coefficients``): label smoothing, z-loss, the upstream
gradient and DFT/focal weights (detached or attached) all live in them. Class weights
``u`` (``CLASS_WEIGHTED``, with label smoothing) are the one per-column part: the logit
sum becomes ``sum(u * z)`` and the last term ``c * u_j``; the target's ``u_y`` and their
sum are per-row numbers, in the coefficients.

Interpreter: with ``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is
imported, these kernels run on CPU tensors under the Triton interpreter (Triton's own
``tl.max``/``tl.sum``/``tl.zeros`` are ``@jit`` functions, interpreted only when the
variable was set at import: the mode is per process). Only Triton 3.6 language
features are used. The interpreter multiplies bf16 operands of ``tl.dot`` as raw bits
(Triton 3.7), so under it ``DOT_IN_FP32`` widens them first: exact, since a product
of two bf16 numbers fits a float32.
"""

# No `from __future__ import annotations` here: Triton reads the tl.constexpr annotations.
import triton
import triton.language as tl

# --- shared per-logit math -------------------------------------------------------------


@triton.jit
def _softcap(r, softcap):
    """``(s * tanh(r / s), d/dr of it)``; tanh from one exp, stable for any ``|r|``."""
    t = tl.exp(-2.0 * tl.abs(r) / softcap)
    magnitude = (1.0 - t) / (1.0 + t)
    capped = softcap * tl.where(r < 0, -magnitude, magnitude)
    derivative = 4.0 * t / ((1.0 + t) * (1.0 + t))
    return capped, derivative


@triton.jit
def _logit_grad(
    z,
    derivative,
    is_target,
    lse,
    scale,
    onehot,
    spread,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """``d(loss)/d(raw logit) = (scale * softmax(z) - onehot * [target] - spread) * dz/dr``.

    ``lse`` and the row coefficients (``scale = a0 + a1 * lse``, ``onehot = b``,
    ``spread = c``) broadcast against ``z``; ``spread`` is 0 without label smoothing.
    """
    dz = scale * tl.exp(z - lse) - tl.where(is_target, onehot, 0.0)
    if HAS_SMOOTHING:
        dz = dz - spread
    if HAS_SOFTCAP:
        dz = dz * derivative
    return dz


@triton.jit
def _online_lse(m, s, z, axis: tl.constexpr):
    """Fold a block ``z`` (masked entries ``-inf``) into the running max ``m`` and sum ``s``.

    A block with no finite entry (a padding tile) leaves ``m``/``s`` unchanged: the
    shift falls back to 0 where the new max is still ``-inf``, so no ``inf - inf``.
    """
    m_new = tl.maximum(m, tl.max(z, axis))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    if axis == 1:
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis)
    else:
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis)
    return m_new, s


# --- speed mode: the loss and gradient of a logits chunk, in place ------------------------


@triton.jit
def _row_logits(z_row, BIAS, cols, mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """float32 logits of one block of a row (masked entries 0), after the bias and softcap,
    and the softcap's derivative (the logits themselves when there is no softcap: unused)."""
    z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    derivative = z
    if HAS_SOFTCAP:
        z, derivative = _softcap(z, softcap)
    return z, derivative


@triton.jit
def row_loss_grad_kernel(
    Z,
    DZ,
    BIAS,
    CLASS_W,
    Y,
    COEF,
    STATS,
    stride_z,
    stride_dz,
    n_rows,
    V,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    CLASS_WEIGHTED: tl.constexpr,
    STATS_PASS: tl.constexpr,
    GRAD_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row of ``Z [c, V]`` (raw logits, bias not yet added).

    ``STATS [3, n_rows]``: with ``STATS_PASS``, sweep 1 writes the row's log-sum-exp,
    target negative log-likelihood and (label smoothing) logit sum (``sum(u * z)`` with
    ``CLASS_WEIGHTED``: ``CLASS_W [V]`` float32) there; without it, sweep 2 reads the
    log-sum-exp from there. With ``GRAD_PASS``, sweep 2 writes ``DZ[row, :]``, the
    gradient of the raw logits with the row's coefficients ``COEF [4, n_rows]``
    (``a0, a1, b, c``: see the module docstring). ``DZ`` may be ``Z`` itself: every
    element is read in sweep 2 before it is overwritten.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    y = tl.load(Y + row)
    if STATS_PASS:
        # Python floats become float32 scalars carried through the loop (as in Liger's kernel).
        m = float("-inf")
        s = 0.0
        target = 0.0
        total = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z, _ = _row_logits(z_row, BIAS, cols, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
            target += tl.sum(tl.where(cols == y, z, 0.0), 0)
            if HAS_SMOOTHING:
                z_sum = tl.where(mask, z, 0.0)
                if CLASS_WEIGHTED:
                    z_sum = z_sum * tl.load(CLASS_W + cols, mask=mask, other=0.0)
                total += tl.sum(z_sum, 0)
            m, s = _online_lse(m, s, tl.where(mask, z, float("-inf")), 0)
        log_s = tl.log(s)
        lse = m + log_s
        tl.store(STATS + row, lse)
        # nll = lse - target, without the rounding of lse: exact 0 + log(s) when the target
        # is the max, so that p = exp(-nll) near 1 keeps its precision (focal weights).
        tl.store(STATS + n_rows + row, (m - target) + log_s)
        if HAS_SMOOTHING:
            tl.store(STATS + 2 * n_rows + row, total)
    else:
        lse = tl.load(STATS + row)
    if GRAD_PASS:
        scale = tl.load(COEF + row) + tl.load(COEF + n_rows + row) * lse
        onehot = tl.load(COEF + 2 * n_rows + row)
        spread = tl.load(COEF + 3 * n_rows + row)
        dz_row = DZ + row * stride_dz
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z, derivative = _row_logits(z_row, BIAS, cols, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
            if CLASS_WEIGHTED:  # the smoothing term of column j is c * u_j
                dz = _logit_grad(
                    z, derivative, cols == y, lse, scale, onehot, spread * tl.load(CLASS_W + cols, mask=mask, other=0.0),
                    HAS_SMOOTHING, HAS_SOFTCAP,
                )  # fmt: skip
            else:
                dz = _logit_grad(z, derivative, cols == y, lse, scale, onehot, spread, HAS_SMOOTHING, HAS_SOFTCAP)
            tl.store(dz_row + cols, dz.to(DZ.dtype.element_ty), mask=mask)


# --- memory mode: logits tiles that never leave the chip ----------------------------------


@triton.jit
def _row_block(ROWS, n_rows, pid_m, HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Compact indices ``[BLOCK_M]`` of this program's rows, their mask, and their rows of ``H``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < n_rows
    if HAS_ROWS:
        rows = tl.load(ROWS + offs_m, mask=row_mask, other=0).to(tl.int64)
    else:
        rows = offs_m.to(tl.int64)
    return offs_m, row_mask, rows


@triton.jit
def _logits_tile(
    H,
    W,
    BIAS,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_V]`` float32 tile of ``H[rows] @ W[cols]^T + BIAS[cols]``."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    w_rows = cols.to(tl.int64) * stride_w  # int64: V * D may pass 2**31
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(H + rows[:, None] * stride_h + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + w_rows[:, None] + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def lowmem_forward_kernel(
    H,
    W,
    BIAS,
    CLASS_W,
    ROWS,
    Y,
    PART_MAX,
    PART_SUM,
    PART_TARGET,
    PART_TOTAL,
    n_rows,
    V,
    D,
    stride_h,
    stride_w,
    softcap,
    blocks_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    CLASS_WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Grid ``(row blocks, splits)``: split ``j`` visits vocabulary blocks ``j, j+S, j+2S, ...``.

    Writes, at ``[j, i]`` for compact row ``i``: the running max and sum of
    ``exp(z - max)`` over the split's columns, the target logit if it lies there
    (else 0), and the sum of the logits (label smoothing; ``sum(u * z)`` with
    ``CLASS_WEIGHTED``). ``Y`` is compact.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_m, row_mask, rows = _row_block(ROWS, n_rows, pid_m, HAS_ROWS, BLOCK_M)
    y = tl.load(Y + offs_m, mask=row_mask, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for i in range(blocks_per_split):
        cols = (i * n_splits + split) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(
            H, W, BIAS, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        if HAS_SOFTCAP:
            z, _ = _softcap(z, softcap)
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        if HAS_SMOOTHING:
            z_sum = tl.where(col_mask[None, :], z, 0.0)
            if CLASS_WEIGHTED:
                z_sum = z_sum * tl.load(CLASS_W + cols, mask=col_mask, other=0.0)[None, :]
            total += tl.sum(z_sum, 1)
        m, s = _online_lse(m, s, tl.where(col_mask[None, :], z, float("-inf")), 1)
    out = split * n_rows + offs_m
    tl.store(PART_MAX + out, m, mask=row_mask)
    tl.store(PART_SUM + out, s, mask=row_mask)
    tl.store(PART_TARGET + out, target, mask=row_mask)
    if HAS_SMOOTHING:
        tl.store(PART_TOTAL + out, total, mask=row_mask)


@triton.jit
def lowmem_backward_kernel(
    H,
    W,
    BIAS,
    CLASS_W,
    ROWS,
    Y,
    COEF,
    LSE,
    DH,
    DW,
    DB,
    n_rows,
    V,
    D,
    stride_h,
    stride_w,
    stride_dh,
    stride_dw,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    CLASS_WEIGHTED: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Grid ``(row blocks, vocabulary blocks)``: recompute one logits tile, form its
    gradient ``dz`` (``COEF [4, n_rows]`` and ``LSE`` per compact row), and add ``dz @ W`` to
    ``DH[rows]``, ``dz^T @ H[rows]`` to ``DW[cols]`` and ``sum(dz)`` to ``DB[cols]``
    (float32 buffers, atomic adds: other programs update the same rows and columns).
    """
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m, row_mask, rows = _row_block(ROWS, n_rows, pid_m, HAS_ROWS, BLOCK_M)
    y = tl.load(Y + offs_m, mask=row_mask, other=-1)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=0.0)
    # Padding rows get zero coefficients.
    a0 = tl.load(COEF + offs_m, mask=row_mask, other=0.0)
    a1 = tl.load(COEF + n_rows + offs_m, mask=row_mask, other=0.0)
    onehot = tl.load(COEF + 2 * n_rows + offs_m, mask=row_mask, other=0.0)
    spread = tl.load(COEF + 3 * n_rows + offs_m, mask=row_mask, other=0.0)
    # A row whose coefficients are all 0 (unscored, under static shapes) contributes
    # nothing: it is treated as padding, so that its hidden state (maybe not finite) and
    # its log-sum-exp are never read into a product.
    row_mask = row_mask & ((a0 != 0) | (a1 != 0) | (onehot != 0) | (spread != 0))
    scale = a0 + a1 * lse
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    z = _logits_tile(
        H, W, BIAS, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
    )  # fmt: skip
    derivative = z  # unused unless HAS_SOFTCAP
    if HAS_SOFTCAP:
        z, derivative = _softcap(z, softcap)
    spreads = spread[:, None]
    if CLASS_WEIGHTED:  # the smoothing term of column j is c * u_j
        spreads = spreads * tl.load(CLASS_W + cols, mask=col_mask, other=0.0)[None, :]
    dz = _logit_grad(
        z, derivative, cols[None, :] == y[:, None], lse[:, None], scale[:, None], onehot[:, None], spreads,
        HAS_SMOOTHING, HAS_SOFTCAP,
    )  # fmt: skip
    # Padding rows and columns (and rows with zero coefficients) contribute exactly nothing.
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if NEED_DB:
        tl.atomic_add(DB + cols, tl.sum(dz, 0), mask=col_mask)
    # The two products take dz in the inputs' dtype (tensor cores for bf16), float32 out.
    dz_in = dz.to(W.dtype.element_ty)
    if DOT_IN_FP32:
        dz_in = dz_in.to(tl.float32)
    w_rows = cols.to(tl.int64) * stride_w  # int64: V * D may pass 2**31
    dw_rows = cols.to(tl.int64) * stride_dw
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        if NEED_DH:
            w = tl.load(W + w_rows[:, None] + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT_IN_FP32:
                w = w.to(tl.float32)
            dh = tl.dot(dz_in, w, input_precision=DOT_PRECISION)
            dh_ptr = DH + rows[:, None] * stride_dh + ds[None, :]
            tl.atomic_add(dh_ptr, dh, mask=row_mask[:, None] & d_mask[None, :])
        if NEED_DW:
            h = tl.load(H + rows[:, None] * stride_h + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT_IN_FP32:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION)
            dw_ptr = DW + dw_rows[:, None] + ds[None, :]
            tl.atomic_add(dw_ptr, dw, mask=col_mask[:, None] & d_mask[None, :])
