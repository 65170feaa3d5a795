"""``lmloss bench``: the loss from hidden states, lmloss beside its peers, in one run.

For one shape (``--head``, ``--tokens``) it prints one markdown table with, for each
implementation on the same inputs:

- forward+backward time: median of ``--repeats`` runs after a warm-up; the methods
  take turns within each repeat, so a noisy neighbour slows them all alike;
- peak extra memory above the inputs and their gradient buffers: on CUDA from the
  allocator's peak; on CPU from the peak resident set size of a fresh process per
  method (so one method's freed memory cannot hide another's peak);
- the loss, to see that they all compute the same thing.

Implementations: ``naive`` (full logits, float32 upcast, ``F.cross_entropy``: what
transformers does), ``torch`` (``torch.nn.functional.linear_cross_entropy`` with its
chunking options, where the installed PyTorch has it), ``lmloss`` (``backend=
"chunked"``), ``lmloss-triton`` and ``lmloss-lowmem`` (the Triton backends, on CUDA),
``liger`` and ``cce`` (Liger Kernel, Cut Cross-Entropy: when installed and on CUDA),
``floor``: the three matrix products alone, and ``floor-scored``: the same over the
rows whose target is not ignored (the least any method that drops ignored rows must
do; the table's last line gives each method's time against it).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # lmloss itself is imported where a method runs, as the other methods' libraries are
    from lmloss._spec import Backend

HEADS = {  # name -> (hidden size D, vocabulary V)
    "qwen2-0.5b": (896, 151_936),
    "llama3-8b": (4096, 128_256),
    "gemma2-2b": (2304, 256_000),
}
METHODS = ("floor", "floor-scored", "naive", "torch", "lmloss", "lmloss-triton", "lmloss-lowmem", "liger", "cce")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, D], requires grad
    weight: torch.Tensor  # [V, D], requires grad
    labels: torch.Tensor  # [N], aligned (no shift), a share ignored

    def grad_bytes(self) -> int:
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()

    def clear(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_inputs(tokens: int, head: str, dtype: torch.dtype, device: str, ignored: float) -> Inputs:
    hidden_size, vocab = HEADS[head]
    g = torch.Generator(device=device).manual_seed(0)
    # Filled in place: no temporary may raise the process's peak memory before the
    # measured step (the CPU memory column is a peak resident set size).
    hidden = torch.empty(tokens, hidden_size, device=device, dtype=dtype).normal_(generator=g)
    # Initialised like an lm_head, so the logits have a realistic spread.
    weight = torch.empty(vocab, hidden_size, device=device, dtype=dtype).normal_(0.0, hidden_size**-0.5, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    labels[torch.rand(tokens, generator=g, device=device) < ignored] = -100
    return Inputs(hidden.requires_grad_(True), weight.requires_grad_(True), labels)


def method_step(method: str, x: Inputs, chunk_size: int | None = None) -> Callable[[], torch.Tensor] | None:
    """A closure doing one forward+backward and returning the loss; None if unavailable."""
    if method == "floor":
        return _floor(x)
    if method == "floor-scored":
        return _floor(x, scored_only=True)
    if method == "naive":
        return lambda: _backward(F.cross_entropy((x.hidden @ x.weight.t()).float(), x.labels))
    if method == "torch":
        options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if options is None or not hasattr(F, "linear_cross_entropy"):
            return None
        return lambda: _backward(F.linear_cross_entropy(x.hidden, x.weight, x.labels, options=options()))
    if method == "lmloss":
        from lmloss.fused import linear_cross_entropy

        return lambda: _backward(
            linear_cross_entropy(x.hidden, x.weight, x.labels, shift=False, backend="chunked", chunk_size=chunk_size)
        )
    if x.hidden.device.type != "cuda":
        return None
    if method in ("lmloss-triton", "lmloss-lowmem"):
        return _triton(method, x, chunk_size)
    return _gpu_peer(method, x)


def _triton(method: str, x: Inputs, chunk_size: int | None) -> Callable[[], torch.Tensor] | None:
    """lmloss's Triton backends (CUDA only; None where triton is not installed)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None
    from lmloss.fused import linear_cross_entropy

    backend: Backend = "triton" if method == "lmloss-triton" else "triton-lowmem"
    return lambda: _backward(
        linear_cross_entropy(x.hidden, x.weight, x.labels, shift=False, backend=backend, chunk_size=chunk_size)
    )


def _gpu_peer(method: str, x: Inputs) -> Callable[[], torch.Tensor] | None:
    try:
        if method == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

            return lambda: _backward(liger(x.hidden, x.weight, x.labels))
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda: _backward(cce(x.hidden, x.weight, x.labels))
    except ImportError:
        return None


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def _floor(x: Inputs, scored_only: bool = False) -> Callable[[], torch.Tensor]:
    """The three products of any exact method: logits, grad of hidden, grad of weight
    (``scored_only``: over the rows whose label is not ignored).

    Their outputs are allocated once, outside the timed step, so the floor is the
    arithmetic alone (no page faults of fresh [N, V] buffers).
    """
    h, w = x.hidden.detach(), x.weight.detach()
    if scored_only:
        h = h[x.labels != -100]
    z = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def step() -> torch.Tensor:
        torch.mm(h, w.t(), out=z)
        torch.mm(z, w, out=dh)
        torch.mm(z.t(), h, out=dw)
        return torch.zeros(())

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(x: Inputs, steps: dict[str, Callable[[], torch.Tensor]], repeats: int, device: str):
    """Median seconds per method, the methods taking turns within each repeat: wall
    time, and this process's CPU time (all threads; steadier on a shared machine,
    where the wall time counts the moments other processes held the cores)."""
    times: dict[str, list[float]] = {m: [] for m in steps}
    cpu: dict[str, list[float]] = {m: [] for m in steps}
    losses: dict[str, float] = {}
    for repeat in range(repeats + 1):
        for method, step in steps.items():
            x.clear()
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = step()
            _sync(device)
            if repeat:  # repeat 0 is the warm-up
                times[method].append(time.perf_counter() - start)
                cpu[method].append(time.process_time() - cpu_start)
            losses[method] = float(loss)
    x.clear()
    median = statistics.median
    return {m: median(t) for m, t in times.items()}, losses, {m: median(t) for m, t in cpu.items()}


def peak_extra_bytes(method: str, args: argparse.Namespace) -> float | None:
    """Peak memory above inputs and gradients of one forward+backward."""
    if args.device == "cuda":
        x = make_inputs(args.tokens, args.head, DTYPES[args.dtype], "cuda", args.ignored)
        step = method_step(method, x, args.chunk_size)
        if step is None:
            return None
        step()  # warm-up: kernels compiled, workspaces allocated
        x.clear()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - x.grad_bytes()
    cmd = [sys.executable, "-m", "lmloss.bench", "--_memory-child", method] + _shape_args(args)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    value = json.loads(out)
    return None if value is None else float(value)


def _memory_child(method: str, args: argparse.Namespace) -> None:
    x = make_inputs(args.tokens, args.head, DTYPES[args.dtype], "cpu", args.ignored)
    step = method_step(method, x, args.chunk_size)
    if step is None:
        print(json.dumps(None))
        return
    before = peak_rss_bytes()
    step()
    print(json.dumps(peak_rss_bytes() - before - x.grad_bytes()))


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's ``VmHWM`` belongs to the process image and starts afresh at ``exec``;
    ``ru_maxrss`` does not (a child inherits its parent's peak at ``fork``), so a
    child of a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _shape_args(args: argparse.Namespace) -> list[str]:
    return [
        "--head",
        args.head,
        "--tokens",
        str(args.tokens),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--ignored",
        str(args.ignored),
    ] + ([] if args.chunk_size is None else ["--chunk-size", str(args.chunk_size)])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head", choices=sorted(HEADS), default="qwen2-0.5b", help="lm_head shape (D, V)")
    parser.add_argument("--tokens", type=int, default=None, help="N (default: 4096 on CPU, 8192 on CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 CPU, bfloat16 CUDA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, after one warm-up")
    parser.add_argument("--ignored", type=float, default=0.0, help="share of ignored targets (-100)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--chunk-size", type=int, default=None, help="lmloss tokens per chunk (default: automatic)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.tokens = args.tokens or (8192 if args.device == "cuda" else 4096)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.memory_child:
        _memory_child(args.memory_child, args)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"lmloss bench: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    # Memory first: each CPU measurement is a fresh process, and the GPU one needs
    # the allocator free of the timing runs' inputs.
    memory = {m: None if args.no_memory or m.startswith("floor") else peak_extra_bytes(m, args) for m in methods}
    x = make_inputs(args.tokens, args.head, DTYPES[args.dtype], args.device, args.ignored)
    steps = {m: s for m in methods if (s := method_step(m, x, args.chunk_size)) is not None}
    skipped = [m for m in methods if m not in steps]
    seconds, losses, cpu = time_methods(x, steps, args.repeats, args.device)
    print(_table(args, seconds, losses, memory, skipped, cpu))
    return 0


def _table(args, seconds, losses, memory, skipped, cpu=None) -> str:
    d, v = HEADS[args.head]
    n = args.tokens
    flops = 6 * n * d * v
    lines = [
        (
            f"# {args.head} head: N={n}, D={d}, V={v}, {args.dtype}, {args.device} "
            f"({_device_name(args.device)}), torch {torch.__version__}, ignored={args.ignored:g}, "
            f"median of {args.repeats}"
        ),
        "| method | fwd+bwd (s) | vs floor | TFLOP/s (6NDV) | peak extra memory (MiB) | loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor = seconds.get("floor")
    for method, s in seconds.items():
        ratio = f"{s / floor:.2f}x" if floor else "-"
        mem = memory.get(method)
        mem_text = "-" if mem is None or method.startswith("floor") else f"{mem / 2**20:.0f}"
        loss = "-" if method.startswith("floor") else f"{losses[method]:.5f}"
        lines.append(f"| {method} | {s:.3f} | {ratio} | {flops / s / 1e12:.1f} | {mem_text} | {loss} |")
    scored = seconds.get("floor-scored")
    if scored:
        against = [f"{m} {s / scored:.2f}x" for m, s in seconds.items() if not m.startswith("floor")]
        lines.append("\nvs floor-scored (the products over the scored rows): " + ", ".join(against))
    if cpu and args.device == "cpu":
        base = "floor-scored" if cpu.get("floor-scored") else "floor"
        text = ", ".join(
            f"{m} {t:.3f} s" + (f" ({t / cpu[base]:.2f}x)" if cpu.get(base) else "") for m, t in cpu.items()
        )
        lines.append(f"\nCPU time (median, all threads; x: vs {base}): {text}")
    if skipped:
        lines.append(f"\nnot available here: {', '.join(skipped)}")
    return "\n".join(lines)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()}, {torch.get_num_threads()} threads"


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="lmloss bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    configure(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
