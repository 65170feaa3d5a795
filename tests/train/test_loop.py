"""End to end: ``lmloss train`` on a tiny config, its files, resume, kill, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmloss.monitor.sinks import read_jsonl
from lmloss.train import checkpoint as ckpt
from lmloss.train.config import TrainConfig
from lmloss.train.loop import train

# Seconds, not minutes: a tiny Qwen2, a 300-token vocabulary, a dozen steps.
TINY = dict(
    model="tiny",
    vocab_size=300,
    batch_size=4,
    grad_accum=2,
    max_length=96,
    samples=1,
    max_new_tokens=3,
    progress="none",
    lr=1e-2,
)


def tiny(tmp_path: Path, **changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **changes})


def train_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_jsonl(run_dir / "metrics.jsonl").records if r["split"] == "train"}


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval/loss"] for r in read_jsonl(run_dir / "metrics.jsonl").records if r["split"] == "eval"}


def test_tiny_run_learns_and_writes_its_files(tmp_path):
    summary = train(tiny(tmp_path, max_steps=16, eval_every=8, save_every=8), log=lambda _: None)
    run = tmp_path / "run"
    assert summary["steps"] == 16
    assert summary["last_train_loss"] < summary["first_train_loss"] - 1.0
    assert summary["best_eval_loss"] < summary["first_eval_loss"] - 1.0
    assert summary["tokens_seen"] > summary["target_tokens_seen"] > 0
    assert summary["tokens_per_second"] > 0
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("first_train_loss", "last_train_loss", "best_eval_loss", "tokens_seen", "tokens_per_second", "events"):
        assert key in on_disk
    assert sorted(eval_losses(run)) == [0, 8, 16]  # before training, every 8 steps
    assert TrainConfig(**json.loads((run / "config.json").read_text())) == tiny(
        tmp_path, max_steps=16, eval_every=8, save_every=8
    )
    assert (run / "plots" / "loss.png").stat().st_size > 10_000
    assert "## Answers" in (run / "report.md").read_text()
    samples = json.loads((run / "samples.json").read_text())
    assert samples["before"][0]["prompt"] == "Where is the capital of China?"
    assert len(samples["after"]) == 1
    assert ckpt.latest_checkpoint(run) == run / "checkpoints" / "step-0000016"


def test_checkpoint_is_a_loadable_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(tiny(tmp_path, max_steps=2), log=lambda _: None)
    path = ckpt.latest_checkpoint(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer) == 300
    state = ckpt.load_trainer_state(path)
    assert state["step"] == 2 and "optimizer" in state and "monitor" in state


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4 micro-batches of 2 samples per step = 1 micro-batch of 8 samples (same order)."""
    small = train(tiny(tmp_path / "a", batch_size=2, grad_accum=4, max_steps=4, packing=False), log=lambda _: None)
    big = train(tiny(tmp_path / "b", batch_size=8, grad_accum=1, max_steps=4, packing=False), log=lambda _: None)
    a, b = train_losses(tmp_path / "a" / "run"), train_losses(tmp_path / "b" / "run")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)
    assert small["last_train_loss"] == pytest.approx(big["last_train_loss"], rel=1e-5)


def test_resume_continues_exactly(tmp_path):
    """Stop after step 6 of 12 (a checkpoint, then the process ends), resume: the losses of
    steps 7..12 equal those of an uninterrupted run, to the bit (float32, CPU)."""
    whole = tiny(tmp_path / "whole", max_steps=12, save_every=6, eval_every=4)
    train(whole, log=lambda _: None)
    part = tiny(tmp_path / "part", max_steps=12, save_every=6, eval_every=4, keep_checkpoints=5)
    train(part, log=lambda _: None)
    run = tmp_path / "part" / "run"
    # Rewind the run to its step-6 checkpoint, as if it had been killed at step 9.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-0000012")
    (run / "checkpoints" / "latest").write_text("step-0000006\n")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 99, "split": "tr')  # a line cut mid-write by the kill
    train(TrainConfig(output_dir=str(run), resume=True, progress="none"), log=lambda _: None)
    assert train_losses(run) == train_losses(tmp_path / "whole" / "run")
    assert eval_losses(run) == eval_losses(tmp_path / "whole" / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["first_train_loss"] == train_losses(run)[1]


def test_resume_refuses_changed_math_and_missing_checkpoint(tmp_path):
    train(tiny(tmp_path, max_steps=2), log=lambda _: None)
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match="--lr"):
        train(TrainConfig(output_dir=run, resume=True, lr=0.5), log=lambda _: None)
    with pytest.raises(ValueError, match="differ from it: --train-turn-suffix"):  # it changes the labels
        train(TrainConfig(output_dir=run, resume=True, train_turn_suffix=True), log=lambda _: None)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(tmp_path, max_steps=2), log=lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(TrainConfig(output_dir=str(tmp_path / "empty"), resume=True), log=lambda _: None)
    with pytest.raises(ValueError, match="does not exist, so there is no run to continue"):
        train(TrainConfig(output_dir=str(tmp_path / "missing"), resume=True), log=lambda _: None)
    assert not (tmp_path / "missing").exists()


def test_resume_can_extend_the_run(tmp_path):
    train(tiny(tmp_path, max_steps=3), log=lambda _: None)
    summary = train(
        TrainConfig(output_dir=str(tmp_path / "run"), resume=True, max_steps=5, progress="none"), log=lambda _: None
    )
    assert summary["steps"] == 5
    assert sorted(train_losses(tmp_path / "run")) == [1, 2, 3, 4, 5]


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    train(tiny(tmp_path, max_steps=2), log=lambda _: None)
    run = tmp_path / "run"
    before = ckpt.latest_checkpoint(run)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the optimizer state is being written

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output_dir=str(run), resume=True, max_steps=3, progress="none"), log=lambda _: None)
    assert ckpt.latest_checkpoint(run) == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", before.name]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmloss.cli", "train", *args]


def _tiny_flags(run: Path, *extra: str) -> list[str]:
    return [
        "--output-dir",
        str(run),
        "--model",
        "tiny",
        "--vocab-size",
        "300",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--max-length",
        "96",
        "--samples",
        "0",
        "--progress",
        "none",
        "--lr",
        "0.01",
        *extra,
    ]


def test_killed_run_leaves_no_corrupt_checkpoint_and_resumes_exactly(tmp_path):
    """SIGKILL a real run while it checkpoints every step; every checkpoint left is
    complete and loadable, and resuming reproduces the uninterrupted losses."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    flags = ("--max-steps", "40", "--save-every", "1", "--eval-every", "10", "--keep-checkpoints", "3")
    subprocess.run(_cli(*_tiny_flags(whole, *flags)), check=True, capture_output=True)
    process = subprocess.Popen(_cli(*_tiny_flags(killed, *flags)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while ckpt.latest_checkpoint(killed) is None or ckpt.latest_checkpoint(killed).name < "step-0000005":
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    root = killed / "checkpoints"
    for path in root.glob("step-*"):  # under a final name: complete
        assert ckpt.is_complete(path)
        torch.load(path / "trainer_state.pt", weights_only=True)
        from safetensors.torch import load_file

        load_file(path / "model.safetensors")
    subprocess.run(_cli(*_tiny_flags(killed, "--resume")), check=True, capture_output=True)
    assert not list(root.glob(".step-*"))  # leftovers of the interrupted save are gone
    assert train_losses(killed) == train_losses(whole)


@pytest.mark.distributed
def test_torchrun_two_processes_equal_one_process(tmp_path):
    """2 processes x 2 micro-batches per step (DDP, gloo) = 1 process x 4 micro-batches, for
    the loss and for the z-loss share (both ride the step's one all-reduce)."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        _cli(*_tiny_flags(one, "--max-steps", "4", "--grad-accum", "4", "--packing", "--z-loss", "1e-2")),
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "lmloss.cli",
            "train",
            *_tiny_flags(two, "--max-steps", "4", "--grad-accum", "2", "--packing", "--z-loss", "1e-2"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4)
    z_one, z_two = (train_losses(run, "train/z_loss") for run in (one, two))
    for step in a:
        assert 0.05 < z_one[step] < a[step]
        assert z_two[step] == pytest.approx(z_one[step], rel=1e-4)
    assert eval_losses(two)[4] == pytest.approx(eval_losses(one)[4], rel=1e-4)
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["tokens_seen"] == summary_one["tokens_seen"]


def test_loss_options_and_bf16_reach_the_loss(tmp_path):
    """token_loss="dft" scales each token by p < 1, so its first loss is below plain CE's;
    bfloat16 autocast, padding and token budgets run end to end."""
    common = dict(max_steps=2, eval_every=2, packing=False, batch_tokens=300)
    ce = train(tiny(tmp_path / "ce", **common), log=lambda _: None)
    dft = train(tiny(tmp_path / "dft", token_loss="dft", precision="bfloat16", **common), log=lambda _: None)
    assert 0 < dft["first_train_loss"] < 0.1 * ce["first_train_loss"]  # p is about 1/300 at random init
    assert dft["first_eval_loss"] == pytest.approx(ce["first_eval_loss"], rel=2e-2)  # eval: plain CE (bf16 here)


def test_sequence_normalization_is_per_sample_when_packed(tmp_path):
    """normalize="sequence": a mean of per-sample means, whether samples are packed or padded."""
    common = dict(max_steps=2, normalize="sequence", batch_size=6, grad_accum=2)
    packed = train_losses_of(tmp_path / "p", packing=True, **common)
    padded = train_losses_of(tmp_path / "q", packing=False, **common)
    tokens = train_losses_of(tmp_path / "t", packing=True, **{**common, "normalize": "token"})
    assert packed[1] == pytest.approx(padded[1], rel=1e-5)
    assert packed[2] == pytest.approx(padded[2], rel=1e-4)
    assert abs(tokens[1] - packed[1]) > 1e-3  # the two normalizations do differ here


def train_losses_of(path: Path, **changes: object) -> dict[int, float]:
    train(tiny(path, **changes), log=lambda _: None)
    return train_losses(path / "run")


def test_z_loss_is_logged_as_its_share_of_the_loss(tmp_path):
    """--z-loss c logs train/z_loss = c * sum(lse^2) / N over all targets of the step (both
    micro-batches), computed here in float64 from the model's own logits; a run without
    z-loss logs no train/z_loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmloss.batching import PaddingCollator
    from lmloss.train.data import DataReport, TrainData, encode_records, epoch_micro_batches, load_records

    c = 1e-2
    # lr=0: the weights never change, so the checkpoint holds those of every step.
    config = tiny(tmp_path, max_steps=2, z_loss=c, lr=0.0, packing=False, eval_every=2, samples=0)
    train(config, log=lambda _: None)
    run = tmp_path / "run"
    logged = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl").records if r["split"] == "train"}
    path = ckpt.latest_checkpoint(run)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    sources, _ = load_records(config)
    encoded = [encode_records(s.records, tokenizer, config, DataReport(), s.name) for s in sources]
    micro = epoch_micro_batches(TrainData(encoded, [s.weight for s in sources], [], [], DataReport()), config, 0)
    collate = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    for step in (1, 2):
        batches = [collate(group) for group in micro[2 * (step - 1) : 2 * step]]  # grad_accum=2 micro-batches
        lse_squared, ce, n = 0.0, 0.0, 0
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                labels = b["labels"][:, 1:]
                scored = labels != -100
                lse = logits[scored].logsumexp(-1)
                lse_squared += float(lse.square().sum())
                ce += float(torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum"))
                n += int(scored.sum())
        z = c * lse_squared / n
        assert 0.1 < z < 1.0  # lse is about log(300) = 5.7 at random initialisation: a visible share
        assert logged[step]["train/z_loss"] == pytest.approx(z, rel=1e-4)
        assert logged[step]["train/loss"] == pytest.approx(ce / n + z, rel=1e-5)
    plain = tiny(tmp_path / "plain", max_steps=1, eval_every=1, samples=0)
    train(plain, log=lambda _: None)
    (record,) = [r for r in read_jsonl(tmp_path / "plain" / "run" / "metrics.jsonl").records if r["split"] == "train"]
    assert "train/z_loss" not in record


def test_empty_epoch_and_zero_clip_norm(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 plus 2?", "completion": " 4"}) + "\n")
    with pytest.raises(ValueError, match="epoch 0 has no sample"):
        train(tiny(tmp_path, data=[f"{data}:0.4"], eval_fraction=0.0, max_steps=1), log=lambda _: None)
    assert TrainConfig(max_grad_norm=0).max_grad_norm is None  # 0 means no clipping, not zero gradients
