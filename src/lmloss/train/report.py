"""What a run leaves for people: sample generations, ``summary.json`` and ``report.md``.

The summary is computed from ``metrics.jsonl`` (which a resumed run continues), so
the first loss of a resumed run is still the first loss of the whole run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmloss._files import atomic_write
from lmloss.monitor.sinks import read_jsonl
from lmloss.train.data import Prompt

__all__ = ["generate_answers", "summarize", "write_report", "write_summary"]


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int, device: torch.device
) -> list[dict[str, str]]:
    """Greedy answers to ``prompts`` (the model is put back in training mode afterwards)."""
    was_training = model.training
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            text = _prompt_text(tokenizer, prompt)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=prompt.messages is None).input_ids.to(device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
            answers.append({"prompt": _question(prompt), "answer": answer, "reference": prompt.reference})
    finally:
        model.train(was_training)
    return answers


def _prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    if prompt.messages is not None:
        return tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    return prompt.text or ""


def _question(prompt: Prompt) -> str:
    if prompt.messages is not None:
        return str(prompt.messages[-1].get("content", ""))
    return prompt.text or ""


# ------------------------------------------------------------------------------ summary


def summarize(run_dir: Path, counters: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The numbers of a run, from its metrics log and the trainer's counters."""
    log = read_jsonl(run_dir / "metrics.jsonl")
    train = [(r["step"], r["train/loss"]) for r in log.records if r.get("split") == "train" and "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in log.records if r.get("split") == "eval" and "eval/loss" in r]
    finite_evals = [loss for _, loss in evals if math.isfinite(loss)]
    seconds = float(counters["train_seconds"])
    return {
        "steps": train[-1][0] if train else 0,
        "first_train_loss": train[0][1] if train else None,
        "last_train_loss": train[-1][1] if train else None,
        "first_eval_loss": evals[0][1] if evals else None,
        "last_eval_loss": evals[-1][1] if evals else None,
        "best_eval_loss": min(finite_evals) if finite_evals else None,
        "eval_losses": [[step, loss] for step, loss in evals],
        "tokens_seen": int(counters["tokens_seen"]),
        "target_tokens_seen": int(counters["target_tokens_seen"]),
        "train_seconds": seconds,
        "tokens_per_second": counters["tokens_seen"] / seconds if seconds > 0 else None,
        "events": [dict(e) for e in events],
    }


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    text = json.dumps(dict(summary), indent=2, ensure_ascii=False) + "\n"
    return atomic_write(run_dir / "summary.json", lambda f: f.write(text), binary=False)


def write_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    setup: Mapping[str, Any],
    samples: Mapping[str, list[dict[str, str]]],
    data_lines: Sequence[str],
    plots: Sequence[Path],
) -> Path:
    """``report.md``: the run in a page: setup, losses, events, answers before/after, plots."""
    lines = [f"# lmloss train: {run_dir.name}", ""]
    stop = summary.get("interrupted")
    if stop:
        lines += [
            (
                f"**Interrupted** by {stop['signal']} after step {stop['step']} of {setup.get('steps', '?')}; "
                f"a checkpoint holds it: continue with `lmloss train --output-dir {run_dir} --resume`."
            ),
            "",
        ]
    lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines += ["", "## Data", ""] + [f"- {line}" for line in data_lines]
    lines += ["", "## Loss", "", "| | first | last | best |", "|---|---|---|---|"]
    lines.append(f"| train loss | {_num(summary['first_train_loss'])} | {_num(summary['last_train_loss'])} | |")
    lines.append(
        f"| eval loss | {_num(summary['first_eval_loss'])} | {_num(summary['last_eval_loss'])} "
        f"| {_num(summary['best_eval_loss'])} |"
    )
    rate = summary["tokens_per_second"]
    lines += [
        "",
        f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens "
        f"({summary['target_tokens_seen']:,} targets) in {summary['train_seconds']:.1f} s of training"
        + (f", {rate:,.0f} tokens/s." if rate else "."),
    ]
    lines += ["", "## Events", ""]
    lines += [f"- step {e['step']}: {e['message']}" for e in summary["events"]] or ["- none"]
    lines += ["", "## Answers (greedy)", "", "| prompt | before | after | reference |", "|---|---|---|---|"]
    before, after = samples.get("before", []), samples.get("after", [])
    for b, a in zip(before, after):
        lines.append(
            f"| {_cell(b['prompt'])} | {_cell(b['answer'])} | {_cell(a['answer'])} | {_cell(a['reference'])} |"
        )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    text = "\n".join(lines) + "\n"
    return atomic_write(run_dir / "report.md", lambda f: f.write(text), binary=False)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:80]
