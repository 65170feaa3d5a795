"""lmloss end to end in one minute on a CPU: chats -> labels -> packed batches ->
fused loss with correct gradient accumulation -> monitor -> plots.

Builds everything locally (nothing is downloaded): a byte-level BPE tokenizer with a
ChatML template trained on the conversations below, and a tiny Qwen2 model from a
config. Then it fine-tunes with assistant-only labels, packing, and 4 micro-batches
per optimizer step whose losses are normalized by the target count of the whole step,
watched by lmloss.monitor (metrics.jsonl and PNG plots in --run-dir).

    python examples/quickstart.py [--steps 60]
"""

from __future__ import annotations

import argparse
import random
import shutil

import torch

import lmloss
from lmloss.batching import PackingCollator
from lmloss.labels import encode_dataset
from lmloss.monitor import ConsoleSink, LossMonitor, plot_run, run_dir_sinks
from lmloss.train.builtin import build_model, build_tokenizer

CAPITALS = {
    "China": "Beijing",
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Egypt": "Cairo",
    "Spain": "Madrid",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Norway": "Oslo",
}


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def conversations() -> list[dict]:
    """Two-turn chats; only the assistant replies are trained."""
    chats = []
    for country, capital in CAPITALS.items():
        for question in (f"Where is the capital of {country}?", f"What is the capital of {country}?"):
            chats.append(
                {
                    "messages": [
                        SYSTEM,
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": f"The capital is {capital}."},
                        {"role": "user", "content": "Thanks!"},
                        {"role": "assistant", "content": "You are welcome."},
                    ]
                }
            )
    return chats


def answer(model, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [SYSTEM, {"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    model.eval()
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train()
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def step_loss(model, batch, num_items_in_batch) -> torch.Tensor:
    """The fused loss: from the last hidden states and the lm_head weight, no logits."""
    # use_cache=False: transformers separates packed samples by position_ids only without a cache.
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return lmloss.linear_cross_entropy(
        hidden.last_hidden_state, model.lm_head.weight, batch["labels"], num_items_in_batch=num_items_in_batch
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--run-dir", default="runs/quickstart", help="metrics.jsonl and plots/ go here")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)

    chats = conversations()
    # A byte-level BPE trained on the chats themselves, with a ChatML template.
    tokenizer = build_tokenizer([m["content"] for c in chats for m in c["messages"]], vocab_size=400)
    examples = encode_dataset(chats, tokenizer, mode="assistant")  # labels: assistant turns + <|im_end|>
    random.shuffle(examples)
    # Held out: each country's other phrasing is still in training, so the eval loss can fall too.
    train, held_out = examples[4:], examples[:4]
    collate = PackingCollator(max_length=128, pad_token_id=tokenizer.pad_token_id)
    model = build_model(len(tokenizer), "tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(
        f"{len(train)} training and {len(held_out)} held-out conversations, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    print(
        f"before: Q: Where is the capital of China?  A: {answer(model, tokenizer, 'Where is the capital of China?')!r}"
    )

    shutil.rmtree(args.run_dir, ignore_errors=True)
    monitor = LossMonitor(sinks=run_dir_sinks(args.run_dir) + [ConsoleSink(total_steps=args.steps)])
    for step in range(1, args.steps + 1):
        random.shuffle(train)
        step_batches = [collate(train[i :: args.micro_batches]) for i in range(args.micro_batches)]
        total = torch.zeros(())
        # Every micro-batch divides its loss sum by the target count of the whole step,
        # so the accumulated gradient is that of one big batch.
        for mb in lmloss.micro_batches(step_batches):
            loss = step_loss(model, mb.batch, mb.num_items_in_batch)
            (loss * mb.loss_scale).backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        monitor.update(step, loss=total, tokens=mb.num_items_in_batch, grad_norm=grad_norm, lr=3e-3)
        if step % 50 == 0:
            with torch.no_grad():
                monitor.update_eval(step, loss=step_loss(model, collate(held_out), None))
    monitor.close()

    print(
        f"after:  Q: Where is the capital of China?  A: {answer(model, tokenizer, 'Where is the capital of China?')!r}"
    )
    plots = plot_run(args.run_dir)
    print(
        f"metrics: {args.run_dir}/metrics.jsonl; plots: {', '.join(p.name for p in plots.paths)} in {plots.paths[0].parent}"
    )


if __name__ == "__main__":
    main()
