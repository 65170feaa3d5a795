"""``lmloss check``: audit a dataset's labels before training.

A label bug does not crash training: the loss goes down on the wrong tokens (the
prompt, image placeholders) or never sees the right ones (a masked EOS, an answer
cut by truncation), and the model learns it silently. This command encodes every
sample the way training would and reports, per file and line:

- the fraction of supervised tokens per sample (min/median/mean/max);
- samples with no target, after truncation (error: they add nothing to the loss);
- answers cut by truncation: targets beyond ``--max-length`` (warning);
- an EOS / end-of-turn token right after a trained span that is not itself a
  target (error: the model never learns to stop; the classic ``pad == eos`` bug);
- placeholder tokens (``--ignore-token-ids``) that are targets (error);
- a histogram of sequence lengths.

Data is JSONL, one sample per line, in one of three formats::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    {"prompt": "...", "completion": "..."}
    {"input_ids": [...], "labels": [...]}        # pre-tokenized, checked as given

Chat and prompt/completion lines are labelled by :mod:`lmloss.labels`, which
places labels by position, so the EOS and placeholder checks mostly matter for
pre-tokenized lines: those labels come from elsewhere, and that is where such
bugs live. The exit status is 0 without errors, 1 with errors, 2 when the
tokenizer cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lmloss._validation import check_choice
from lmloss.jsonl import DataError, Record, empty_file_error, read_jsonl_records, read_jsonl_samples, scan_samples
from lmloss.labels import CHAT_MODES, check_token_id_set, encode_chat, encode_prompt_completion
from lmloss.labels.options import check_flag
from lmloss.samples import pretokenized_example
from lmloss.tokenizer import load_tokenizer

# Record, load_tokenizer and the readers live in lmloss.jsonl / lmloss.tokenizer; they
# are re-exported here for code written against this module.
__all__ = [
    "AuditReport",
    "Issue",
    "Record",
    "audit",
    "load_tokenizer",
    "read_jsonl_records",
    "read_jsonl_samples",
]

Severity = Literal["error", "warning"]
_TRUNCATION_SIDES = ("right", "left")
# Tokens that end a turn in common chat templates besides ``eos_token`` (Qwen/ChatML,
# Llama 3, Gemma, Phi-3): the model must emit them to stop, so they must be targets.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
_BAR_WIDTH = 30


# ------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Issue:
    """One finding about one sample.

    Attributes:
        severity: ``"error"`` (fails the check) or ``"warning"``.
        kind: a short key: ``read``, ``encode``, ``no_target``, ``cut``,
            ``eos_masked``, ``placeholder_target``, ``label_mismatch``.
        where: ``file:line`` or ``sample i``.
        message: what is wrong and what to do.
    """

    severity: Severity
    kind: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class AuditReport:
    """What :func:`audit` found; ``str(report)`` is the table the CLI prints.

    Attributes:
        num_samples: samples looked at (including those that could not be encoded).
        lengths: sequence length of each encoded sample, after truncation.
        fractions: supervised fraction of each encoded sample: targets
            (``labels[1:] != ignore_index``) over its length.
        issues: every finding, in sample order.
        max_length: the truncation length, or ``None``.
        mode: the chat labelling mode.
        train_turn_suffix: chat turns also train what the template writes after their
            end-of-turn token (see :func:`lmloss.encode_chat`).
        pad_is_eos: the tokenizer's pad token is its eos token.
    """

    num_samples: int = 0
    lengths: list[int] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    max_length: int | None = None
    mode: str = "assistant"
    train_turn_suffix: bool = False
    pad_is_eos: bool = False

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def count(self, kind: str) -> int:
        """How many samples have an issue of this kind."""
        return len({i.where for i in self.issues if i.kind == kind})

    def fraction_summary(self) -> dict[str, float] | None:
        """min/median/mean/max of the supervised fractions; ``None`` without samples."""
        if not self.fractions:
            return None
        f = self.fractions
        return {"min": min(f), "median": statistics.median(f), "mean": statistics.fmean(f), "max": max(f)}

    def histogram(self) -> list[tuple[int, int, int]]:
        """Sequence lengths in power-of-two buckets: ``(low, high, count)``, low to high."""
        counts: dict[int, int] = {}
        for length in self.lengths:
            high = 1 << max(length - 1, 0).bit_length()
            counts[high] = counts.get(high, 0) + 1
        if not counts:
            return []
        # Empty buckets between the shortest and longest are shown too, so gaps read as gaps.
        highs = [1 << k for k in range(min(counts).bit_length() - 1, max(counts).bit_length())]
        return [(high // 2 + 1 if high > 1 else 1, high, counts.get(high, 0)) for high in highs]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``--json`` prints)."""
        return {
            "num_samples": self.num_samples,
            "num_encoded": len(self.lengths),
            "mode": self.mode,
            "train_turn_suffix": self.train_turn_suffix,
            "max_length": self.max_length,
            "pad_is_eos": self.pad_is_eos,
            "counts": {kind: self.count(kind) for kind, _, _ in _TABLE_ROWS},
            "supervised_fraction": self.fraction_summary(),
            "length_histogram": [{"low": lo, "high": hi, "count": n} for lo, hi, n in self.histogram()],
            "errors": [vars(i) for i in self.errors],
            "warnings": [vars(i) for i in self.warnings],
            "ok": self.ok,
        }

    def __str__(self) -> str:
        return format_report(self)


# -------------------------------------------------------------------------- audit


def audit(
    samples: Iterable[Mapping[str, Any] | Record],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    mode: str = "assistant",
    ignore_token_ids: Iterable[int] = (),
    ignore_index: int = -100,
    truncation_side: str = "right",
    eos_token_ids: Iterable[int] | None = None,
    vocab_size: int | None = None,
    train_turn_suffix: bool = False,
) -> AuditReport:
    """Encode each sample as training would and check its labels.

    Args:
        samples: dicts (``messages``; ``prompt``/``completion``; ``input_ids``/
            ``labels``) or :class:`Record` (then issues name ``file:line``).
        tokenizer: a transformers tokenizer (chat samples need a chat template).
        max_length: truncate to this many tokens, as training would.
        mode: chat labelling mode (see :func:`lmloss.encode_chat`); for
            prompt/completion samples, ``"everything"`` also trains the prompt (as
            ``lmloss train --masking``; ``"all"`` is about chat turns).
        ignore_token_ids: placeholder ids that must never be targets; encoders
            mask them, pre-tokenized labels are checked as given.
        ignore_index: the label of untrained tokens.
        truncation_side: ``"right"`` or ``"left"``.
        eos_token_ids: ids that must be trained right after a trained span;
            default: the tokenizer's eos and the end-of-turn tokens it knows.
        vocab_size: pre-tokenized ids must lie in ``[0, vocab_size)``; default
            ``len(tokenizer)``, as ``lmloss train`` checks them.
        train_turn_suffix: chat samples also train what the template writes after
            each trained turn's end-of-turn token, as ``lmloss train --train-turn-suffix``
            (see :func:`lmloss.encode_chat`).

    Returns:
        An :class:`AuditReport`. Samples that cannot be encoded are reported as
        ``encode`` errors, not raised. With ``max_length``, a long sample is encoded
        only up to :func:`audit_window` tokens (memory stays bounded); counts beyond
        it are reported as lower bounds ("at least").
    """
    check_choice("mode", mode, CHAT_MODES)
    check_choice("truncation_side", truncation_side, _TRUNCATION_SIDES)
    check_flag("train_turn_suffix", train_turn_suffix)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an int >= 1, got {max_length!r}")
    placeholders = check_token_id_set("ignore_token_ids", ignore_token_ids)
    eos_ids = _eos_ids(tokenizer) if eos_token_ids is None else check_token_id_set("eos_token_ids", eos_token_ids)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    report = AuditReport(
        max_length=max_length,
        mode=mode,
        train_turn_suffix=train_turn_suffix,
        pad_is_eos=pad_id is not None and pad_id in eos_ids,
    )
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    checker = _SampleChecker(tokenizer, mode, placeholders, eos_ids, ignore_index, report.pad_is_eos, vocab,
                             audit_window(max_length), truncation_side, train_turn_suffix)  # fmt: skip
    for index, sample in enumerate(samples):
        where, data = (sample.where, sample.data) if isinstance(sample, Record) else (f"sample {index}", sample)
        _audit_one(report, checker, where, data, truncation_side)
    return report


def _audit_one(report: AuditReport, checker: _SampleChecker, where: str, data: Any, truncation_side: str) -> None:
    """Add one sample's length, supervised fraction and issues to ``report``."""
    report.num_samples += 1
    try:
        ids, labels, complete = checker.encode(data)
    except (TypeError, ValueError) as err:
        report.issues.append(Issue("error", "encode", where, f"skipped, cannot encode: {err}"))
        return
    kept_ids, kept_labels = _truncate(ids, labels, report.max_length, truncation_side)
    report.lengths.append(len(kept_ids))
    report.fractions.append(_num_targets(kept_labels, checker.ignore_index) / max(len(kept_ids), 1))
    report.issues += checker.check(where, _Encoded(ids, labels, complete), kept_ids, kept_labels, report.max_length)


def audit_window(max_length: int | None) -> int | None:
    """How many tokens :func:`audit` encodes of a sample, for a truncation length.

    Enough past ``max_length`` to count what truncation cuts off (exactly, for
    samples up to this length), bounded so that a huge sample costs memory in
    proportion to ``max_length``, not to its size. ``None``: whole samples.
    """
    return None if max_length is None else max_length + max(max_length, 1024)


@dataclass(frozen=True)
class _Encoded:
    """A sample's ids and labels before truncation: all of them, or (``complete=False``)
    the first or last :func:`audit_window` tokens of a longer sample."""

    ids: list[int]
    labels: list[int]
    complete: bool


def _eos_ids(tokenizer: Any) -> frozenset[int]:
    """The eos id plus the end-of-turn tokens this tokenizer has as single tokens."""
    ids = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids.update(vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab)
    return frozenset(ids)


def _truncate(ids: list[int], labels: list[int], max_length: int | None, side: str) -> tuple[list[int], list[int]]:
    if max_length is None or len(ids) <= max_length:
        return ids, labels
    keep = slice(None, max_length) if side == "right" else slice(-max_length, None)
    return ids[keep], labels[keep]


def _num_targets(labels: Sequence[int], ignore_index: int) -> int:
    """Targets the shifted loss scores: position 0 never is one."""
    return sum(1 for label in labels[1:] if label != ignore_index)


@dataclass(frozen=True)
class _SampleChecker:
    """Encodes one sample and runs the per-sample checks."""

    tokenizer: Any
    mode: str
    placeholders: frozenset[int]
    eos_ids: frozenset[int]
    ignore_index: int
    pad_is_eos: bool
    vocab_size: int
    window: int | None
    truncation_side: str
    train_turn_suffix: bool = False

    def encode(self, data: Mapping[str, Any]) -> tuple[list[int], list[int], bool]:
        """``(input_ids, labels, complete)`` before truncation (applied afterwards, so cuts can
        be seen); ``complete=False``: only the first (last) ``window`` tokens of a longer sample."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a sample must be a dict, got {type(data).__name__}")
        window = {"max_length": self.window, "truncation_side": self.truncation_side}
        if "messages" in data:
            ex = encode_chat(
                data["messages"], self.tokenizer, mode=self.mode,  # type: ignore[arg-type]  # encode_chat checks it
                ignore_index=self.ignore_index, ignore_token_ids=self.placeholders, tools=data.get("tools"),
                train_turn_suffix=self.train_turn_suffix,
                **window,  # type: ignore[arg-type]  # dict[str, object]; the encoder checks its values
            )  # fmt: skip
        elif "prompt" in data and "completion" in data:
            ex = encode_prompt_completion(
                data["prompt"], data["completion"], self.tokenizer, train_on_prompt=self.mode == "everything",
                ignore_index=self.ignore_index, ignore_token_ids=self.placeholders,
                **window,  # type: ignore[arg-type]  # dict[str, object]; the encoder checks its values
            )  # fmt: skip
        elif "input_ids" in data and "labels" in data:
            ex = pretokenized_example(
                data["input_ids"], data["labels"], vocab_size=self.vocab_size, ignore_index=self.ignore_index
            )
            return ex["input_ids"], ex["labels"], True
        else:
            raise ValueError(
                f"a sample needs 'messages', 'prompt'+'completion' or 'input_ids'+'labels'; it has keys {sorted(data)}"
            )
        return ex["input_ids"], ex["labels"], self.window is None or len(ex["input_ids"]) < self.window

    def check(
        self, where: str, encoded: _Encoded, kept_ids: list[int], kept_labels: list[int], max_length: int | None,
    ) -> list[Issue]:  # fmt: skip
        """The issues of one encoded sample (``encoded`` before truncation, ``kept_*`` after)."""
        issues: list[Issue] = []
        before, after = _num_targets(encoded.labels, self.ignore_index), _num_targets(kept_labels, self.ignore_index)
        # Past the audit window, counts before truncation are lower bounds.
        least = "" if encoded.complete else "at least "
        if after == 0:
            why = (
                f"after truncation to max_length={max_length} (it had {least}{before} before); raise --max-length "
                f"or drop it"
                if before
                else f"(nothing in labels[1:]{'' if encoded.complete else f' of its first {self.window} tokens'} "
                f"is trained); it adds nothing to the loss"
            )
            issues.append(Issue("error", "no_target", where, f"no target {why}"))
        elif after < before:
            issues.append(Issue(
                "warning", "cut", where,
                f"answer cut by truncation: {least}{before - after} of {least}{before} targets beyond "
                f"max_length={max_length} (length {least}{len(encoded.ids)})",
            ))  # fmt: skip
        # One issue per kind at most, naming the first position and the count.
        findings: tuple[tuple[Severity, str, str | None], ...] = (
            ("error", "eos_masked", self._masked_eos(kept_ids, kept_labels)),
            ("error", "placeholder_target", self._placeholder_targets(kept_labels)),
            ("warning", "label_mismatch", self._label_mismatch(kept_ids, kept_labels)),
        )
        issues += [Issue(severity, kind, where, message) for severity, kind, message in findings if message]
        return issues

    def _masked_eos(self, ids: list[int], labels: list[int]) -> str | None:
        """What is wrong when an EOS right after a trained span is not a target; ``None``: nothing."""
        # Look only right after a trained span: an EOS inside a prompt is rightly
        # masked, but the one that ends a trained answer is what teaches stopping.
        # A span that already ends with a trained EOS is fine: what follows it is
        # padding (masked EOS ids when pad == eos).
        ignore, eos = self.ignore_index, self.eos_ids
        masked = [
            t for t in range(2, len(ids))
            if labels[t - 1] != ignore and ids[t - 1] not in eos and labels[t] == ignore and ids[t] in eos
        ]  # fmt: skip
        if not masked:
            return None
        hint = " (pad_token_id == eos_token_id: was it masked as padding?)" if self.pad_is_eos else ""
        return (
            f"EOS/end-of-turn token {ids[masked[0]]} at position {masked[0]} follows a trained span but is not a "
            f"target{hint}; {len(masked)} such position(s). The model would never learn to stop: label it"
        )

    def _placeholder_targets(self, labels: list[int]) -> str | None:
        """What is wrong when placeholder tokens are targets; ``None``: nothing."""
        hits = [t for t in range(1, len(labels)) if labels[t] in self.placeholders]
        return (
            f"placeholder token {labels[hits[0]]} is a target at position {hits[0]} ({len(hits)} position(s)); "
            f"set those labels to {self.ignore_index} (lmloss.mask_token_ids)"
            if hits
            else None
        )

    def _label_mismatch(self, ids: list[int], labels: list[int]) -> str | None:
        """What is wrong when trained labels differ from their input ids; ``None``: nothing."""
        # Labels are unshifted: a trained label equals its input id. Labels that
        # differ were most likely shifted already, and the loss would shift twice.
        bad = [t for t, (i, lab) in enumerate(zip(ids, labels)) if lab != self.ignore_index and lab != i]
        return (
            f"{len(bad)} label(s) differ from their input id (first at position {bad[0]}); labels must be "
            f"unshifted (the loss shifts them): were they shifted already?"
            if bad
            else None
        )


# ------------------------------------------------------------------------- output

# (issue kind, row title, severity shown)
_TABLE_ROWS = (
    ("read", "unreadable line", "error"),
    ("encode", "skipped (cannot encode)", "error"),
    ("no_target", "no target (after truncation)", "error"),
    ("cut", "answer cut by truncation", "warning"),
    ("eos_masked", "EOS/end-of-turn masked", "error"),
    ("placeholder_target", "placeholder token as target", "error"),
    ("label_mismatch", "label != input id (shifted?)", "warning"),
)


def format_report(report: AuditReport, max_errors: int = 20) -> str:
    """The plain-text table: counts, supervised fractions, length histogram, first issues."""
    lines = [_header(report), "", f"{'check':<32}{'samples':>8}{'%':>9}  severity"]
    for kind, title, severity in _TABLE_ROWS:
        n = report.count(kind)
        lines.append(f"{title:<32}{n:>8}{_pct(n, report.num_samples):>9}  {severity if n else ''}".rstrip())
    summary = report.fraction_summary()
    lines.append("")
    if summary:
        lines.append("supervised fraction per sample: " + "  ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    lines += ["", "sequence length (after truncation)", f"{'tokens':<14}{'samples':>8}{'%':>9}"]
    hist = report.histogram()
    peak = max((n for _, _, n in hist), default=1)
    for low, high, n in hist:
        bar = "#" * max(1 if n else 0, round(_BAR_WIDTH * n / peak))
        lines.append(f"{f'{low}-{high}':<14}{n:>8}{_pct(n, len(report.lengths)):>9}  {bar}".rstrip())
    lines += _issue_lines("errors", report.errors, max_errors) + _issue_lines("warnings", report.warnings, max_errors)
    verdict = "OK" if report.ok else "FAILED"
    lines += ["", f"{verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)"]
    return "\n".join(lines)


def _header(report: AuditReport) -> str:
    extra = (", train_turn_suffix" if report.train_turn_suffix else "") + (", pad == eos" if report.pad_is_eos else "")
    return (
        f"lmloss check: {report.num_samples} samples, {len(report.lengths)} encoded "
        f"(mode={report.mode}, max_length={report.max_length}{extra})"
    )


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _issue_lines(title: str, issues: list[Issue], limit: int) -> list[str]:
    if not issues:
        return []
    shown = issues[:limit]
    head = f"{title} (first {len(shown)} of {len(issues)}):" if len(issues) > len(shown) else f"{title}:"
    return ["", head] + [f"  {issue}" for issue in shown]


# ---------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lmloss check``."""
    parser.add_argument("data", nargs="+", metavar="DATA", help="JSONL file(s): messages, prompt/completion, "
                        "or pre-tokenized input_ids/labels per line")  # fmt: skip
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="local tokenizer directory")
    parser.add_argument("--max-length", type=int, default=None, help="truncate as training would")
    parser.add_argument("--truncation-side", choices=_TRUNCATION_SIDES, default="right")
    parser.add_argument("--mode", choices=CHAT_MODES, default="assistant", help="which chat tokens are trained")
    parser.add_argument(
        "--train-turn-suffix",
        action="store_true",
        help="also train what the chat template writes after each trained turn's end-of-turn token "
        "(the newline after <|im_end|> in ChatML), as LLaMA-Factory's templates do and as "
        "lmloss train --train-turn-suffix does",
    )
    parser.add_argument("--ignore-token-ids", type=_id_list, default=(), metavar="IDS",
                        help="comma-separated placeholder ids never to be targets, e.g. 151655,151656")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print a machine-readable report")
    parser.add_argument("--max-errors", type=int, default=20, help="errors/warnings listed (default 20)")


def _id_list(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    negative = [i for i in ids if i < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {negative[0]} in {text!r}")
    return ids


def run(args: argparse.Namespace) -> int:
    """Read, audit, print; 0 without errors, 1 with errors, 2 when the tokenizer cannot load."""
    if args.max_length is not None and args.max_length < 1:
        print(f"lmloss check: --max-length must be >= 1, got {args.max_length}", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except ValueError as err:
        print(f"lmloss check: {err}", file=sys.stderr)
        return 2
    records, read_issues = _read_all(args.data)
    report = audit(
        records, tokenizer, max_length=args.max_length, mode=args.mode,
        ignore_token_ids=args.ignore_token_ids, truncation_side=args.truncation_side,
        train_turn_suffix=args.train_turn_suffix,
    )  # fmt: skip
    # Unreadable lines count as samples: the percentages are of what the files hold.
    report.num_samples += len(read_issues)
    report.issues = read_issues + report.issues
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report, max(args.max_errors, 0)))
    return 0 if report.ok else 1


def _read_all(paths: Sequence[str]) -> tuple[list[Record], list[Issue]]:
    """Every readable sample of every file, and an issue per bad line or bad file."""
    records: list[Record] = []
    issues: list[Issue] = []
    for path in paths:
        found = 0
        try:
            for _, value in scan_samples(path):
                found += 1
                if isinstance(value, DataError):
                    issues.append(Issue("error", "read", value.where, value.reason))
                else:
                    records.append(value)
        except OSError as err:
            issues.append(Issue("error", "read", path, f"cannot read: {err}"))
            continue
        if not found:
            empty = empty_file_error(path)
            issues.append(Issue("error", "read", empty.where, empty.reason))
    return records, issues
