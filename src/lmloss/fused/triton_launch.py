"""What the Triton backends' host code shares: the kernels (compiled or interpreted),
their block sizes and option flags, and the engine's row math in the kernels' form.

The kernels (``_triton_kernels``) hold no loss formula. They compute row statistics
(log-sum-exp, the target's negative log-likelihood, the logit sum), from which the host
computes each token's loss with the engine's ``token_terms`` (:func:`terms_of_stats`),
and they apply the gradient of the logits as
``(a0 + a1 * L) * softmax - b * onehot - c * u`` with per-row coefficients that
:func:`grad_coefficients` derives from the engine's gradient (``lmloss._engine.rowmath``).
So every option of the row math (label smoothing, z-loss, softcap, DFT and focal weights,
detached or attached, class weights) is computed by the kernels exactly as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import triton

from lmloss._engine.chunks import Rows
from lmloss._engine.plan import target_class_weights
from lmloss._engine.rowmath import LossMath, RowClasses, Terms, token_terms

__all__ = [
    "Tile",
    "Tiles",
    "contiguous_rows",
    "grad_coefficients",
    "interpreting",
    "kernels_for",
    "math_constexprs",
    "row_classes",
    "terms_of_stats",
    "tiles_for",
]


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


def terms_of_stats(
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


def contiguous_rows(rows: Rows) -> Rows:
    """``rows`` as the kernels read them: contiguous hidden states and head, float32 class weights."""
    classes = None if rows.class_weights is None else rows.class_weights.to(torch.float32).contiguous()
    return Rows(rows.hidden.contiguous(), rows.weight.contiguous(), rows.bias, rows.targets, rows.coef, classes)
