"""LMLossDPOTrainer against TRL 1.16's own DPOTrainer on a tiny model built from a config."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer

from lmloss.integrations.trl import LMLossDPOTrainer
from lmloss.train.builtin import build_model, build_tokenizer

DATA = {
    "prompt": ["1+2=", "3+4=", "5+1=", "2+2="],
    "chosen": ["3", "7", "6", "4"],
    "rejected": ["4 or 5", "8", "9 9", "5"],
}


def _trainer(cls: type, tmp: Any, model: Any, ref: Any, tokenizer: Any, loss_type: list[str], ls: float) -> Any:
    from datasets import Dataset

    args = DPOConfig(
        output_dir=str(tmp / cls.__name__),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        loss_type=loss_type,
        label_smoothing=ls,
        beta=0.3,
    )
    return cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_dict(DATA), processing_class=tokenizer)


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    tokenizer = build_tokenizer(["1+2=3 3+4=7 5+1=6 2+2=4 or 8 9"] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(len(tokenizer))
    ref = build_model(len(tokenizer))  # a different reference, so the log-ratios are not 0
    return {"tokenizer": tokenizer, "model": model, "ref": ref}


@pytest.mark.parametrize(
    "loss_type, ls",
    [(["sigmoid"], 0.0), (["hinge"], 0.0), (["ipo"], 0.0), (["robust"], 0.2), (["sigmoid", "ipo"], 0.0)],
)
def test_same_batch_gives_trls_loss(
    parts: dict, tmp_path: Any, loss_type: list[str], ls: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmloss.integrations.trl import dpo

    calls: list[str] = []
    real = dpo.dpo_loss
    monkeypatch.setattr(dpo, "dpo_loss", lambda *a, **k: calls.append(k["loss_type"]) or real(*a, **k))
    results = []
    for cls in (DPOTrainer, LMLossDPOTrainer):
        trainer = _trainer(
            cls, tmp_path, copy.deepcopy(parts["model"]), copy.deepcopy(parts["ref"]), parts["tokenizer"], loss_type, ls
        )
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grad = trainer.model.get_output_embeddings().weight.grad.clone()
        results.append((loss.detach(), grad, dict(trainer._metrics["train"])))
    (loss_t, grad_t, m_t), (loss_o, grad_o, m_o) = results
    assert calls == loss_type, "the loss came from lmloss.preference"
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_o, grad_t, rtol=1e-4, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert m_o[key][0] == pytest.approx(m_t[key][0], rel=1e-4, abs=1e-6)
