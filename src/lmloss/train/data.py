"""Data of ``lmloss train``: JSONL files (or the built-in set) -> labelled examples -> epochs of micro-batches.

Every sample keeps where it came from (``file:line``), so that an error, a skipped
sample or a truncated answer is reported with its line number. The order of an epoch
is a pure function of ``(seed, epoch)``: a resumed run recomputes it instead of
storing it, and continues from the same micro-batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmloss.jsonl import DataError, Record, empty_file_error, read_jsonl_records, scan_samples
from lmloss.labels import Example, encode_chat, encode_prompt_completion
from lmloss.samples import pretokenized_example
from lmloss.train.config import TrainConfig

__all__ = ["DataReport", "Prompt", "TrainData", "encode_records", "epoch_micro_batches", "load_records"]

IGNORE_INDEX = -100


@dataclass
class Source:
    """One training file (or the built-in set) with its mix weight."""

    name: str
    weight: float
    records: list[Record]


@dataclass
class Prompt:
    """A prompt to answer before and after training, with the reference answer."""

    messages: list[dict[str, Any]] | None
    text: str | None
    reference: str


@dataclass
class DataReport:
    """What loading found: counts per file, and every sample that was skipped or cut."""

    samples: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "file:line: why"
    no_target: list[str] = field(default_factory=list)  # "file:line" (dropped: nothing to train)
    truncated: list[str] = field(default_factory=list)  # "file:line" (cut to max_length, targets remain)

    def lines(self) -> list[str]:
        out = [f"{name}: {n} samples" for name, n in self.samples.items()]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} samples that could not be encoded, e.g. {self.skipped[0]}")
        if self.no_target:
            out.append(f"dropped {len(self.no_target)} samples with no target token, e.g. {self.no_target[0]}")
        if self.truncated:
            out.append(f"truncated {len(self.truncated)} samples to --max-length, e.g. {self.truncated[0]}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": dict(self.samples),
            "skipped": list(self.skipped),
            "no_target": list(self.no_target),
            "truncated": list(self.truncated),
        }


@dataclass
class TrainData:
    """Encoded training examples by source, held-out examples, prompts, and the report."""

    train: list[list[Example]]  # per source
    weights: list[float]  # per source
    eval: list[Example]
    prompts: list[Prompt]
    report: DataReport

    @property
    def num_train(self) -> int:
        return sum(len(s) for s in self.train)


# ----------------------------------------------------------------------------- reading


def load_records(config: TrainConfig) -> tuple[list[Source], list[Record]]:
    """The training sources and the held-out records (from --eval-data or split off).

    Raises:
        DataError: a bad line (not UTF-8, not JSON, nested too deep, no sample format)
            with its ``file:line``, unless --skip-bad-samples keeps it for
            :func:`encode_records` to report; a file without samples.
        ValueError: a data file that does not exist.
    """
    for path in [s.path for s in config.sources] + list(config.eval_data):
        if not Path(path).is_file():
            raise ValueError(f"data file {path!r} does not exist (--data/--eval-data take JSONL files)")

    def read(path: str) -> list[Record]:
        if config.skip_bad_samples:
            return _read_skipping(path)
        try:
            return read_jsonl_records(path)
        except DataError as err:
            if err.line is None:
                raise
            raise DataError(
                err.path,
                err.line,
                f"{err.reason} (fix the line, or pass --skip-bad-samples to skip and report such lines)",
            ) from err

    if config.data:
        sources = [Source(s.path, s.weight, read(s.path)) for s in config.sources]
    else:
        sources = [Source("builtin", 1.0, _builtin_records())]
    if config.eval_data:
        held_out = [r for path in config.eval_data for r in read(path)]
        return sources, held_out
    return _split(sources, config.held_out_fraction, config.seed)


@dataclass(frozen=True)
class UnreadableRecord(Record):
    """A line that is not a sample (bad UTF-8, not JSON, too deep, no known format),
    kept with --skip-bad-samples so that encoding reports it with the other skipped samples."""

    reason: str = ""


def _read_skipping(path: str) -> list[Record]:
    """Every line of a file as a record, bad lines as :class:`UnreadableRecord`."""
    records: list[Record] = []
    for number, value in scan_samples(path):
        records.append(value if isinstance(value, Record) else UnreadableRecord(path, number, {}, value.reason))
    if not records:
        raise empty_file_error(path)
    return records


def _builtin_records() -> list[Record]:
    from lmloss.train.builtin import builtin_conversations

    return [Record("builtin", i + 1, chat) for i, chat in enumerate(builtin_conversations())]


def _split(sources: list[Source], fraction: float, seed: int) -> tuple[list[Source], list[Record]]:
    """Hold out ``fraction`` of every source (at least one sample when fraction > 0)."""
    held_out: list[Record] = []
    kept: list[Source] = []
    for index, source in enumerate(sources):
        order = list(range(len(source.records)))
        random.Random(f"{seed}/split/{index}").shuffle(order)
        n = min(len(order) - 1, max(1, round(fraction * len(order)))) if fraction > 0 else 0
        held = set(order[:n])
        held_out += [r for i, r in enumerate(source.records) if i in held]
        kept.append(Source(source.name, source.weight, [r for i, r in enumerate(source.records) if i not in held]))
    return kept, held_out


def texts_of(records: Sequence[Record]) -> list[str]:
    """Every text of the records (to train a tokenizer for a built-in model)."""
    texts: list[str] = []
    for record in records:
        data = record.data
        if isinstance(data.get("messages"), list):
            texts += [
                m["content"] for m in data["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)
            ]
        for key in ("prompt", "completion"):
            if isinstance(data.get(key), str):
                texts.append(data[key])
    return texts


# ---------------------------------------------------------------------------- encoding


def encode_records(
    records: Sequence[Record], tokenizer: Any, config: TrainConfig, report: DataReport, split: str
) -> list[Example]:
    """Label every record; bad ones raise (naming ``file:line``) or, with --skip-bad-samples,
    are reported and left out. Samples with no target are always left out and reported.

    Pre-tokenized samples are checked as ``lmloss check`` checks them
    (:func:`lmloss.samples.pretokenized_example`, ids in ``[0, len(tokenizer))``).

    Raises:
        DataError: the first sample that cannot be encoded (``file:line`` and why),
            without --skip-bad-samples."""
    examples: list[Example] = []
    for record in records:
        if isinstance(record, UnreadableRecord):
            report.skipped.append(f"{record.where}: {record.reason}")
            continue
        try:
            full = _encode(record.data, tokenizer, config)
        except (TypeError, ValueError) as err:
            if not config.skip_bad_samples:
                raise DataError(
                    record.source,
                    record.line,
                    f"{err} (fix the sample, or pass --skip-bad-samples to skip and report such samples)",
                ) from err
            report.skipped.append(f"{record.where}: {err}")
            continue
        example, cut = _truncate(full, config.max_length)
        if not _has_target(example):
            report.no_target.append(record.where + (" (after truncation)" if cut else ""))
            continue
        if cut:
            report.truncated.append(record.where)
        examples.append(example)
    report.samples[split] = report.samples.get(split, 0) + len(examples)
    return examples


def _encode(data: dict[str, Any], tokenizer: Any, config: TrainConfig) -> Example:
    """The sample's labelled tokens, at most ``max_length + 1`` of them: one more than is
    kept tells :func:`_truncate` that the sample was cut, and encoding with a bound keeps
    the memory of a huge sample in proportion to ``--max-length`` (see lmloss.labels)."""
    mode = "everything" if config.train_on_prompt else config.masking
    bound = config.max_length + 1
    if "messages" in data:
        return encode_chat(
            data["messages"],
            tokenizer,
            mode=mode,  # type: ignore[arg-type]  # TrainConfig checked masking against the encoder's modes
            tools=data.get("tools"),
            max_length=bound,
            train_turn_suffix=config.train_turn_suffix,
        )
    if "prompt" in data:
        return encode_prompt_completion(
            data["prompt"], data["completion"], tokenizer, train_on_prompt=mode == "everything", max_length=bound
        )
    return pretokenized_example(data["input_ids"], data["labels"], vocab_size=len(tokenizer), ignore_index=IGNORE_INDEX)


def _truncate(example: Example, max_length: int) -> tuple[Example, bool]:
    if len(example["input_ids"]) <= max_length:
        return example, False
    return Example(input_ids=example["input_ids"][:max_length], labels=example["labels"][:max_length]), True


def _has_target(example: Example) -> bool:
    # Position 0 is never a target: nothing predicts it.
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


def prompts_of(records: Sequence[Record], n: int) -> list[Prompt]:
    """Up to ``n`` prompts: the turns before the first assistant reply of a chat, or the
    prompt of a prompt/completion pair, with the reply as the reference."""
    prompts: list[Prompt] = []
    for record in records:
        if len(prompts) >= n:
            break
        data = record.data
        if isinstance(data.get("messages"), list):
            messages = data["messages"]
            first = next(
                (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), None
            )
            if first:
                prompts.append(Prompt(list(messages[:first]), None, str(messages[first].get("content", ""))))
        elif isinstance(data.get("prompt"), str) and isinstance(data.get("completion"), str):
            prompts.append(Prompt(None, data["prompt"], data["completion"]))
    return prompts


# ------------------------------------------------------------------------------ epochs


def epoch_micro_batches(data: TrainData, config: TrainConfig, epoch: int) -> list[list[Example]]:
    """The micro-batches of one epoch, in order: the mix (each source's samples repeated
    by its weight), shuffled by ``(seed, epoch)``, cut by samples or tokens."""
    rng = random.Random(f"{config.seed}/epoch/{epoch}")
    pool: list[Example] = []
    for examples, weight in zip(data.train, data.weights):
        whole, part = divmod(weight, 1.0)
        pool += examples * int(whole)
        pool += rng.sample(examples, round(part * len(examples)))
    rng.shuffle(pool)
    if config.batch_tokens is None:
        return [pool[i : i + config.batch_size] for i in range(0, len(pool), config.batch_size)]
    return _by_tokens(pool, config.batch_tokens)


def _by_tokens(pool: list[Example], budget: int) -> list[list[Example]]:
    """Consecutive samples while their total length fits ``budget`` (a longer sample
    goes alone: truncation already bounds it by --max-length)."""
    batches: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for example in pool:
        n = len(example["input_ids"])
        if current and used + n > budget:
            batches.append(current)
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        batches.append(current)
    return batches


def steps_per_epoch(num_micro_batches: int, micro_batches_per_step: int) -> int:
    return math.ceil(num_micro_batches / micro_batches_per_step)
