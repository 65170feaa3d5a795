"""LMLossGRPOTrainer against TRL 1.16's own GRPOTrainer on a tiny model built from a config."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer

from lmloss.integrations.trl import LMLossGRPOTrainer
from lmloss.train.builtin import build_model, build_tokenizer

PROMPTS = ["1+2=", "3+4=", "5+1=", "2+2="]


def _reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c) % 3) for c in completions]  # varied, so advantages are not all 0


def _trainer(cls: type, tmp_path: Any, model: Any, tokenizer: Any, **overrides: Any) -> Any:
    from datasets import Dataset

    args = GRPOConfig(
        output_dir=str(tmp_path / cls.__name__),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        bf16=False,
        **overrides,  # float32: TRL defaults to bf16 autocast
    )
    return cls(
        model=model,
        reward_funcs=_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("grpo")
    tokenizer = build_tokenizer(["1+2=3 3+4=7 5+1=6 2+2=4 0 8 9"] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(len(tokenizer))
    theirs = _trainer(GRPOTrainer, tmp, copy.deepcopy(model), tokenizer)
    ours = _trainer(LMLossGRPOTrainer, tmp, copy.deepcopy(model), tokenizer)
    torch.manual_seed(1)
    batch = [{"prompt": p} for p in PROMPTS]
    inputs = theirs._generate_and_score_completions(batch)
    b, t = inputs["completion_ids"].shape
    g = torch.Generator().manual_seed(2)
    inputs["completion_mask"][0, -2:] = 0  # uneven lengths
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()  # TRL counts the (now smaller) mask
    # Give the policy something to clip and a reference to be away from.
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, mask, t)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(b, t, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(b, t, generator=g)
    inputs["advantages"] = torch.randn(b, generator=g)
    for trainer in (theirs, ours):
        trainer.current_gradient_accumulation_steps = 1  # set by train(); one micro-batch per step here
        trainer.model.train()
    return {"theirs": theirs, "ours": ours, "inputs": inputs}


@pytest.fixture(autouse=True)
def lmloss_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each loss computed by lmloss.rl inside the trainer (so no test passes on a TRL fallback)."""
    from lmloss.integrations.trl import grpo

    calls: list[str] = []
    real = grpo.policy_loss

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["loss_type"])
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    return calls


def _loss_and_grad(trainer: Any, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), trainer.model.get_output_embeddings().weight.grad.clone()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_same_batch_gives_trls_loss(setup: dict, loss_type: str, level: str, beta: float, lmloss_calls: list) -> None:
    for trainer in (setup["theirs"], setup["ours"]):
        trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
        trainer.epsilon_high = 3.0 if loss_type == "cispo" else 0.2
    loss_t, grad_t = _loss_and_grad(setup["theirs"], setup["inputs"])
    loss_o, grad_o = _loss_and_grad(setup["ours"], setup["inputs"])
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_o, grad_t, rtol=1e-4, atol=1e-6)
    assert lmloss_calls == [loss_type]
    assert setup["ours"]._metrics["train"]["entropy"], "metrics are logged under TRL's names"


VESPO_GAMMA = {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 1.2}


@pytest.mark.parametrize("gamma", [{}, VESPO_GAMMA])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("correction", [False, True])
def test_vespo_gives_trls_loss(setup: dict, gamma: dict, beta: float, correction: bool, lmloss_calls: list) -> None:
    """TRL's vespo, with its defaults and other k/lambda, both advantage signs in the batch."""
    assert (setup["inputs"]["advantages"] > 0).any() and (setup["inputs"]["advantages"] < 0).any()
    saved = {name: getattr(setup["ours"].args, name) for name in [*VESPO_GAMMA, "use_bias_correction_kl"]}
    try:
        for trainer in (setup["theirs"], setup["ours"]):
            trainer.loss_type, trainer.importance_sampling_level, trainer.beta = "vespo", "token", beta
            trainer.args.use_bias_correction_kl = correction
            for name, value in gamma.items():
                setattr(trainer.args, name, value)
            trainer._metrics["train"].clear()
        loss_t, grad_t = _loss_and_grad(setup["theirs"], setup["inputs"])
        loss_o, grad_o = _loss_and_grad(setup["ours"], setup["inputs"])
    finally:
        for trainer in (setup["theirs"], setup["ours"]):
            for name, value in saved.items():
                setattr(trainer.args, name, value)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_o, grad_t, rtol=1e-4, atol=1e-6)
    assert lmloss_calls == ["vespo"]
    phi_t, phi_o = (t._metrics["train"]["vespo/phi_seq_mean"] for t in (setup["theirs"], setup["ours"]))
    assert phi_o == pytest.approx(phi_t, rel=1e-5) and phi_t[0] != pytest.approx(1.0, abs=1e-3)


def test_vespo_at_sequence_level_falls_back_to_trl(setup: dict, lmloss_calls: list) -> None:
    """TRL only warns about vespo with importance_sampling_level='sequence'; lmloss refuses it,
    so the trainer leaves that combination to TRL's loss (same result, no lmloss call)."""
    for trainer in (setup["theirs"], setup["ours"]):
        trainer.loss_type, trainer.importance_sampling_level, trainer.beta = "vespo", "sequence", 0.05
    loss_t, grad_t = _loss_and_grad(setup["theirs"], setup["inputs"])
    loss_o, grad_o = _loss_and_grad(setup["ours"], setup["inputs"])
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_o, grad_t, rtol=1e-4, atol=1e-6)
    assert lmloss_calls == []


def test_bnpo_is_exact_over_uneven_micro_batches_where_trl_is_not(setup: dict, lmloss_calls: list) -> None:
    """Two micro-batches with different token counts: lmloss sums to the big batch's token mean."""
    ours, theirs, inputs = setup["ours"], setup["theirs"], setup["inputs"]
    halves = [
        {k: (v[:2] if torch.is_tensor(v) and v.ndim and v.shape[0] == 4 else v) for k, v in inputs.items()},
        {k: (v[2:] if torch.is_tensor(v) and v.ndim and v.shape[0] == 4 else v) for k, v in inputs.items()},
    ]
    assert halves[0]["completion_mask"].sum() != halves[1]["completion_mask"].sum()
    for trainer in (ours, theirs):
        trainer.loss_type, trainer.importance_sampling_level, trainer.beta = "bnpo", "token", 0.0
        trainer.epsilon_high = 0.2
    theirs.current_gradient_accumulation_steps = ours.current_gradient_accumulation_steps = 1
    big = ours.compute_loss(ours.model, dict(inputs)).item()
    assert big == pytest.approx(theirs.compute_loss(theirs.model, dict(inputs)).item(), rel=1e-5)
    try:
        for trainer in (ours, theirs):
            trainer.current_gradient_accumulation_steps = 2
            trainer.args.steps_per_generation = 2
        ours_split = sum(ours.compute_loss(ours.model, dict(h)).item() for h in halves)
        trl_split = sum(theirs.compute_loss(theirs.model, dict(h)).item() for h in halves)
    finally:
        for trainer in (ours, theirs):
            trainer.current_gradient_accumulation_steps = 1
            trainer.args.steps_per_generation = 1
    assert lmloss_calls == ["bnpo"] * 3
    assert ours_split == pytest.approx(big, rel=1e-5)
    assert abs(trl_split - big) > 1e-4


def test_a_real_training_step_logs_the_same_loss(tmp_path: Any, lmloss_calls: list) -> None:
    """One full GRPOTrainer.train() step each (generation included), same seed: same logged loss."""
    tokenizer = build_tokenizer(["1+2=3 3+4=7 5+1=6 2+2=4 0 8 9"] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(len(tokenizer))
    logged = []
    for cls in (GRPOTrainer, LMLossGRPOTrainer):
        trainer = _trainer(cls, tmp_path, copy.deepcopy(model), tokenizer, loss_type="dapo")
        torch.manual_seed(3)
        trainer.train()
        logged.append(next(h["loss"] for h in trainer.state.log_history if "loss" in h))
    assert lmloss_calls == ["dapo"]
    assert logged[1] == pytest.approx(logged[0], rel=1e-5, abs=1e-7)
