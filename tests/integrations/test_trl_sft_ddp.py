"""LMLossSFTTrainer under data parallelism: two real gloo processes, one optimizer step.

``Trainer`` runs the step (DDP through accelerate on CPU, ``gradient_accumulation_steps=2``,
two chats per micro-batch, ``assistant_only_loss``); a subclass records the micro-batches
each rank trained on, and a callback takes the gradients at ``on_pre_optimizer_step``
(after DDP's all-reduce, before the optimizer; no clipping). One launch trains three
configurations one after the other, each from the same initial weights (``CONFIGS``):

- ``normalize="token"`` (``average_tokens_across_devices``, the default): the summed
  token NLL of every micro-batch of both ranks divided by their total target count;
- ``normalize="sequence"``: the mean, over every sequence of the global batch (both
  ranks, both micro-batches), of that sequence's own token-mean NLL;
- ``normalize="token"`` with ``average_tokens_across_devices=False``: what ``Trainer``
  itself does then (each rank divides by its own target count, DDP averages the
  ranks' gradients): the mean over ranks of (the rank's summed NLL / its target count).

The truths are plain PyTorch in the test process, float64, on a copy of the same initial
model: one loss built from the batches the ranks trained on, one backward. Every
parameter's gradient is compared (the tied head/embedding included), float32 against
float64, within rtol 1e-4 plus 1e-5 of the largest |gradient|. Gradients, not parameters
after an AdamW step: AdamW would turn float noise in a gradient that is zero in exact
arithmetic into a full step. Float32 throughout (TRL's SFTConfig defaults to bf16).

The data is uneven on purpose: the ranks hold different target counts, and each rank's
two micro-batches too (short replies next to long multi-turn ones), and, with seven chats
and ``even_batches=False``, different sequence counts (rank 1's last micro-batch holds
one chat). So each wrong normalisation (the mean of per-rank means, micro-batch means
divided by the accumulation steps, a missing world-size factor, the global mean where
``Trainer`` takes per-rank ones) is far off its truth: the test checks that too, so it can
fail. (With equal sequence counts per rank the mean of per-rank sequence means would equal
the global one; TRL drops chats without targets, so only the row counts can differ.)
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

# name -> (LMLossSFTTrainer's normalize, SFTConfig's average_tokens_across_devices)
CONFIGS: dict[str, tuple[str, bool]] = {
    "token": ("token", True),
    "sequence": ("sequence", True),
    "token, per-rank counts": ("token", False),
}


def _chat(*turns: str, system: str | None = None) -> dict[str, Any]:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": role, "content": text} for role, text in zip(roles, turns)]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


# A sequential sampler shards consecutive batches round-robin: rank 0 trains chats 0-1 then
# 4-5, rank 1 chats 2-3 then 6 alone (even_batches=False: no chat repeated to fill it). The
# test reads what each rank really got, so it holds whatever the order; the layout only
# makes the unevenness certain.
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


def _train(model: torch.nn.Module, tokenizer: Any, normalize: str, average_tokens: bool) -> dict[str, Any]:
    """One optimizer step of ``model`` (trained in place) under one configuration."""
    grads = _GradientsBeforeStep()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = SFTConfig(
            output_dir=out,
            use_cpu=True,
            ddp_backend="gloo",
            per_device_train_batch_size=PER_DEVICE,
            gradient_accumulation_steps=ACCUMULATION,
            average_tokens_across_devices=average_tokens,
            accelerator_config={"even_batches": False},  # the last micro-batch stays short
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
            normalize=normalize,
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


def _worker(rank: int, world_size: int, model: torch.nn.Module, tokenizer: Any) -> dict[str, dict[str, Any]]:
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
    # Each configuration trains its own copy of the initial weights.
    return {name: _train(copy.deepcopy(model), tokenizer, *config) for name, config in CONFIGS.items()}


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["labels"][:, 1:]


def _row_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token NLL over its targets (labels shifted, -100 ignored) and
    its target count: two ``[batch]`` float64 tensors."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].double()
    targets = _targets(batch)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return nll.view(targets.shape).sum(-1), (targets != -100).sum(-1).double()


def _summed_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The micro-batch's summed token NLL."""
    return _row_nll(model, batch)[0].sum()


def _summed_sequence_means(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum over the micro-batch's rows with a target of each row's own mean token NLL."""
    sums, counts = _row_nll(model, batch)
    has = counts > 0
    return (sums[has] / counts[has]).sum()


def _sequences(batch: dict[str, torch.Tensor]) -> int:
    return int((_targets(batch) != -100).any(-1).sum())


def _gradient(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def launched() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Each configuration's results on the two ranks, and the float64 truths built from the
    batches they trained on (the same in every configuration)."""
    tokenizer = _tokenizer()
    model = _tiny_qwen2(len(tokenizer))
    reference = copy.deepcopy(model).double()  # the same initial weights, float64
    results = run_gloo(_worker, WORLD, model, tokenizer)
    runs = {name: [rank[name] for rank in results] for name in CONFIGS}  # runs[config][rank]
    batches = [rank["batches"] for rank in runs["token"]]  # batches[r][m]: rank r's micro-batch m
    for name, ranks in runs.items():  # every configuration trained on the same micro-batches
        for rank, own in zip(ranks, batches):
            assert len(rank["batches"]) == len(own)
            assert all(torch.equal(b["labels"], o["labels"]) for b, o in zip(rank["batches"], own)), name
    counts = [[int((_targets(b) != -100).sum()) for b in rank] for rank in batches]
    sequences = [[_sequences(b) for b in rank] for rank in batches]
    total, total_sequences = sum(map(sum, counts)), sum(map(sum, sequences))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The truths: one loss over the whole global batch, one backward.
        losses = {
            "token": sum(_summed_nll(reference, b) for rank in batches for b in rank) / total,
            "sequence": sum(_summed_sequence_means(reference, b) for rank in batches for b in rank) / total_sequences,
            "token, per-rank counts": sum(
                sum(_summed_nll(reference, b) for b in rank) / sum(c) for rank, c in zip(batches, counts)
            )
            / WORLD,
        }
        truth = {name: _gradient(reference, loss) for name, loss in losses.items()}
        # For the wrong normalisations: each micro-batch's summed-NLL (and summed sequence
        # means) gradient, reweighted.
        per_batch = [[_gradient(reference, _summed_nll(reference, b)) for b in rank] for rank in batches]
        per_batch_seq = [[_gradient(reference, _summed_sequence_means(reference, b)) for b in rank] for rank in batches]
    finally:
        torch.set_num_threads(threads)

    def combine(grads: list[list[dict[str, torch.Tensor]]], weight: Callable[[int, int], float]) -> Any:
        """Sum over ranks r and micro-batches m of weight(r, m) * grads[r][m]."""
        return {
            name: sum(weight(r, m) * g[name] for r, rank in enumerate(grads) for m, g in enumerate(rank))
            for name in truth["token"]
        }

    wrong = {
        "token": {
            # average_tokens_across_devices off: each rank's own mean, DDP averages them
            "mean of per-rank means": combine(per_batch, lambda r, m: 1.0 / (WORLD * sum(counts[r]))),
            # each micro-batch's own mean divided by the accumulation steps, DDP averages
            "micro-batch means / accumulation": combine(
                per_batch, lambda r, m: 1.0 / (WORLD * ACCUMULATION * counts[r][m])
            ),
            # the global count, but no world-size factor against DDP's average
            "no world-size factor": {name: g / WORLD for name, g in truth["token"].items()},
        },
        "sequence": {
            # each rank's sequence count, DDP averages the ranks' means
            "mean of per-rank means": combine(per_batch_seq, lambda r, m: 1.0 / (WORLD * sum(sequences[r]))),
            # each micro-batch's own sequence mean divided by the accumulation steps
            "micro-batch means / accumulation": combine(
                per_batch_seq, lambda r, m: 1.0 / (WORLD * ACCUMULATION * sequences[r][m])
            ),
            # the token normalisation instead
            "token mean": truth["token"],
        },
        "token, per-rank counts": {
            # the global count (what average_tokens_across_devices=True gives)
            "global token mean": truth["token"],
        },
    }
    return runs, {
        "truth": truth,
        "wrong": wrong,
        "loss": {name: float(loss.detach()) for name, loss in losses.items()},
        "counts": counts,
        "sequences": sequences,
    }


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
    runs, truths = launched
    counts, sequences = truths["counts"], truths["sequences"]
    assert all(rank["world"] == WORLD for ranks in runs.values() for rank in ranks)  # really data-parallel
    assert all(len(c) == ACCUMULATION for c in counts)
    assert sum(counts[0]) != sum(counts[1])
    assert all(c[0] != c[1] for c in counts)
    assert sum(sequences[0]) != sum(sequences[1])  # else per-rank sequence means average to the global one


@pytest.mark.distributed
def test_num_items_in_batch(launched):
    runs, truths = launched
    counts, sequences = truths["counts"], truths["sequences"]
    # average_tokens_across_devices: the step's global count on both ranks (targets or sequences)
    assert [rank["num_items"] for rank in runs["token"]] == [sum(map(sum, counts))] * WORLD
    assert [rank["num_items"] for rank in runs["sequence"]] == [sum(map(sum, sequences))] * WORLD
    # without it, as in Trainer: each rank's own target count
    assert [rank["num_items"] for rank in runs["token, per-rank counts"]] == [sum(c) for c in counts]


@pytest.mark.distributed
@pytest.mark.parametrize("config", list(CONFIGS))
def test_ddp_step_gradient_equals_the_truth(launched, config):
    runs, truths = launched
    for rank in runs[config]:
        (grads,) = rank["grads"]
        assert "model.embed_tokens.weight" in grads  # the tied head/embedding
        assert _excess(grads, truths["truth"][config]) <= 1.0
    # The logged training loss is the truth's loss (Trainer averages the ranks' logged losses).
    for rank in runs[config]:
        assert rank["logged_loss"] == [pytest.approx(truths["loss"][config], rel=1e-5)]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "config, wrong",
    [
        ("token", "mean of per-rank means"),
        ("token", "micro-batch means / accumulation"),
        ("token", "no world-size factor"),
        ("sequence", "mean of per-rank means"),
        ("sequence", "micro-batch means / accumulation"),
        ("sequence", "token mean"),
        ("token, per-rank counts", "global token mean"),
    ],
)
def test_wrong_normalisations_are_far_outside_the_tolerance(launched, config, wrong):
    _, truths = launched
    assert _excess(truths["wrong"][config][wrong], truths["truth"][config]) > 100.0
