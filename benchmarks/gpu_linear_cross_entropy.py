"""Fused linear cross-entropy on a GPU: lmloss's backends and their peers, side by side.

For each shape ``N x D x V`` (tokens x hidden size x vocabulary), on the same bf16
inputs, prints one table row per method:

- time of forward+backward (gradients of hidden and weight), the median of
  ``triton.testing.do_bench`` after warm-up;
- effective TFLOP/s = 6·N·D·V / time (the three matrix products' work);
- peak extra memory: ``torch.cuda.max_memory_allocated`` during one forward+backward
  minus what was allocated before it (the inputs); it includes the gradients every
  method returns (``dh`` and ``dW``);
- loss relative error and the gradients' relative (Frobenius) errors against a
  float32 truth (lmloss's chunked backend on float32 copies of the inputs, TF32 off).

Methods: ``triton`` and ``triton-lowmem`` (lmloss's Triton backends), ``chunked``
(lmloss, pure PyTorch), ``liger`` (``liger_kernel.transformers.fused_linear_cross_entropy``),
``cce`` (``cut_cross_entropy.linear_cross_entropy``), ``torch`` (PyTorch's own
``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions``, 2.13+), ``naive``
(``F.cross_entropy(F.linear(h, W).float(), y)``) and ``floor`` (the three bf16 matrix
products alone: ``z = h W^T``, ``z W``, ``z^T h``). Peers that are not installed are
listed as such.

    python benchmarks/gpu_linear_cross_entropy.py                       # the default shapes
    python benchmarks/gpu_linear_cross_entropy.py --shapes 8192x4096x128256 --methods triton,floor

Needs a CUDA GPU for everything but ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

METHODS = ("triton", "triton-lowmem", "chunked", "liger", "cce", "torch", "naive", "floor")
DEFAULT_SHAPES = "8192x4096x128256,8192x2304x256000"  # Llama-3 8B head; Gemma-2 2B head


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated NxDxV (default {DEFAULT_SHAPES})")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)} (default: all)"
    )
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="input dtype (default bf16)")
    parser.add_argument("--ignore", type=float, default=0.1, help="fraction of ignored targets (default 0.1)")
    parser.add_argument("--warmup", type=int, default=200, help="do_bench warm-up time in ms (default 200)")
    parser.add_argument("--rep", type=int, default=1000, help="do_bench measuring time in ms (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.shape_list = [_shape(s) for s in args.shapes.split(",") if s]
    except ValueError as error:
        parser.error(str(error))
    args.method_list = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.method_list) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return args


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"shape {text!r} is not NxDxV (e.g. 8192x4096x128256)")
    n, d, v = (int(p) for p in parts)
    return n, d, v


# --- the methods: each maps (h, W, y) to a scalar mean loss ------------------------------


def method_fn(name: str) -> Callable[[Any, Any, Any], Any] | str:
    """The loss function of a method, or a string saying why it is unavailable."""
    import torch
    import torch.nn.functional as F

    if name in ("triton", "triton-lowmem", "chunked"):
        return _lmloss(name)
    if name == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return "liger-kernel not installed"
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        return lambda h, w, y: liger(w, h, y)
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            return "cut-cross-entropy not installed"
        return lambda h, w, y: cce(h, w, y, ignore_index=-100, reduction="mean")
    if name == "torch":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"not in torch {torch.__version__}"
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=options)
    if name == "naive":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)
    raise ValueError(name)


def _lmloss(backend: str) -> Callable[[Any, Any, Any], Any]:
    import lmloss
    from lmloss.fused import BACKENDS

    if backend in BACKENDS:  # wired into the public API
        return lambda h, w, y: lmloss.linear_cross_entropy(h, w, y, shift=False, backend=backend)
    from lmloss.fused.triton import triton_linear_cross_entropy

    options = dict(
        shift=False, ignore_index=-100, reduction="mean", num_items_in_batch=None, label_smoothing=0.0,
        z_loss=0.0, softcap=None, token_weights=None, normalize="token",
    )  # fmt: skip
    lowmem = backend == "triton-lowmem"
    return lambda h, w, y: triton_linear_cross_entropy(h, w, None, y, None, lowmem=lowmem, **options)


# --- measuring ---------------------------------------------------------------------------


def make_inputs(n: int, d: int, v: int, dtype: Any, ignore: float, seed: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.02).to(dtype).requires_grad_()  # an init-like head
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < ignore] = -100
    return h, w, y


def truth(h, w, y):
    """float32 loss and gradients (lmloss chunked on float32 copies, true float32 products)."""
    import torch

    import lmloss

    torch.backends.cuda.matmul.allow_tf32 = False
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = lmloss.linear_cross_entropy(h32, w32, y, shift=False, backend="chunked")
    dh, dw = torch.autograd.grad(loss, (h32, w32))
    return loss.detach(), dh, dw


def floor_step(h, w, y):
    """The three matrix products of any fused method, in the inputs' dtype."""
    z = h.detach() @ w.detach().t()
    return z @ w.detach(), z.t() @ h.detach()


def measure(fn, h, w, y, want, args) -> dict:
    import torch
    import triton.testing

    def step():
        return torch.autograd.grad(fn(h, w, y), (h, w))

    run = (lambda: floor_step(h, w, y)) if fn is floor_step else step
    run()  # compile and autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    ms = triton.testing.do_bench(run, warmup=args.warmup, rep=args.rep, return_mode="median")
    row = {"ms": ms, "peak_gib": peak / 2**30}
    if fn is not floor_step:
        loss = fn(h, w, y)
        dh, dw = torch.autograd.grad(loss, (h, w))
        want_loss, want_dh, want_dw = want
        row["loss_err"] = abs(float(loss) - float(want_loss)) / abs(float(want_loss))
        row["dh_err"] = float((dh.float() - want_dh).norm() / want_dh.norm())
        row["dw_err"] = float((dw.float() - want_dw).norm() / want_dw.norm())
    return row


def bench_shape(shape: tuple[int, int, int], args: argparse.Namespace) -> None:
    import torch

    n, d, v = shape
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    h, w, y = make_inputs(n, d, v, dtype, args.ignore, args.seed)
    want = truth(h, w, y)
    torch.cuda.empty_cache()
    flops = 6.0 * n * d * v
    print(f"\n### N={n} D={d} V={v}, {args.dtype}, {args.ignore:.0%} ignored, forward+backward\n")
    print("| method | ms | TFLOP/s eff. | peak extra GiB | loss rel err | dh rel err | dW rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.method_list:
        fn = floor_step if name == "floor" else method_fn(name)
        if isinstance(fn, str):
            print(f"| {name} | n/a: {fn} | | | | | |")
            continue
        try:
            r = measure(fn, h, w, y, want, args)
        except Exception as error:  # one method's failure (OOM, missing feature) must not end the table
            print(f"| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:80]} | | | | | |")
            torch.cuda.empty_cache()
            continue
        errs = " | ".join(f"{r[k]:.1e}" if k in r else "" for k in ("loss_err", "dh_err", "dw_err"))
        print(f"| {name} | {r['ms']:.2f} | {flops / r['ms'] / 1e9:.0f} | {r['peak_gib']:.2f} | {errs} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (only --help runs without one)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    for shape in args.shape_list:
        bench_shape(shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
