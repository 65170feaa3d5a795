"""``LossMonitorCallback`` in a real transformers ``Trainer`` (tiny model, built locally)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmloss.monitor import LossMonitor, read_jsonl

transformers = pytest.importorskip("transformers")
from lmloss.monitor import LossMonitorCallback  # noqa: E402  (needs transformers)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 32, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_trainer(tmp_path, callback: LossMonitorCallback) -> transformers.Trainer:
    config = transformers.Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        include_num_input_tokens_seen="all",
    )
    return transformers.Trainer(
        model=transformers.Qwen2ForCausalLM(config),
        args=args,
        train_dataset=RandomTokens(48, 0),
        eval_dataset=RandomTokens(8, 1),
        callbacks=[callback],
    )


def test_trainer_callback_writes_the_run_directory_and_plots(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    callback = LossMonitorCallback(run_dir=tmp_path / "run")
    tiny_trainer(tmp_path, callback).train()
    log = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in log.records if r["split"] == "train"]
    evals = [r for r in log.records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13)) and [r["step"] for r in evals] == [4, 8, 12]
    assert all(math.isfinite(r["train/loss"]) and r["train/lr"] > 0 and "train/grad_norm" in r for r in train)
    # include_num_input_tokens_seen: 4 rows x 16 input tokens per step, so tokens/s from step 2 on.
    assert [r.get("train/tokens") for r in train[1:]] == [64] * 11 and "throughput/tokens_per_s" in train[-1]
    assert train[0]["train/loss"] == pytest.approx(math.log(32), abs=0.5)  # an untrained model: ~uniform
    assert (tmp_path / "run" / "plots" / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "plots" / "overview.png").exists()


def test_callback_through_the_trainers_callback_handler(tmp_path):
    """The calls a Trainer makes, through transformers' own dispatcher. ``TrainingArguments``
    needs accelerate; the callback reads only ``output_dir`` from it."""
    args = SimpleNamespace(output_dir=str(tmp_path / "out"))
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback = LossMonitorCallback()
    handler = transformers.trainer_callback.CallbackHandler([callback], None, None, None, None)
    handler.on_train_begin(args, state, control)
    for step in range(1, 31):
        state.global_step = step
        logs = {"loss": 3.0 / step**0.5, "grad_norm": 1.0, "learning_rate": 1e-3, "num_input_tokens_seen": 64 * step}
        handler.on_log(args, state, control, logs)
        if step % 10 == 0:
            handler.on_log(args, state, control, {"eval_loss": 3.2 / step**0.5, "eval_runtime": 0.1})
    handler.on_log(args, state, control, {"train_runtime": 1.0, "train_loss": 1.0})  # the final summary
    handler.on_train_end(args, state, control)
    run_dir = tmp_path / "out"  # the default run directory: the Trainer's output_dir
    log = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in log.records if r["split"] == "eval"] == [10, 20, 30]
    train = [r for r in log.records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31)) and train[-1]["train/loss"] == 3.0 / 30**0.5
    assert [r.get("train/tokens") for r in train[:3]] == [None, 64, 64]
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "grad_norm.png",
        "loss.png",
        "lr.png",
        "overview.png",
        "perplexity.png",
        "throughput.png",
    ]


def test_trainer_callback_stops_on_the_events_asked_for():
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback = LossMonitorCallback(LossMonitor(), stop_on=("nan",), plot=False)
    for step, loss in enumerate([2.0, 1.9, float("nan")], start=1):
        state.global_step = step
        callback.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
        assert control.should_training_stop == (step == 3)
    assert [e.kind for e in callback.events] == ["nan"]
    with pytest.raises(ValueError, match="unknown event kind"):
        LossMonitorCallback(stop_on=("explosion",))
    with pytest.raises(TypeError, match="LossMonitor or None"):
        LossMonitorCallback(monitor=object())  # type: ignore[arg-type]  # a wrong type on purpose
