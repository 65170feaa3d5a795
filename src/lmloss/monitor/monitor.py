"""``LossMonitor``: running statistics and event detection over a training run.

Feed it one call per optimizer step and one per evaluation::

    monitor = LossMonitor(sinks=run_dir_sinks("runs/exp1"))
    for step, batch in enumerate(loader):
        loss = ...                                   # a tensor: it stays on the device
        events = monitor.update(step, loss=loss, tokens=n_targets, grad_norm=norm, lr=lr)
        if step % 500 == 0:
            events += monitor.update_eval(step, loss=eval_loss, train_loss=matched_train_loss)
        if any(e.kind in ("nan", "divergence") for e in events):
            break
    monitor.close()

What it tracks (``monitor.stats``): the debiased EMA of the loss (TensorBoard/W&B:
``last = last*w + y; n = n*w + 1; out = last/n``), perplexity ``exp(loss)``, token
accuracy ``correct / tokens``, tokens per second (with ``flops_per_token`` and
``peak_flops``: TFLOP/s and MFU, see ``lmloss.monitor.throughput``), and the best
(smoothed) train loss and best eval loss with their steps. A ``z_loss`` given to
``update`` is logged as ``train/z_loss`` (OLMo-core's ``train/Z loss``). What it detects: see
``lmloss.monitor.detectors``.

**Reading values.** Tensors passed to ``update`` are detached and kept on their
device; nothing is read until a *flush*, which packs every pending value into one
vector and reads it with a single host-device synchronisation. A flush happens
every ``sync_every`` steps, at every ``update_eval``, and on ``flush()``,
``state_dict()`` and ``close()``. ``update`` returns the events of the steps read
during that call, each carrying its own ``step``: with ``sync_every=1`` (the default
on CPU, where reading is free) that is the current step; with ``sync_every=16`` (the
default for values on an accelerator) events arrive up to 15 steps late, and the
training loop never waits for the GPU in between. Every step is still checked; only
the reporting is batched.

**Data parallelism.** With ``group=dist.group.WORLD`` (or any process group), the
values of every rank are combined during the flush, in the same single all-reduce:
token counts and correct tokens are summed, the loss and per-term losses become the
token-weighted mean over the global batch (pass each rank's *local* mean loss and
*local* ``tokens``), the gradient norm and learning rate are averaged. Every rank
then holds the same global numbers and detects the same events; the largest loss of
any rank is logged beside the mean as ``train/loss_max`` (torchtitan's
``global_max_loss``: one rank's bad data shows there before it moves the mean). Every rank must call
``update``/``update_eval``/``flush``/``state_dict``/``close`` the same number of
times, with the same fields (they are collectives when they flush). Only global rank
0 writes to the sinks unless ``write_sinks`` says otherwise. A rank that reports
``tokens=0`` adds nothing to the losses (its own mean, 0/0, may well be NaN).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmloss.monitor._buffer import PendingStep, Scalar, check_scalar, is_on_accelerator, is_weighted, read_pending
from lmloss.monitor.detectors import (
    ConvergedDetector,
    ConvergedRule,
    DivergenceDetector,
    DivergenceRule,
    MaxRatioDetector,
    MaxRatioRule,
    OverfittingDetector,
    OverfittingRule,
    PlateauDetector,
    PlateauRule,
    SpikeRule,
    WindowSpikeDetector,
)
from lmloss.monitor.events import Event
from lmloss.monitor.options import check_monitor_options, check_rules
from lmloss.monitor.sinks import Sink
from lmloss.monitor.throughput import Throughput, check_flops

__all__ = ["LossMonitor", "MonitorStats", "DEVICE_SYNC_EVERY"]

log = logging.getLogger("lmloss.monitor")

#: Steps between host reads when the values live on an accelerator (``sync_every=None``).
DEVICE_SYNC_EVERY = 16
_STATE_VERSION = 1


@dataclass(frozen=True)
class MonitorStats:
    """The monitor's numbers as of the last flush (``None``: not known yet).

    Attributes:
        step: last training step read.
        loss: its (global) loss, in nats per target token.
        smoothed_loss: debiased EMA of the training loss.
        ppl: ``exp(loss)``; ``smoothed_ppl``: ``exp(smoothed_loss)``.
        accuracy: ``correct / tokens`` of the last step (needs both).
        tokens_per_s: target tokens per second over the last flush window.
        tokens_seen: target tokens of every step so far.
        grad_norm, lr: of the last step, if given.
        best_loss, best_step: lowest smoothed training loss and its step.
        eval_loss, eval_ppl, eval_step: last evaluation.
        best_eval_loss, best_eval_step: lowest evaluation loss and its step.
    """

    step: int | None = None
    loss: float | None = None
    smoothed_loss: float | None = None
    ppl: float | None = None
    smoothed_ppl: float | None = None
    accuracy: float | None = None
    tokens_per_s: float | None = None
    tokens_seen: float = 0.0
    grad_norm: float | None = None
    lr: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    eval_loss: float | None = None
    eval_ppl: float | None = None
    eval_step: int | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None


class LossMonitor:
    """Watches the loss of a run: statistics, events, sinks. See the module docstring.

    Args:
        ema_weight: weight ``w`` of the debiased EMA in ``[0, 1)`` (0.9: about the
            last 10 steps; TensorBoard's slider starts at 0.6).
        spike: OLMo-core window rule (``None`` turns it off).
        max_ratio: Megatron-LM running-max rule (``None`` turns it off).
        divergence: loss far above its minimum (``None`` turns it off).
        plateau: no improvement for ``patience`` evaluations (``None`` turns it off).
        overfitting: eval rising while train falls (``None`` turns it off).
        converged: a target loss; off unless given.
        sync_every: steps between host reads; ``None`` picks 1 for CPU tensors and
            Python numbers, ``DEVICE_SYNC_EVERY`` for accelerator tensors.
        group: process group to combine ranks over (``None``: this process only).
        sinks: where records go (``JsonlSink``, ``CsvSink``, ``TensorBoardSink``,
            ``ConsoleSink``, or anything with ``write(record)`` and ``close()``).
        write_sinks: whether this process writes to ``sinks``; ``None`` means "if
            global rank 0" (always, without ``torch.distributed``).
        clock: seconds as a float, for tokens per second (tests pass a fake one).
        flops_per_token: the model's training FLOPs per processed token: logs
            ``throughput/tflops`` (per device).
        peak_flops: the device's peak FLOP/s (needs ``flops_per_token``): logs
            ``throughput/mfu`` in percent.
    """

    _last_step: int | None
    _last_eval_step: int | None
    _events: list[Event]

    def __init__(
        self,
        *,
        ema_weight: float = 0.9,
        spike: SpikeRule | None = SpikeRule(),
        max_ratio: MaxRatioRule | None = MaxRatioRule(),
        divergence: DivergenceRule | None = DivergenceRule(),
        plateau: PlateauRule | None = PlateauRule(),
        overfitting: OverfittingRule | None = OverfittingRule(),
        converged: ConvergedRule | None = None,
        sync_every: int | None = None,
        group: dist.ProcessGroup | None = None,
        sinks: Sequence[Sink] = (),
        write_sinks: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        check_monitor_options(ema_weight, sync_every, sinks, write_sinks, clock)
        check_flops(flops_per_token, peak_flops)
        check_rules(
            spike=spike,
            max_ratio=max_ratio,
            divergence=divergence,
            plateau=plateau,
            overfitting=overfitting,
            converged=converged,
        )
        self.ema_weight = float(ema_weight)
        self.sync_every = sync_every
        self.group = group
        self.sinks = list(sinks)
        self.write_sinks = write_sinks
        self.clock = clock
        self._rules = (spike, max_ratio, divergence, plateau, overfitting, converged)
        self._pending: list[PendingStep] = []
        self._flops = (flops_per_token, peak_flops)
        self._reset_state()

    # --- feeding --------------------------------------------------------------------

    def update(
        self,
        step: int,
        *,
        loss: Scalar,
        tokens: Scalar | None = None,
        correct: Scalar | None = None,
        grad_norm: Scalar | None = None,
        lr: Scalar | None = None,
        terms: Mapping[str, Scalar] | None = None,
        z_loss: Scalar | None = None,
        input_tokens: Scalar | None = None,
    ) -> list[Event]:
        """Record one optimizer step; return the events of the steps read now.

        Args:
            step: the optimizer step, increasing from call to call.
            loss: the mean loss per target token of this step (this rank's targets
                under a process group): a float or a one-element tensor.
            tokens: the number of target tokens ``loss`` averages over (e.g.
                ``lmloss.count_targets(labels)``): weights ranks, gives tokens/s.
            correct: target tokens whose argmax prediction is right (needs ``tokens``).
            grad_norm: the total gradient norm (checked for spikes).
            lr: the learning rate.
            terms: per-term losses of a composite loss, by name (``{"ce": .., "z": ..}``).
            z_loss: the z-loss term's share of ``loss`` (per target token, like ``loss``),
                logged as ``train/z_loss``.
            input_tokens: tokens the model processed this step (padding excluded), for
                the FLOPs of ``throughput/tflops``/``mfu``; default ``tokens``.
        """
        self._check_step(step, self._last_step, "update")
        values = self._values(
            loss=loss,
            tokens=tokens,
            correct=correct,
            grad_norm=grad_norm,
            lr=lr,
            terms=terms,
            z_loss=z_loss,
            input_tokens=input_tokens,
        )
        self._last_step = step
        self._pending.append(PendingStep("train", step, self.clock(), values))
        if self.sync_every is None:
            self.sync_every = DEVICE_SYNC_EVERY if is_on_accelerator(values) else 1
        if len(self._pending) >= self.sync_every:
            return self.flush()
        return []

    def update_eval(
        self,
        step: int,
        *,
        loss: Scalar,
        tokens: Scalar | None = None,
        correct: Scalar | None = None,
        train_loss: Scalar | None = None,
        terms: Mapping[str, Scalar] | None = None,
    ) -> list[Event]:
        """Record one evaluation at training step ``step``; flushes, returns the events read.

        Args:
            step: the training step the evaluation was run at (increasing).
            loss: mean evaluation loss per target token (this rank's share).
            tokens, correct, terms: as in ``update``, for the evaluation data.
            train_loss: the training loss estimated the same way at the same step
                (nanoGPT: the same number of batches from the training set); the
                overfitting rule compares against it, else against the smoothed
                training loss.
        """
        self._check_step(step, self._last_eval_step, "update_eval")
        values = self._values(loss=loss, tokens=tokens, correct=correct, train_loss=train_loss, terms=terms)
        self._last_eval_step = step
        self._pending.append(PendingStep("eval", step, self.clock(), values))
        # Evaluations are rare and their verdicts (plateau, overfitting) wanted now.
        return self.flush()

    def flush(self) -> list[Event]:
        """Read every pending step (one synchronisation), detect, write; return new events.

        A collective under a process group: every rank must call it.
        """
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        rows = read_pending(pending, self.group)
        devices = dist.get_world_size(self.group) if self.group is not None else 1
        window_rate = self._throughput.window([p.split for p in pending], [p.time for p in pending], rows, devices)
        events: list[Event] = []
        writes = self._writes()
        for item, values in zip(pending, rows):
            if item.split == "train":
                record, found = self._train_step(item.step, values, window_rate)
            else:
                record, found = self._eval_step(item.step, values)
            events += found
            if writes:
                self._write(record, found)
        self._events += events
        for event in events:
            log.info(event.message)
        return events

    def close(self) -> None:
        """Flush, then close every sink. A collective under a process group."""
        self.flush()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> LossMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- results --------------------------------------------------------------------

    @property
    def events(self) -> list[Event]:
        """Every event detected so far (including those restored by ``load_state_dict``)."""
        return list(self._events)

    @property
    def stats(self) -> MonitorStats:
        """Numbers as of the last flush; call ``flush()`` first for the newest."""
        return self._stats

    # --- checkpointing --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to decide as this one would (flushes first).

        The result holds only Python numbers, strings, lists and dicts: it can go
        into a ``torch.save`` checkpoint or a JSON file.
        """
        self.flush()
        return {
            "version": _STATE_VERSION,
            "last_step": self._last_step,
            "last_eval_step": self._last_eval_step,
            "ema": [self._ema_last, self._ema_n],
            "next_train_check": self._next_train_check,
            "stats": asdict(self._stats),
            "detectors": {name: d.state_dict() for name, d in self._detectors().items()},
            "events": [e.to_record() for e in self._events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output; detectors not configured here are ignored."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict() takes the mapping state_dict() returned, got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"monitor state has version {state.get('version')!r}; this lmloss reads version {_STATE_VERSION}"
            )
        if self._pending:
            raise ValueError("load_state_dict() on a monitor with unread steps: load before the first update()")
        self._reset_state()
        self._last_step, self._last_eval_step = state["last_step"], state["last_eval_step"]
        self._ema_last, self._ema_n = (float(x) for x in state["ema"])
        self._next_train_check = state["next_train_check"]
        self._stats = MonitorStats(**state["stats"])
        detectors = self._detectors()
        for name, detector_state in state["detectors"].items():
            if name in detectors:
                detectors[name].load_state_dict(detector_state)
        self._events = [Event.from_record(r) for r in state["events"]]

    # --- one step -------------------------------------------------------------------

    def _train_step(self, step: int, v: dict[str, float], rate: dict[str, float]) -> tuple[dict[str, Any], list[Event]]:
        record: dict[str, Any] = {"step": step, "split": "train", "train/loss": v["loss"]}
        for name in ("loss_max", "z_loss"):
            if name in v:
                record[f"train/{name}"] = v[name]
        events = _non_finite(step, "train", v)
        loss, stats = v["loss"], {"step": step, "loss": v["loss"], "ppl": _exp(v["loss"])}
        if math.isfinite(loss):
            smoothed = self._smooth(loss)
            record.update({"train/loss_smoothed": smoothed, "train/ppl": _exp(loss)})
            stats.update(smoothed_loss=smoothed, smoothed_ppl=_exp(smoothed))
            if self._stats.best_loss is None or smoothed < self._stats.best_loss:
                stats.update(best_loss=smoothed, best_step=step)
            events += self._spikes(step, "loss", loss)
            events += self._train_trend(step, loss, smoothed)
        stats.update(self._counts(record, "train", v))
        if "tokens_per_s" in rate:
            stats["tokens_per_s"] = rate["tokens_per_s"]
        record.update({f"throughput/{name}": x for name, x in rate.items()})
        for name in ("grad_norm", "lr"):
            if name in v:
                record[f"train/{name}"] = stats[name] = v[name]
        if "grad_norm" in v and math.isfinite(v["grad_norm"]):
            events += self._spikes(step, "grad_norm", v["grad_norm"])
        record.update(_terms("train", v))
        self._stats = _replace(self._stats, **stats)
        return record, events

    def _eval_step(self, step: int, v: dict[str, float]) -> tuple[dict[str, Any], list[Event]]:
        loss = v["loss"]
        record: dict[str, Any] = {"step": step, "split": "eval", "eval/loss": loss, "eval/ppl": _exp(loss)}
        events = _non_finite(step, "eval", v)
        stats: dict[str, Any] = {"eval_loss": loss, "eval_ppl": _exp(loss), "eval_step": step}
        if "train_loss" in v:
            record["eval/train_loss"] = v["train_loss"]
        self._counts(record, "eval", v)
        record.update(_terms("eval", v))
        if math.isfinite(loss):
            if self._stats.best_eval_loss is None or loss < self._stats.best_eval_loss:
                stats.update(best_eval_loss=loss, best_eval_step=step)
            events += self._eval_trend(step, loss, v.get("train_loss"))
        self._stats = _replace(self._stats, **stats)
        return record, events

    def _spikes(self, step: int, name: str, value: float) -> list[Event]:
        metric = f"train/{name}"
        window = self._spike.get(name)
        found = window.check(step, metric, value) if window else None
        ratio = self._ratio.get(name)
        jumped = ratio.check(step, metric, value) if ratio else None
        # Both rules may see the same jump: report it once.
        event = found or jumped
        return [event] if event else []

    def _train_trend(self, step: int, loss: float, smoothed: float) -> list[Event]:
        events = []
        if self._divergence is not None:
            if self._divergence.rule.smoothed:
                events.append(self._divergence.check(step, "train/loss_smoothed", smoothed))
            else:
                events.append(self._divergence.check(step, "train/loss", loss))
        evaluated = self._last_eval_step is not None
        interval = self._plateau_train.rule.interval(evaluated) if self._plateau_train else None
        if self._plateau_train is not None and interval is not None and step >= self._next_train_check:
            self._next_train_check = step + interval
            events.append(self._plateau_train.check(step, "train/loss_smoothed", smoothed, what="train checks"))
        if "train" in self._converged:
            events.append(self._converged["train"].check(step, "train/loss_smoothed", smoothed))
        return [e for e in events if e is not None]

    def _eval_trend(self, step: int, loss: float, train_loss: float | None) -> list[Event]:
        events = []
        if self._plateau_eval is not None:
            events.append(self._plateau_eval.check(step, "eval/loss", loss, what="evaluations"))
        train = train_loss if train_loss is not None and math.isfinite(train_loss) else self._stats.smoothed_loss
        if self._overfitting is not None and train is not None:
            events.append(self._overfitting.check(step, loss, train))
        if "eval" in self._converged:
            events.append(self._converged["eval"].check(step, "eval/loss", loss))
        return [e for e in events if e is not None]

    def _counts(self, record: dict[str, Any], split: str, v: dict[str, float]) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        tokens = v.get("tokens")
        if tokens is None:
            return stats
        if tokens < 0 or not math.isfinite(tokens):
            raise ValueError(f"{split} step {record['step']}: tokens must be a finite count >= 0, got {tokens}")
        record[f"{split}/tokens"] = _int_if_whole(tokens)
        if split == "train":
            stats["tokens_seen"] = self._stats.tokens_seen + tokens
            record["train/tokens_seen"] = _int_if_whole(stats["tokens_seen"])
        if "correct" in v:
            if not 0 <= v["correct"] <= tokens:
                raise ValueError(
                    f"{split} step {record['step']}: correct={v['correct']} must be between 0 and tokens={tokens}"
                )
            accuracy = v["correct"] / tokens if tokens else math.nan
            record[f"{split}/accuracy"] = stats["accuracy"] = accuracy
        return stats

    def _smooth(self, loss: float) -> float:
        # Debiased EMA (TensorBoard/W&B): dividing by n removes the pull towards 0 at start.
        self._ema_last = self._ema_last * self.ema_weight + loss
        self._ema_n = self._ema_n * self.ema_weight + 1.0
        return self._ema_last / self._ema_n

    # --- plumbing -------------------------------------------------------------------

    def _reset_state(self) -> None:
        spike, max_ratio, divergence, plateau, overfitting, converged = self._rules
        self._spike = {m: WindowSpikeDetector(spike) for m in spike.metrics} if spike else {}
        self._ratio = {m: MaxRatioDetector(max_ratio) for m in max_ratio.metrics} if max_ratio else {}
        self._divergence = DivergenceDetector(divergence) if divergence else None
        self._plateau_eval = PlateauDetector(plateau) if plateau else None
        self._plateau_train = PlateauDetector(plateau) if plateau and plateau.train_interval else None
        self._overfitting = OverfittingDetector(overfitting) if overfitting else None
        self._converged = {s: ConvergedDetector(converged) for s in ("train", "eval")} if converged else {}
        self._last_step = None
        self._last_eval_step = None
        self._ema_last, self._ema_n = 0.0, 0.0
        self._next_train_check = 0
        self._throughput = Throughput(*self._flops)
        self._stats = MonitorStats()
        self._events = []

    def _detectors(self) -> dict[str, Any]:
        found: dict[str, Any] = {f"spike/{m}": d for m, d in self._spike.items()}
        found.update({f"max_ratio/{m}": d for m, d in self._ratio.items()})
        found.update({f"converged/{s}": d for s, d in self._converged.items()})
        named = {
            "divergence": self._divergence,
            "plateau/eval": self._plateau_eval,
            "plateau/train": self._plateau_train,
            "overfitting": self._overfitting,
        }
        found.update({name: d for name, d in named.items() if d is not None})
        return found

    def _check_step(self, step: object, last: int | None, where: str) -> None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"{where}(step=...) must be an int, got {step!r}")
        if step < 0:
            raise ValueError(f"{where}(step={step}): steps are >= 0")
        if last is not None and step <= last:
            raise ValueError(
                f"{where}(step={step}) does not come after the last step {last}: steps must increase "
                f"(after resuming from a checkpoint, load_state_dict() the monitor saved with it)"
            )

    def _values(self, *, terms: Mapping[str, Scalar] | None, **named: Scalar | None) -> dict[str, Scalar]:
        values = {name: check_scalar(name, value) for name, value in named.items() if value is not None}
        if "correct" in values and "tokens" not in values:
            raise ValueError("correct= needs tokens= as well: accuracy is correct / tokens")
        if terms is not None:
            if not isinstance(terms, Mapping):
                raise TypeError(f"terms must be a mapping of name -> loss, got {type(terms).__name__}")
            for name, value in terms.items():
                if not isinstance(name, str) or not name or "/" in name:
                    raise ValueError(f"terms names must be non-empty strings without '/', got {name!r}")
                values[f"term/{name}"] = check_scalar(f"terms[{name!r}]", value)
        return values if self.group is None else _without_empty_share(values)

    def _writes(self) -> bool:
        if self.write_sinks is not None:
            return self.write_sinks
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _write(self, record: dict[str, Any], events: list[Event]) -> None:
        for sink in self.sinks:
            sink.write(record)
            for event in events:
                sink.write(event.to_record())


# --- helpers ------------------------------------------------------------------------------


def _exp(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _int_if_whole(x: float) -> float | int:
    return int(x) if x.is_integer() else x


def _terms(split: str, v: dict[str, float]) -> dict[str, float]:
    return {f"{split}/term/{name[5:]}": x for name, x in v.items() if name.startswith("term/")}


def _non_finite(step: int, split: str, v: dict[str, float]) -> list[Event]:
    """One "nan" event naming every NaN/inf value of the step (they are never averaged in)."""
    bad = [(name, x) for name, x in v.items() if not math.isfinite(x)]
    if not bad:
        return []
    described = ", ".join(f"{split}/{name}={x}" for name, x in bad)
    metric = f"{split}/{bad[0][0]}"
    message = f"step {step}: non-finite {split} value(s): {described}"
    return [Event(step, "nan", message, split, metric, bad[0][1], None)]


def _without_empty_share(values: dict[str, Scalar]) -> dict[str, Scalar]:
    """Under a group, a rank with ``tokens == 0`` adds 0 to the token-weighted losses.

    Its local mean is an empty mean, often 0/0 = NaN, and NaN * 0 tokens is still NaN:
    left as it is, one rank without a target would make the global loss NaN.
    """
    tokens = values.get("tokens")
    if tokens is None:
        return values
    return {name: _zero_without_tokens(v, tokens) if is_weighted(name) else v for name, v in values.items()}


def _zero_without_tokens(value: Scalar, tokens: Scalar) -> Scalar:
    if not isinstance(tokens, torch.Tensor) or tokens.device.type == "cpu":
        # Reading a host number costs no device synchronisation.
        if float(tokens) > 0:
            return value
        return torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0.0
    # Tokens on an accelerator: decide there, without reading (the flush reads once).
    value = torch.as_tensor(
        value, dtype=value.dtype if isinstance(value, torch.Tensor) else torch.float64, device=tokens.device
    )
    return torch.where(tokens > 0, value, torch.zeros_like(value))


def _replace(stats: MonitorStats, **changes: Any) -> MonitorStats:
    return MonitorStats(**{**asdict(stats), **changes})
