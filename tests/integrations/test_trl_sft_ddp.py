"""LMLossSFTTrainer under data parallelism: two real gloo processes, one optimizer step.

``Trainer`` runs the step (DDP through accelerate on CPU, ``gradient_accumulation_steps=2``,
two chats per micro-batch, ``assistant_only_loss``); a subclass records the micro-batches
each rank trained on, and a callback takes the gradients at ``on_pre_optimizer_step``
(after DDP's all-reduce, before the optimizer; no clipping). The truth is plain PyTorch in
the test process, float64, on a copy of the same initial model: the summed token NLL of
every micro-batch of both ranks divided by their total target count, one backward. Every
parameter's gradient is compared (the tied head/embedding included), float32 against
float64, within rtol 1e-4 plus 1e-5 of the largest |gradient|. Gradients, not parameters
after an AdamW step: AdamW would turn float noise in a gradient that is zero in exact
arithmetic into a full step. Float32 throughout (TRL's SFTConfig defaults to bf16).

The data is uneven on purpose: the ranks hold different target counts, and each rank's
two micro-batches too (short replies next to long multi-turn ones), so each wrong
normalisation (the mean of per-rank means, micro-batch means divided by the accumulation
steps, a missing world-size factor under ``average_tokens_across_devices``) is far off
the truth: the test checks that too, so it can fail.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import SFTConfig

from _dist import run_gloo
from lmloss.integrations.trl import LMLossSFTTrainer
from lmloss.train.builtin import build_tokenizer

WORLD, ACCUMULATION, PER_DEVICE = 2, 2, 2


def _chat(*turns: str, system: str | None = None) -> dict[str, Any]:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": role, "content": text} for role, text in zip(roles, turns)]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


# A sequential sampler shards consecutive batches round-robin: rank 0 trains chats 0-1 then
# 4-5, rank 1 chats 2-3 then 6-7 (the test reads what each rank really got, so it holds
# whatever the order; the layout only makes the unevenness certain).
CHATS = [
    _chat("Name a colour.", "Blue."),
    _chat("Is the sea wide?", "Yes.", system="You are a concise tutor."),
    _chat(
        "Please write a short poem about the sea.",
        "The sea is wide, the sea is deep, the waves roll on and never sleep, the sea is wide and the sea is deep.",
    ),
    _chat(
        "What is the capital of France?",
        "The capital of France is Paris, a city on the river Seine with many old bridges.",
        "And the capital of Italy?",
        "The capital of Italy is Rome, a very old city with many old churches and ruins.",
    ),
    _chat("Count from one to five.", "One, two, three, four, five.", "And back?", "Five, four, three, two, one."),
    _chat("Translate the word cat into French.", "The French word for cat is chat."),
    _chat("Thanks, that is helpful.", "You are welcome."),
    _chat("Hello there, how are you today?", "I am fine, thank you for asking.", system="Be polite."),
]


def _tokenizer() -> Any:
    return build_tokenizer([m["content"] for c in CHATS for m in c["messages"]], vocab_size=320)


def _tiny_qwen2(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return Qwen2ForCausalLM(config).float()


class _RecordingTrainer(LMLossSFTTrainer):
    """Records each step's micro-batches and ``num_items_in_batch`` as ``Trainer`` hands them out."""

    recorded: list[tuple[list[dict[str, torch.Tensor]], Any]]

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> Any:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.recorded.append(([{k: v.clone() for k, v in b.items()} for b in batches], num_items))
        return batches, num_items


class _GradientsBeforeStep(TrainerCallback):
    """The model's gradients after the all-reduce and before the optimizer uses them."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})


def _worker(rank: int, world_size: int, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    # run_gloo has initialised the process group; these variables make accelerate see a
    # multi-CPU launch and use that group (it initialises none while one exists).
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
    )
    grads = _GradientsBeforeStep()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = SFTConfig(
            output_dir=out,
            use_cpu=True,
            ddp_backend="gloo",
            per_device_train_batch_size=PER_DEVICE,
            gradient_accumulation_steps=ACCUMULATION,
            max_steps=1,
            max_grad_norm=0.0,  # no clipping: the callback sees the raw averaged gradient
            bf16=False,  # TRL's default is bf16 autocast; float32 here
            train_sampling_strategy="sequential",
            assistant_only_loss=True,
            max_length=256,  # no chat is cut
            disable_tqdm=True,
            dataset_num_proc=None,
            dataloader_num_workers=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
        )
        trainer = _RecordingTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(CHATS),
            processing_class=tokenizer,
            callbacks=[grads],
        )
        trainer.recorded = []
        trainer.train()
    ((batches, num_items),) = trainer.recorded
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "world": trainer.accelerator.num_processes,
        "grads": grads.grads,
        "batches": batches,
        "num_items": float(num_items),
        "logged_loss": losses,
    }


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["labels"][:, 1:]


def _summed_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The micro-batch's summed next-token NLL over its targets (labels shifted, -100 ignored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), _targets(batch).reshape(-1), ignore_index=-100, reduction="sum"
    )


def _gradient(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def launched() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The two ranks' results, and the float64 truths built from the batches they trained on."""
    tokenizer = _tokenizer()
    model = _tiny_qwen2(len(tokenizer))
    reference = copy.deepcopy(model).double()  # the same initial weights, float64
    ranks = run_gloo(_worker, WORLD, model, tokenizer)
    batches = [rank["batches"] for rank in ranks]  # batches[r][m]: rank r's micro-batch m
    counts = [[int((_targets(b) != -100).sum()) for b in rank] for rank in batches]
    total = sum(map(sum, counts))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The truth: one loss over the whole global batch, one backward.
        loss = sum(_summed_nll(reference, b) for rank in batches for b in rank) / total
        truth = _gradient(reference, loss)
        # For the wrong normalisations: each micro-batch's summed-NLL gradient, reweighted.
        per_batch = [[_gradient(reference, _summed_nll(reference, b)) for b in rank] for rank in batches]
    finally:
        torch.set_num_threads(threads)

    def combine(weight: Callable[[int, int], float]) -> dict[str, torch.Tensor]:
        """Sum over ranks r and micro-batches m of weight(r, m) * gradient of m's summed NLL."""
        return {
            name: sum(weight(r, m) * g[name] for r, rank in enumerate(per_batch) for m, g in enumerate(rank))
            for name in truth
        }

    wrong = {
        # average_tokens_across_devices off: each rank's own mean, DDP averages them
        "mean of per-rank means": combine(lambda r, m: 1.0 / (WORLD * sum(counts[r]))),
        # each micro-batch's own mean divided by the accumulation steps, DDP averages
        "micro-batch means / accumulation": combine(lambda r, m: 1.0 / (WORLD * ACCUMULATION * counts[r][m])),
        # the global count, but no world-size factor against DDP's average
        "no world-size factor": {name: g / WORLD for name, g in truth.items()},
    }
    return ranks, {"truth": truth, "wrong": wrong, "loss": float(loss.detach()), "counts": counts, "total": total}


def _excess(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The largest |got - expected| in units of the tolerance (rtol 1e-4, atol 1e-5 of the
    largest |gradient|): <= 1 passes. Float32 sums in another order differ by about 1e-7 of
    the gradient's scale (a gradient zero in exact arithmetic is such noise)."""
    assert got.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    return max(
        float(((got[n].double() - e).abs() / (1e-5 * scale + 1e-4 * e.abs())).max()) for n, e in expected.items()
    )


@pytest.mark.distributed
def test_data_is_uneven_across_ranks_and_micro_batches(launched):
    ranks, truths = launched
    counts = truths["counts"]
    assert all(rank["world"] == WORLD for rank in ranks)  # Trainer really ran data-parallel
    assert all(len(c) == ACCUMULATION for c in counts)
    assert sum(counts[0]) != sum(counts[1])
    assert all(c[0] != c[1] for c in counts)
    # Trainer's num_items_in_batch is the global count of the step, on both ranks.
    assert [rank["num_items"] for rank in ranks] == [truths["total"]] * WORLD


@pytest.mark.distributed
def test_ddp_step_gradient_equals_the_global_batch_gradient(launched):
    ranks, truths = launched
    for rank in ranks:
        (grads,) = rank["grads"]
        assert "model.embed_tokens.weight" in grads  # the tied head/embedding
        assert _excess(grads, truths["truth"]) <= 1.0
    # The logged training loss is the global batch's mean NLL.
    for rank in ranks:
        assert rank["logged_loss"] == [pytest.approx(truths["loss"], rel=1e-5)]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "wrong", ["mean of per-rank means", "micro-batch means / accumulation", "no world-size factor"]
)
def test_wrong_normalisations_are_far_outside_the_tolerance(launched, wrong):
    _, truths = launched
    assert _excess(truths["wrong"][wrong], truths["truth"]) > 100.0
