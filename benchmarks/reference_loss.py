"""Reference loss on materialized logits: lmloss vs its peers, side by side.

Prints one table: forward+backward time (median after warm-up) and peak extra
memory above the inputs for ``lmloss.causal_lm_loss``, transformers'
``ForCausalLMLoss`` and the naive ``F.cross_entropy(logits.float())``, on the same
bfloat16 logits. The peak includes the gradient of the logits (one ``[tokens,
vocab]`` bf16 tensor) that every method must return: that is the floor row.

CPU memory is read as the peak resident set size of a fresh process per method
(``lmloss.bench.peak_rss_bytes``), so each number is that method's own high-water
mark.

    python benchmarks/reference_loss.py --tokens 4096 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lmloss.bench import peak_rss_bytes

METHODS = ("lmloss", "transformers", "naive_float32")


def make_inputs(tokens: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Filled in place: a float32 temporary would raise the peak before the measured step.
    logits = torch.empty(1, tokens, vocab, dtype=torch.bfloat16).normal_(generator=g)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[:, : tokens // 4] = -100  # a prompt: a quarter of the targets ignored
    return logits.requires_grad_(True), labels


def loss_fn(method: str, vocab: int):
    if method == "lmloss":
        import lmloss

        return lambda logits, labels: lmloss.causal_lm_loss(logits, labels)
    if method == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss

        return lambda logits, labels: ForCausalLMLoss(logits, labels, vocab_size=vocab)
    if method == "naive_float32":

        def naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            z = logits[:, :-1].float().reshape(-1, vocab)
            return F.cross_entropy(z, labels[:, 1:].reshape(-1))

        return naive
    raise ValueError(f"unknown method {method!r}")


def measure(method: str, tokens: int, vocab: int, repeats: int) -> dict[str, float]:
    """Runs in a fresh process: peak extra memory of one step, then timings."""
    logits, labels = make_inputs(tokens, vocab)
    fn = loss_fn(method, vocab)
    before = peak_rss_bytes()
    fn(logits, labels).backward()
    peak_extra = peak_rss_bytes() - before
    times = []
    for i in range(repeats + 1):
        logits.grad = None
        start = time.perf_counter()
        fn(logits, labels).backward()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return {"peak_extra_mib": peak_extra / 2**20, "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # child process
        print(json.dumps(measure(args.method, args.tokens, args.vocab, args.repeats)))
        return
    logits_mib = args.tokens * args.vocab * 2 / 2**20
    rows = {}
    for method in METHODS:
        cmd = [
            sys.executable,
            __file__,
            "--method",
            method,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--repeats",
            str(args.repeats),
        ]
        rows[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(
        f"# reference loss, bf16 logits [{args.tokens}, {args.vocab}] ({logits_mib:.0f} MiB), "
        f"forward+backward, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| method | median time (s) | peak extra memory (MiB) |")
    print("|---|---:|---:|")
    print(f"| floor (the bf16 gradient alone) | | {logits_mib:.0f} |")
    for method, row in rows.items():
        print(f"| {method} | {row['median_s']:.3f} | {row['peak_extra_mib']:.0f} |")


if __name__ == "__main__":
    main()
