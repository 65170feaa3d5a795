"""Token log-probs + entropy from hidden states: lmloss vs the logits path vs TRL, side by side.

Prints one table for ``N`` tokens through an ``lm_head`` of shape ``[V, D]`` (default
the Qwen2-0.5B head, D=896, V=151,936): forward+backward time (median after a
warm-up) and peak memory above the inputs of one step computing the log-probs of
the labels and the entropy, with upstream gradients on both. Rows:

- ``floor``: the three matrix products alone (logits, and the two gradient products);
- ``naive``: ``log_softmax(hidden @ W.T).gather()`` and the entropy from full float32 logits;
- ``lmloss <backend>``: :func:`lmloss.linear_token_logprobs` with each backend this
  build has (``reference`` materializes logits; ``chunked`` does not);
- ``trl``: TRL's fused log-prob head (``trl.kernels.ChunkedLogProbFunction``), if it runs here.

Memory is the peak resident set size of a fresh process per row, on CPU.

    python benchmarks/logprobs.py --tokens 4096 --dim 896 --vocab 151936
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

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_inputs(n: int, d: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.empty(n, d).normal_(generator=g).requires_grad_()
    weight = torch.empty(v, d).normal_(std=0.02, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def methods() -> dict[str, Fn]:
    import lmloss
    from lmloss.logprobs import linear_token_logprobs

    def naive(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(h @ w.T, -1)
        return logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def floor(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = h @ w.T  # backward: the two gradient products
        return z[:, 0], z[:, 1]

    def backend(name: str) -> Fn:
        def run(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = linear_token_logprobs(h, w, y, shift=False, with_entropy=True, backend=name)  # type: ignore[arg-type]
            return out.logprobs, out.entropy  # type: ignore[return-value]

        return run

    rows: dict[str, Fn] = {"floor": floor, "naive": naive, "lmloss reference": backend("reference")}
    try:
        probe = make_inputs(4, 8, 16)
        linear_token_logprobs(*probe, shift=False, backend="chunked")
        rows["lmloss chunked"] = backend("chunked")
    except ValueError:
        pass
    try:
        from trl.kernels import ChunkedLogProbFunction

        def trl(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
            return out[0], out[1]

        rows["trl"] = trl
    except ImportError:
        pass
    del lmloss
    return rows


def measure(name: str, n: int, d: int, v: int, repeats: int) -> dict[str, float]:
    """Runs in a fresh process: peak memory above the inputs of one step, then timings."""
    hidden, weight, labels = make_inputs(n, d, v)
    fn = methods()[name]
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def step() -> None:
        hidden.grad = weight.grad = None
        lp, ent = fn(hidden, weight, labels)
        ((lp * up_lp).sum() + (ent * up_ent).sum()).backward()

    before = peak_rss_bytes()
    step()
    peak_extra = peak_rss_bytes() - before
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return {"peak_extra_mib": peak_extra / 2**20, "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # child process
        print(json.dumps(measure(args.method, args.tokens, args.dim, args.vocab, args.repeats)))
        return
    rows = {}
    for name in methods():
        cmd = [
            sys.executable,
            __file__,
            "--method",
            name,
            "--tokens",
            str(args.tokens),
            "--dim",
            str(args.dim),
            "--vocab",
            str(args.vocab),
            "--repeats",
            str(args.repeats),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        rows[name] = json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr.strip()[-200:]}
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(
        f"# token log-probs + entropy, forward+backward, N={args.tokens}, D={args.dim}, V={args.vocab} "
        f"(float32 logits {logits_mib:.0f} MiB), {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| method | median time (s) | x floor | peak memory above inputs (MiB) | x float32 logits |")
    print("|---|---:|---:|---:|---:|")
    floor_s = rows["floor"].get("median_s")
    for name, row in rows.items():
        if "error" in row:
            print(f"| {name} | failed: {row['error']} | | | |")
            continue
        ratio = row["median_s"] / floor_s if floor_s else float("nan")
        print(
            f"| {name} | {row['median_s']:.2f} | {ratio:.2f} | {row['peak_extra_mib']:.0f} | "
            f"{row['peak_extra_mib'] / logits_mib:.2f} |"
        )


if __name__ == "__main__":
    main()
