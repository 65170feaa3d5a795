"""Fused linear cross-entropy on a GPU: lmloss's backends and their peers, and how to measure them.

The methods, each ``(hidden [N, D], weight [V, D], labels [N]) -> mean loss`` on bf16
inputs: ``chunked``, ``triton``, ``triton-lowmem`` (lmloss's backends, through
``lmloss.linear_cross_entropy``); ``liger`` and ``liger-fp32`` (liger-kernel's
``liger_fused_linear_cross_entropy``, its default bf16 and float32 weight-gradient
accumulation); ``cce`` (``cut_cross_entropy.linear_cross_entropy``); ``torch``
(``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions``, PyTorch 2.13+);
``naive`` (bf16 logits, then ``F.cross_entropy`` in float32); ``floor`` (the three
matrix products alone). A method that cannot run here says why instead.

Measured: forward+backward time (median of CUDA-event timings after warm-up),
effective TFLOP/s = 6·N·D·V / time, peak extra memory (``max_memory_allocated``
during one forward+backward minus the inputs and the returned gradients) and the
loss and gradients' relative errors against a truth from materialized logits.

``benchmarks/gpu_check.py`` is the whole prepared check (install, tests, correctness,
these methods, a sweep, one table); this command runs only its side-by-side phase:

    python benchmarks/gpu_linear_cross_entropy.py                       # the default shapes
    python benchmarks/gpu_linear_cross_entropy.py --shapes 8192x4096x128256 --methods triton,floor

Needs a CUDA GPU for everything but ``--help`` (``gpu_check.py --dry-run`` runs on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

IGNORE = -100
LMLOSS_BACKENDS = ("chunked", "triton", "triton-lowmem")
METHODS = ("floor", *LMLOSS_BACKENDS, "liger", "liger-fp32", "cce", "torch", "naive")
DEFAULT_SHAPES = "8192x4096x128256,8192x2304x256000"  # Llama-3 8B head; Gemma-2 2B head


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only, so a method name such as ``triton-lowmem`` stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def error_text(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters), for a table cell."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:160]}"


def make_inputs(shape: tuple[int, int, int], device: Any, ignore: float, seed: int) -> tuple[Any, Any, Any]:
    """bf16 ``hidden [N, D]``, ``weight [V, D]`` (init-like scale) and ``labels [N]``."""
    import torch

    n, d, v = shape
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[torch.rand(n, device=device, generator=g) < ignore] = IGNORE
    return h, w, y


def truth(h: Any, w: Any, y: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """Loss and gradients in ``dtype`` from the materialized logits and ``F.cross_entropy``
    (independent of lmloss); TF32 off so float32 means float32."""
    import torch
    import torch.nn.functional as F

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        hh, ww = (t.detach().to(dtype).requires_grad_() for t in (h, w))
        loss = F.cross_entropy(hh @ ww.t(), y, ignore_index=IGNORE)
        dh, dw = torch.autograd.grad(loss, (hh, ww))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return loss.detach(), dh, dw


def errors(loss: Any, dh: Any, dw: Any, want: tuple[Any, Any, Any]) -> dict:
    """Relative errors: |loss| and Frobenius of each gradient, in float32 (NaN stays NaN)."""
    want_loss, want_dh, want_dw = want

    def rel(a: Any, b: Any) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    loss = loss.detach()
    return {"loss": float(loss), "loss_err": abs(float(loss) - float(want_loss)) / abs(float(want_loss)),
            "dh_err": rel(dh, want_dh), "dw_err": rel(dw, want_dw)}  # fmt: skip


def method_fn(name: str, device: Any, chunk_size: int | None = None) -> Callable[[Any, Any, Any], Any] | str:
    """``(hidden, weight, labels) -> mean loss`` of a method, or why it cannot run here."""
    import torch
    import torch.nn.functional as F

    if name in LMLOSS_BACKENDS or name == "reference":
        import lmloss

        backend: Any = name  # a checked name; lmloss refuses any other with a ValueError
        return lambda h, w, y: lmloss.linear_cross_entropy(h, w, y, shift=False, backend=backend, chunk_size=chunk_size)
    if name == "naive":  # what a model does without a fused loss: bf16 logits, float32 loss
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE)
    if name == "torch":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"skipped: not in torch {torch.__version__} (2.13+)"
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, options=options)
    try:
        if name in ("liger", "liger-fp32"):
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
        else:
            from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as error:
        return f"skipped: not installed ({error_text(error)})"
    # Liger's kernels also run under the Triton interpreter (the dry run checks the call);
    # CCE's do not (Triton 3.7's interpreter fails inside them).
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and name != "cce"
    if device.type != "cuda" and not interpreted:
        return "skipped: needs CUDA"
    if name == "liger":  # its default: weight gradient accumulated in the inputs' dtype
        return lambda h, w, y: liger(h, w, y, ignore_index=IGNORE, reduction="mean")
    if name == "liger-fp32":  # float32 accumulation, as lmloss does
        return lambda h, w, y: liger(h, w, y, ignore_index=IGNORE, reduction="mean", accum_dtype=torch.float32)
    return lambda h, w, y: cce(h, w, y, ignore_index=IGNORE, reduction="mean")


def floor_products(h: Any, w: Any) -> Callable[[], Any]:
    """The three products every fused method does, alone (bf16 in, float32 accumulate):
    ``z = h W^T``, ``dh = g W``, ``dW = g^T h``; ``g`` is ``z`` itself (random data)."""
    hd, wd = h.detach(), w.detach()

    def run() -> Any:
        z = hd @ wd.t()
        return z @ wd, z.t() @ hd

    return run


def measure(fn: Callable[[Any, Any, Any], Any], h: Any, w: Any, y: Any, device: Any, dry_run: bool) -> dict:
    """Forward+backward: time, peak extra memory (minus inputs and returned gradients),
    and the loss and gradients of one call."""
    import torch

    def step() -> Any:
        loss = fn(h, w, y)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))

    result: dict = {}
    if device.type == "cuda":
        t0 = time.perf_counter()
        step()  # compile (and autotune) outside the measurements
        torch.cuda.synchronize()
        result["compile_s"] = round(time.perf_counter() - t0, 3)
        free(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, dh, dw = step()
        torch.cuda.synchronize()
        grads = dh.numel() * dh.element_size() + dw.numel() * dw.element_size()
        result["peak_gib"] = (torch.cuda.max_memory_allocated() - before - grads) / 2**30
        del loss, dh, dw
    result.update(timed(step, device, dry_run))
    return result


def timed(run: Callable[[], Any], device: Any, dry_run: bool) -> dict:
    """Median milliseconds of ``run`` after warm-up: CUDA events on a GPU, wall clock on
    CPU (dry run). ``first_s`` is the first call (compilation included)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - t0
    if dry_run:
        return {"ms": first * 1e3, "first_s": round(first, 3), "reps": 1}
    t0 = time.perf_counter()
    for _ in range(2):  # warm-up
        run()
    sync()
    each = (time.perf_counter() - t0) / 2
    reps = max(3, min(20, int(0.6 / max(each, 1e-4))))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "first_s": round(first, 3), "reps": reps,
            "spread": round((max(times) - min(times)) / statistics.median(times), 3)}  # fmt: skip


def free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated NxDxV (default {DEFAULT_SHAPES})")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--ignore", type=float, default=0.0, help="fraction of ignored targets (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu-check-out)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_check

    forwarded = ["--phases", "install,env,methods", "--shapes", args.shapes, "--methods", args.methods,
                 "--ignore", str(args.ignore)] + (["--out", args.out] if args.out else [])  # fmt: skip
    return gpu_check.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
