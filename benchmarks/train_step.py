"""One training step of a transformers model: its own loss vs ``lmloss`` ``apply``.

A Qwen2 model cut to a few layers (default 2, hidden 896: Qwen2-0.5B's width) at the
Qwen2-0.5B vocabulary (151,936, tied embeddings), a batch of ``--batch`` x ``--seq``
tokens whose first quarter of every row is a prompt (ignored targets). One step is
``model(input_ids=..., labels=...).loss.backward()``:

- ``transformers``: the model as it comes (full ``[B, T, V]`` logits, upcast to float32,
  ``F.cross_entropy``);
- ``lmloss``: the same model after ``lmloss.integrations.transformers.apply(model)`` (the
  loss from the hidden states and ``lm_head.weight``, no logits).

Prints one markdown table: time of the step (median of ``--repeats`` runs after a
warm-up; the methods take turns within each repeat, toggling ``apply``/``remove`` on one
model), peak memory of the step above the model and its parameter gradients (CPU: the
peak resident set size of a fresh process per method, reset just before the step;
CUDA: the allocator's peak), and the loss.

    python benchmarks/train_step.py                       # CPU float32, 4 x 512 tokens
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lmloss.bench import peak_rss_bytes
from lmloss.integrations import transformers as lmloss_hf

METHODS = ("transformers", "lmloss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=max(4096, args.seq),
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device=args.device, dtype=DTYPES[args.dtype]).train()


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # the prompt
    return {"input_ids": ids.to(args.device), "labels": labels.to(args.device)}


def step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return float(loss.detach())

    return step


def use(model: torch.nn.Module, method: str) -> None:
    """Put ``model`` in the state ``method`` measures."""
    if (method == "lmloss") != lmloss_hf.is_applied(model):
        (lmloss_hf.apply if method == "lmloss" else lmloss_hf.remove)(model)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(args: argparse.Namespace, methods: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    model, batch = build_model(args), make_batch(args)
    step = step_fn(model, batch)
    times: dict[str, list[float]] = {m: [] for m in methods}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up
        for method in methods:
            use(model, method)
            sync(args.device)
            start = time.perf_counter()
            losses[method] = step()
            sync(args.device)
            if repeat:
                times[method].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}, losses


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_step_bytes(method: str, args: argparse.Namespace) -> int:
    """Peak memory of one step above the model and its parameter gradients."""
    if args.device == "cuda":
        model, batch = build_model(args), make_batch(args)
        use(model, method)
        step = step_fn(model, batch)
        step()  # warm-up: kernels chosen, workspaces allocated, the first-call check done
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - grad_bytes(model)
    cmd = [sys.executable, __file__, "--_memory-child", method] + shape_args(args)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return int(json.loads(out))


def memory_child(method: str, args: argparse.Namespace) -> None:
    model, batch = build_model(args), make_batch(args)
    use(model, method)
    step = step_fn(model, batch)
    base = current_rss_bytes()
    reset_peak_rss()
    step()
    print(json.dumps(max(peak_rss_bytes(), base) - base - grad_bytes(model)))


def current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0), so that a transient peak while
    building the model does not count as the step's. Where that is not allowed, the
    peak since the process started is read instead (an upper bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def shape_args(args: argparse.Namespace) -> list[str]:
    return [
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
        "--intermediate",
        str(args.intermediate),
        "--vocab",
        str(args.vocab),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
    ]


def table(args: argparse.Namespace, seconds, memory, losses) -> str:
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    import transformers

    lines = [
        (
            f"# Qwen2 {args.layers} layers, hidden {args.hidden}, V={args.vocab}, batch {args.batch}x{args.seq}, "
            f"{args.dtype}, {args.device} ({device}), torch {torch.__version__}, transformers "
            f"{transformers.__version__}, median of {args.repeats}"
        ),
        "| method | step fwd+bwd (s) | vs transformers | peak step memory (MiB) | loss |",
        "|---|---:|---:|---:|---:|",
    ]
    base = seconds.get("transformers")
    for method, s in seconds.items():
        ratio = f"{s / base:.2f}x" if base else "-"
        mem = memory.get(method)
        mem_text = "-" if mem is None else f"{mem / 2**20:.0f}"
        lines.append(f"| {method} | {s:.3f} | {ratio} | {mem_text} | {losses[method]:.5f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 CPU, bfloat16 CUDA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.memory_child:
        memory_child(args.memory_child, args)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    # Memory first, each in a fresh process (CPU) or with the allocator empty (CUDA).
    memory = {m: None if args.no_memory else peak_step_bytes(m, args) for m in methods}
    seconds, losses = time_methods(args, methods)
    print(table(args, seconds, memory, losses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
