"""Two loss terms, learned weights and a curriculum, on a tiny local Qwen2 (seconds on a CPU).

* Data: two synthetic sources mixed by a ``MixtureSchedule`` that moves from
  "repeat" rows (k, k, k, ...) to "count" rows (k, k+1, k+2, ...) over the run;
  ``MixtureIterator`` draws the source of every sample from the seed and the step.
* Loss: ``text`` (next-token cross-entropy, ``lmloss.causal_lm_loss``) plus ``kind``
  (a small head on the mean hidden state regresses 0 for repeat rows, 1 for count
  rows), combined by ``UncertaintyWeighting``, with the ``kind`` term ramped in by a
  ``LinearSchedule``.
* Halfway, everything is checkpointed through ``torch.save`` and restored into fresh
  objects, and training goes on from there.

    python examples/multitask.py [--steps 40]
"""

from __future__ import annotations

import argparse
import io

import torch

import lmloss
from lmloss.multitask import (
    CompositeLoss,
    LinearSchedule,
    MixtureIterator,
    MixtureSampler,
    MixtureSchedule,
    UncertaintyWeighting,
)
from lmloss.train.builtin import build_model

VOCAB, LENGTH, BATCH = 64, 12, 8


def sources() -> dict[str, list[list[int]]]:
    return {
        "repeat": [[k] * LENGTH for k in range(16)],
        "count": [[(k + i) % VOCAB for i in range(LENGTH)] for k in range(16)],
    }


def build(steps: int, seed: int):
    """Model, kind head, loss, data stream and optimizer: what a checkpoint restores."""
    torch.manual_seed(seed)
    model = build_model(VOCAB, "tiny", max_positions=LENGTH)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    loss_fn = CompositeLoss(
        {
            "text": lambda batch, out: lmloss.causal_lm_loss(out.logits, batch["input_ids"]),
            "kind": lambda batch, out: torch.nn.functional.mse_loss(
                head(out.hidden_states[-1].mean(dim=1)).squeeze(-1), batch["kind"]
            ),
        },
        weights={"kind": LinearSchedule(0.0, 1.0, 0, steps // 2)},
        weighting=UncertaintyWeighting(["text", "kind"]),
    )
    mix = MixtureSchedule({"repeat": LinearSchedule(1.0, 0.2, 0, steps), "count": LinearSchedule(0.0, 0.8, 0, steps)})
    stream = MixtureIterator(sources(), MixtureSampler(mix, seed=seed), samples_per_step=BATCH)
    # The learned log-variances train with the model: they go into the same optimizer.
    params = [*model.parameters(), *head.parameters(), *loss_fn.parameters()]
    return model, head, loss_fn, stream, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def next_batch(stream: MixtureIterator) -> dict[str, torch.Tensor]:
    rows = [next(stream) for _ in range(BATCH)]
    return {
        "input_ids": torch.tensor([row for _, row in rows]),
        "kind": torch.tensor([1.0 if name == "count" else 0.0 for name, _ in rows]),
    }


def checkpoint(parts) -> bytes:
    model, head, loss_fn, stream, optimizer = parts
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "head": head.state_dict(),
            "loss": loss_fn.state_dict(),
            "data": stream.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        buffer,
    )
    return buffer.getvalue()


def restore(blob: bytes, steps: int, seed: int):
    parts = build(steps, seed + 1)  # a different seed: everything must come from the checkpoint
    state = torch.load(io.BytesIO(blob), weights_only=True)
    for part, key in zip(parts, ("model", "head", "loss", "data", "optimizer")):
        part.load_state_dict(state[key])
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    parts = build(args.steps, args.seed)
    for step in range(args.steps):
        if step == args.steps // 2:
            parts = restore(checkpoint(parts), args.steps, args.seed)
            print(f"step {step}: checkpointed and restored into fresh objects")
        model, _, loss_fn, stream, optimizer = parts
        batch = next_batch(stream)
        outputs = model(input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False)
        result = loss_fn(batch, outputs, step=step)
        result.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            logged = result.log()
            shown = "  ".join(f"{k}={v:.3f}" for k, v in logged.items())
            print(f"step {step:3d}  count-share={batch['kind'].mean().item():.2f}  {shown}")


if __name__ == "__main__":
    main()
