"""The training loop of ``lmloss train``: data -> labels -> batches -> fused loss -> monitor.

One optimizer step reads ``grad_accum`` micro-batches per process; every micro-batch
divides its loss *sum* by the target count of the whole step (all micro-batches, all
processes: :func:`lmloss.micro_batches`), so the gradient is that of one big batch
(and DDP's averaging over processes is undone by ``loss_scale``).

The order of the data is a pure function of the seed: step ``s`` always reads the
same micro-batches, so a resumed run reads exactly what the interrupted one would
have, and (on CPU in float32) logs exactly the same losses.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lmloss
from lmloss._files import atomic_write
from lmloss.batching import PackingCollator, PaddingCollator
from lmloss.labels import Example
from lmloss.monitor import ConsoleSink, LossMonitor, plot_run, run_dir_sinks
from lmloss.train import checkpoint as ckpt
from lmloss.train import rundir
from lmloss.train.config import BUILTIN_DATA_EPOCHS, BUILTIN_MODELS, DEFAULT_EPOCHS, TrainConfig
from lmloss.train.data import (
    DataReport,
    TrainData,
    encode_records,
    epoch_micro_batches,
    load_records,
    prompts_of,
    texts_of,
)
from lmloss.train.modeling import (
    LossModel,
    correct_targets,
    head_of,
    load_model,
    load_tokenizer,
    logit_transform,
    per_sample_weights,
)
from lmloss.train.processes import start_processes
from lmloss.train.report import generate_answers, summarize, write_report, write_summary
from lmloss.train.stopping import StopRequest, exit_code

__all__ = ["Trainer", "exit_code", "train"]

CONFIG_FILE = "config.json"
BUILTIN_PROMPT = [{"role": "user", "content": "Where is the capital of China?"}]


def train(config: TrainConfig, *, log: Callable[[str], None] = print, given: set[str] | None = None) -> dict[str, Any]:
    """Run ``lmloss train`` with ``config``; returns the summary (also in ``summary.json``).

    ``given``: the option names the user set (the command line passes them); on
    ``resume`` those are compared with the saved run. ``None``: the options that differ
    from their defaults.

    On SIGINT/SIGTERM the step in flight finishes, a checkpoint is saved and the summary
    says ``"interrupted": {"signal": "SIGINT", "step": s}`` (:func:`exit_code` gives the
    command's exit status); ``resume`` continues exactly from there.
    """
    return Trainer(config, log=log, given=given).run()


# -------------------------------------------------------------------------------- trainer


class Trainer:
    """Sets up a run from a :class:`TrainConfig` and runs it; see :func:`train`."""

    def __init__(
        self, config: TrainConfig, *, log: Callable[[str], None] = print, given: set[str] | None = None
    ) -> None:
        self.procs, self.device = start_processes(config.device)
        self.log = log if self.procs.main else (lambda _: None)
        self.lock: rundir.RunLock | None = None
        self.run_dir = Path(config.output_dir)
        try:
            self.resume_from = self._prepare_run_dir(config)
            self.config = self._resumed_config(config, given) if self.resume_from else config
        except BaseException:
            self._release()
            raise
        self.counters: dict[str, float] = {"tokens_seen": 0, "target_tokens_seen": 0, "train_seconds": 0.0}
        self.stop = StopRequest()

    # --- run directory ----------------------------------------------------------------

    def _prepare_run_dir(self, config: TrainConfig) -> Path | None:
        """Lock the directory against a second run; refuse to mix two runs in it (or to
        delete what no run wrote); find the checkpoint to resume from."""
        if self.procs.main:
            self.run_dir = rundir.prepare_output_dir(config.output_dir, resume=config.resume)
            self.lock = rundir.RunLock(self.run_dir)
            self.lock.acquire()
        self.procs.barrier()
        if config.resume:
            found = ckpt.latest_checkpoint(self.run_dir)
            if found is None:
                raise ValueError(
                    f"--resume: {self.run_dir} has no complete checkpoint to resume from "
                    f"(start the run without --resume)"
                )
            self._restored = ckpt.load_trainer_state(found)  # a damaged checkpoint fails here, named
            ckpt.check_model_file(found)
            if self.procs.main:
                ckpt.remove_partials(self.run_dir)
            return found
        has_run = rundir.has_run(self.run_dir)
        if has_run and not config.overwrite:
            raise ValueError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, --overwrite to "
                f"replace it, or another --output-dir"
            )
        if self.procs.main and has_run:
            rundir.clear_run(self.run_dir)
        self.procs.barrier()
        return None

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _resumed_config(self, given: TrainConfig, names: set[str] | None) -> TrainConfig:
        """The run's saved config; the options set now may change only what does not
        change the math (and the length of the run)."""
        saved = TrainConfig.from_values(json.loads((self.run_dir / CONFIG_FILE).read_text()), str(self.run_dir))
        changeable = {f.name for f in fields(TrainConfig) if not f.metadata["math"]} | {"max_steps", "epochs"}
        if names is None:
            defaults = TrainConfig(output_dir=given.output_dir)
            names = {f.name for f in fields(TrainConfig) if getattr(given, f.name) != getattr(defaults, f.name)}
        changed = sorted(n for n in names - changeable if getattr(given, n) != getattr(saved, n))
        if changed:
            raise ValueError(
                f"--resume continues the saved run; these options differ from it: "
                f"{', '.join('--' + n.replace('_', '-') for n in changed)} (see {CONFIG_FILE})"
            )
        values = saved.to_dict()
        for name in names & changeable:
            values[name] = getattr(given, name)
        if "max_steps" in names and given.max_steps is not None:
            values["epochs"] = None
        elif "epochs" in names and given.epochs is not None:
            values["max_steps"] = None
        values["resume"], values["overwrite"] = True, False
        return TrainConfig.from_values(values)

    # --- setup ------------------------------------------------------------------------

    def _setup(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        sources, held_out = load_records(c)
        train_records = [r for s in sources for r in s.records]
        source = str(self.resume_from) if self.resume_from else c.model
        self.tokenizer = load_tokenizer(source if self.resume_from else c.model, texts_of(train_records), c.vocab_size)
        report = DataReport()
        train = [encode_records(s.records, self.tokenizer, c, report, s.name) for s in sources]
        if not any(train):
            raise ValueError("no training sample has a target token: see the report above (--masking, --max-length)")
        evaluation = encode_records(held_out, self.tokenizer, c, report, "held out")
        prompts = prompts_of(held_out or train_records, c.samples)
        if c.model in BUILTIN_MODELS and not c.data and c.samples:
            prompts = prompts_of([_builtin_prompt_record()], 1) + prompts[: c.samples - 1]
        self.data = TrainData(train, [s.weight for s in sources], evaluation, prompts, report)
        self.model = load_model(source if self.resume_from else c.model, len(self.tokenizer)).to(self.device)
        self.model.train()
        self.scale, self.model_softcap = logit_transform(self.model)
        self.loss_model = LossModel(self.model, self._loss_options(), scale=self.scale)
        self.step_model: nn.Module = self.loss_model
        self.ddp: nn.parallel.DistributedDataParallel | None = None  # the step model, with several processes
        if self.procs.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.loss_model, device_ids=ids)
            self.step_model = self.ddp
        self.collate = self._collator()
        self.per_step = c.grad_accum * self.procs.world
        self.total_steps = self._total_steps()
        self.optimizer = _adamw(self.model, c)
        self.scheduler = _schedule(self.optimizer, self.total_steps, c)

    def _loss_options(self) -> dict[str, Any]:
        c = self.config
        # Packed rows hold several samples: "sequence" becomes per-sample weights (see _batches).
        normalize = "token" if self._per_sample_weights else c.normalize
        options: dict[str, Any] = dict(
            label_smoothing=c.label_smoothing,
            z_loss=c.z_loss,
            normalize=normalize,
            backend=c.loss_backend,
            chunk_size=c.chunk_size,
        )
        softcap = c.softcap if c.softcap is not None else self.model_softcap
        if softcap is not None:
            options["softcap"] = softcap
        if c.token_loss != "ce":
            options["token_loss"] = c.token_loss
            if c.token_loss in ("focal", "focal_attached"):
                options["focal_gamma"] = c.focal_gamma
        return options

    @property
    def _per_sample_weights(self) -> bool:
        return self.config.normalize == "sequence" and self.config.packing

    def _collator(self) -> Callable[[list[Example]], dict[str, Any]]:
        pad = self.tokenizer.pad_token_id
        if self.config.packing:
            return PackingCollator(max_length=self.config.max_length, pad_token_id=pad)
        return PaddingCollator(pad_token_id=pad)

    def _total_steps(self) -> int:
        c = self.config
        if c.max_steps is not None:
            return c.max_steps
        per_epoch = self._epoch_size(0) / self.per_step
        epochs = c.epochs if c.epochs is not None else DEFAULT_EPOCHS if c.data else BUILTIN_DATA_EPOCHS
        return max(1, math.ceil(epochs * per_epoch))

    # --- data stream ------------------------------------------------------------------

    def _step_micro_batches(self, step: int) -> list[list[Example]]:
        """This process's micro-batches of optimizer step ``step`` (1-based): the global
        stream of micro-batches runs epoch after epoch; step ``s`` takes the ``per_step``
        after the first ``(s - 1) * per_step``, and process ``r`` every ``world``-th of them."""
        start = (step - 1) * self.per_step
        chosen = [self._stream(i) for i in range(start, start + self.per_step)]
        return chosen[self.procs.rank :: self.procs.world]

    def _stream(self, index: int) -> list[Example]:
        epoch = 0
        while index >= self._epoch_size(epoch):
            index -= self._epoch_size(epoch)
            epoch += 1
        return self._epoch(epoch)[index]

    def _epoch_size(self, epoch: int) -> int:
        sizes = self.__dict__.setdefault("_sizes", {})
        if epoch not in sizes:
            sizes[epoch] = len(self._epoch(epoch))
            if sizes[epoch] == 0:
                raise ValueError(
                    f"epoch {epoch} has no sample: the mix weights leave nothing to train "
                    f"(a weight below 1 on a file with few samples?)"
                )
        return sizes[epoch]

    def _epoch(self, epoch: int) -> list[list[Example]]:
        cache = self.__dict__.setdefault("_epochs", {})
        if epoch not in cache:
            cache.clear()  # one epoch at a time is enough: steps read the stream in order
            cache[epoch] = epoch_micro_batches(self.data, self.config, epoch)
        return cache[epoch]

    # --- the run ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            with self.stop:
                return self._run()
        finally:
            self._release()

    def _run(self) -> dict[str, Any]:
        self._setup()
        self.plots = self._plots_available()
        start = self._restore() if self.resume_from else 0
        if self.procs.main and not self.resume_from:
            atomic_write(
                self.run_dir / CONFIG_FILE, lambda f: f.write(json.dumps(self.config.to_dict(), indent=2)), binary=False
            )
        self._announce(start)
        self.monitor = self._monitor(start)
        if not self.resume_from:
            self.samples = {"before": self._answers()}
            self._evaluate(0)
        self.stopped_at: int | None = None
        for step in range(start + 1, self.total_steps + 1):
            stop = self._train_step(step)
            if step % self.config.eval_every == 0 or step == self.total_steps:
                self._evaluate(step)
            if stop or step % self.config.save_every == 0 or step == self.total_steps:
                self._save(step)
            if stop and step < self.total_steps:
                self.stopped_at = step
                break
        return self._finish()

    def _plots_available(self) -> bool:
        """Whether matplotlib imports: checked before the first step, so that a run without
        it says so at once and still ends with its summary and report."""
        if not self.procs.main:
            return False
        try:
            import matplotlib as mpl  # noqa: F401  (imported only to see whether it is installed)
        except ImportError:
            self.log(
                "warning: matplotlib is not installed: this run writes no plots (pip install 'lmloss[plot]'; "
                "`lmloss plot RUN_DIR` draws them later)"
            )
            return False
        return True

    def _announce(self, start: int) -> None:
        c = self.config
        params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"model: {c.model} ({type(self.model).__name__}, {params:,} parameters), vocabulary "
            f"{len(self.tokenizer):,}, device {self.device}, {self.procs.world} process(es), {c.precision}"
        )
        for line in self.data.report.lines():
            self.log(f"data: {line}")
        self.log(
            f"steps: {self.total_steps} x {self.per_step} micro-batches of "
            f"{f'{c.batch_tokens} tokens' if c.batch_tokens else f'{c.batch_size} samples'}"
            f"{', packed' if c.packing else ''}" + (f"; resuming after step {start}" if start else "")
        )

    def _monitor(self, start: int) -> LossMonitor:
        sinks: list[Any] = []
        if self.procs.main:
            sinks = run_dir_sinks(self.run_dir)
            if self.config.progress != "none":
                sinks.append(ConsoleSink(total_steps=self.total_steps, backend=self.config.progress))
        monitor = LossMonitor(sinks=sinks, write_sinks=self.procs.main)
        if start:
            monitor.load_state_dict(self._restored["monitor"])
        return monitor

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batches(self, examples: list[list[Example]]) -> Iterator[dict[str, torch.Tensor]]:
        for group in examples:
            batch = {k: v for k, v in self.collate(group).items() if isinstance(v, torch.Tensor)}
            if self._per_sample_weights:
                batch["token_weights"] = per_sample_weights(batch["labels"], batch["position_ids"])
            yield {k: v.to(self.device) for k, v in batch.items()}

    def _train_step(self, step: int) -> bool:
        """One optimizer step; returns whether a stop (SIGINT/SIGTERM) was asked of any process."""
        began = time.perf_counter()
        examples = self._step_micro_batches(step)
        batches = list(self._batches(examples))
        total, z_total = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        weights_key = "token_weights" if self._per_sample_weights else None
        normalize = self.loss_model.loss_options["normalize"]
        # The z-loss term's share costs one more forward of the fused head per micro-batch:
        # only when there is a z-loss.
        z_share = self.config.z_loss > 0
        for mb in lmloss.micro_batches(batches, group=self.procs.group, normalize=normalize, weights_key=weights_key):
            # DDP: synchronise gradients once, in the backward of the step's last micro-batch.
            with self.ddp.no_sync() if self.ddp is not None and not mb.is_last else contextlib.nullcontext():
                with self._autocast():
                    out = self.step_model(mb.batch, mb.num_items_in_batch, z_share=z_share)
                loss, z = out if z_share else (out, None)
                (loss * mb.loss_scale).backward()
            total += loss.detach()
            if z is not None:
                z_total += z
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # One all-reduce for the step's numbers: each process's loss (and z-loss share) is its
        # share of the step mean (their sum is the step mean); input and target tokens add up.
        inputs = sum(len(ex["input_ids"]) for group in examples for ex in group)
        targets = sum(lmloss.count_targets(b["labels"]).double() for b in batches)
        # The stop flag rides along, so that every process stops after the same step.
        stop = float(self.stop.signum is not None)
        numbers = torch.stack(
            [total.double(), z_total.double()]
            + [torch.as_tensor(x, dtype=torch.float64, device=self.device) for x in (inputs, targets, stop)]
        )
        loss, z_loss, inputs, targets, stops = self.procs.sum(numbers).tolist()
        self.counters["tokens_seen"] += int(inputs)
        self.counters["target_tokens_seen"] += int(targets)
        self.counters["train_seconds"] += time.perf_counter() - began
        self.monitor.update(
            step,
            loss=loss,
            tokens=int(targets),
            grad_norm=grad_norm,
            lr=self.scheduler.get_last_lr()[0],
            z_loss=z_loss if z_share else None,
        )
        return stops > 0

    def _clip(self) -> torch.Tensor:
        norm = self.config.max_grad_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        if norm is None:
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        return torch.nn.utils.clip_grad_norm_(params, norm)

    @torch.no_grad()
    def _evaluate(self, step: int) -> None:
        """Plain cross-entropy per target token over the held-out set (no smoothing, z-loss
        or DFT, so that it reads as log-perplexity), and argmax accuracy."""
        if not self.data.eval:
            return
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, targets, correct
        mine = [
            self.data.eval[i : i + self.config.batch_size]
            for i in range(0, len(self.data.eval), self.config.batch_size)
        ][self.procs.rank :: self.procs.world]
        for batch in self._batches(mine):
            with self._autocast():
                head = head_of(self.model)
                hidden, bias = self.loss_model.scaled(self.loss_model.hidden_states(batch), head.bias)
                loss = lmloss.linear_cross_entropy(
                    hidden,
                    head.weight,
                    batch["labels"],
                    bias=bias,
                    reduction="sum",
                    softcap=self.loss_model.loss_options.get("softcap"),
                )
            sums[0] += loss.double()
            sums[1] += lmloss.count_targets(batch["labels"]).double()
            sums[2] += correct_targets(hidden.float(), head.weight.float(), batch["labels"]).double()
        sums = self.procs.sum(sums)
        self.model.train()
        count = max(float(sums[1]), 1.0)
        self.monitor.update_eval(step, loss=float(sums[0]) / count, tokens=float(sums[1]), correct=float(sums[2]))

    # --- checkpoints ------------------------------------------------------------------

    def _save(self, step: int) -> None:
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "monitor": self.monitor.state_dict(),
            "counters": dict(self.counters),
            "samples": self.samples,
            "torch_rng": torch.get_rng_state(),
        }
        if self.procs.main:
            ckpt.save_checkpoint(
                self.run_dir, step, self.model, self.tokenizer, state, keep=self.config.keep_checkpoints
            )
        self.procs.barrier()

    def _restore(self) -> int:
        state = self._restored  # read (and checked) in _prepare_run_dir
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.counters.update(state["counters"])
        self.samples = state["samples"]
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        if self.procs.main:
            _cut_metrics(self.run_dir / "metrics.jsonl", step)
        self.procs.barrier()
        return step

    # --- the end ----------------------------------------------------------------------

    def _answers(self) -> list[dict[str, str]]:
        if not self.procs.main or not self.data.prompts:
            return []
        return generate_answers(self.model, self.tokenizer, self.data.prompts, self.config.max_new_tokens, self.device)

    def _finish(self) -> dict[str, Any]:
        interrupted = None
        if self.stopped_at is not None:  # no answers "after": the run is not over, and the user is waiting
            interrupted = {
                "signal": self.stop.name or "a stop request",
                "step": self.stopped_at,
                "exit_code": exit_code(self.stop.signum or 0) if self.stop.signum else 1,
            }
        self.samples["after"] = [] if interrupted else self._answers()
        self.monitor.close()
        events = [e.to_record() for e in self.monitor.events]
        summary: dict[str, Any] = {}
        if self.procs.main:
            plots = plot_run(self.run_dir).paths if self.plots else []
            summary = {**summarize(self.run_dir, self.counters, events), "interrupted": interrupted}
            write_summary(self.run_dir, summary)
            atomic_write(
                self.run_dir / "samples.json", lambda f: f.write(json.dumps(self.samples, indent=2)), binary=False
            )
            write_report(self.run_dir, summary, self._setup_lines(), self.samples, self.data.report.lines(), plots)
            self._print_end(summary)
        self.procs.barrier()
        return summary

    def _setup_lines(self) -> dict[str, Any]:
        c = self.config
        return {
            "model": c.model,
            "parameters": f"{sum(p.numel() for p in self.model.parameters()):,}",
            "data": " ".join(c.data) or "built-in chats",
            "processes": self.procs.world,
            "device": str(self.device),
            "precision": c.precision,
            "steps": self.total_steps,
            "micro-batches per step": f"{self.per_step} ({c.grad_accum} per process)",
            "loss": json.dumps({k: v for k, v in self._loss_options().items() if v is not None}),
        }

    def _print_end(self, summary: dict[str, Any]) -> None:
        if summary["interrupted"]:
            stop = summary["interrupted"]
            self.log(
                f"interrupted by {stop['signal']} after step {stop['step']} of {self.total_steps}: checkpoint "
                f"saved; continue with: lmloss train --output-dir {self.run_dir} --resume"
            )
        for before, after in zip(self.samples.get("before", []), self.samples["after"]):
            self.log(f"Q: {before['prompt']}\n   before: {before['answer']!r}\n   after:  {after['answer']!r}")
        self.log(
            f"train loss {summary['first_train_loss']:.3f} -> {summary['last_train_loss']:.3f}; "
            + (
                f"eval loss {summary['first_eval_loss']:.3f} -> {summary['last_eval_loss']:.3f}; "
                if summary["first_eval_loss"] is not None
                else ""
            )
            + f"{summary['tokens_seen']:,} tokens in {summary['train_seconds']:.0f} s"
        )
        self.log(f"wrote {self.run_dir}/: summary.json, report.md, metrics.jsonl, plots/, checkpoints/")


# --------------------------------------------------------------------------------- helpers


def _builtin_prompt_record() -> Any:
    from lmloss.check import Record

    return Record(
        "builtin", 0, {"messages": BUILTIN_PROMPT + [{"role": "assistant", "content": "The capital is Beijing."}]}
    )


def _adamw(model: nn.Module, c: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.95), eps=1e-8)


def _schedule(optimizer: torch.optim.Optimizer, total: int, c: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    warmup = c.warmup_steps if c.warmup_steps is not None else max(1, round(0.05 * total))
    floor = c.min_lr_ratio

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _cut_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint (and any line cut
    mid-write), so that the resumed run continues one clean curve."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and int(record.get("step", step + 1)) <= step:
            kept.append(line)
    atomic_write(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))
