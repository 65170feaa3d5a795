"""LMLossSFTTrainer against TRL's own SFTTrainer: tiny random-weight models, float32, CPU.

Truths: TRL 1.16's own loss, gradients and metrics (its fused LM head) on the same model
copy and batch, with chats, assistant-only, completion-only and packed (padding-free)
data; with lmloss's options, ``lmloss.causal_lm_loss`` on the model's own logits.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import lmloss
from lmloss.integrations import transformers as lmloss_hf
from lmloss.integrations.trl import LMLossSFTTrainer
from lmloss.train.builtin import build_model, build_tokenizer, builtin_conversations

CHATS = builtin_conversations()[:12]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([m["content"] for c in builtin_conversations() for m in c["messages"]])


def _qwen2(tokenizer):
    torch.manual_seed(0)
    return build_model(len(tokenizer)).float()


def _llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _data(kind):
    if kind == "completion":
        rows = [{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]} for c in CHATS]
    else:
        rows = [{"messages": c["messages"]} for c in CHATS]
    return Dataset.from_list(rows)


def _config(kind, **extra):
    options = dict(
        output_dir="/tmp/lmloss-trl-test",
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        max_length=128,
        dataset_num_proc=None,
        assistant_only_loss=kind == "assistant",
        packing=kind == "packing",
    )
    options.update(extra)
    return SFTConfig(**options)


def _trainer(cls, model, tokenizer, kind, config_extra=None, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(
            model=model,
            args=_config(kind, **(config_extra or {})),
            train_dataset=_data(kind),
            processing_class=tokenizer,
            **options,
        )


def _batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return dict(batch.items())


KINDS = ["chats", "assistant", "completion", "packing"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("build", [_qwen2, _llama], ids=["qwen2", "llama"])
def test_default_loss_gradient_and_metrics_equal_trl(tokenizer, kind, build):
    model = build(tokenizer)
    theirs = _trainer(SFTTrainer, copy.deepcopy(model), tokenizer, kind)
    ours = _trainer(LMLossSFTTrainer, model, tokenizer, kind)
    batch = _batch(theirs)
    if kind == "packing":
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one padding-free row
    if kind in ("assistant", "completion"):
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    results = []
    for trainer in (theirs, ours):
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        head = trainer.model.get_output_embeddings().weight.grad
        metrics = {k: trainer._metrics["train"][k][-1] for k in ("entropy", "mean_token_accuracy")}
        results.append((loss.detach(), head.clone(), metrics))
    (loss_t, grad_t, metrics_t), (loss_o, grad_o, metrics_o) = results
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_o, grad_t, rtol=1e-4, atol=1e-7)
    assert metrics_o["mean_token_accuracy"] == pytest.approx(metrics_t["mean_token_accuracy"], abs=1e-6)
    assert metrics_o["entropy"] == pytest.approx(metrics_t["entropy"], rel=1e-5)


OPTIONS = [
    dict(label_smoothing=0.3),
    dict(z_loss=1e-2),
    dict(softcap=4.0),
    dict(token_loss="dft"),
    dict(token_loss="focal", focal_gamma=1.5),
    dict(label_smoothing=0.1, z_loss=1e-3, token_loss="focal_attached", focal_gamma=2.0),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("kind", ["assistant", "packing"])
def test_options_equal_causal_lm_loss_on_the_models_logits(tokenizer, options, kind):
    model = _qwen2(tokenizer)
    plain = copy.deepcopy(model)
    ours = _trainer(LMLossSFTTrainer, model, tokenizer, kind, **options)
    batch = _batch(ours)
    ours.model.train()
    num_items = int((batch["labels"][:, 1:] != -100).sum()) + 5  # a step larger than this micro-batch
    loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    logits = plain(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = lmloss.causal_lm_loss(logits, batch["labels"], num_items_in_batch=num_items, **options)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, plain.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_normalize_sequence_counts_the_steps_sequences(tokenizer):
    model = _qwen2(tokenizer)
    plain = copy.deepcopy(model)
    ours = _trainer(
        LMLossSFTTrainer,
        model,
        tokenizer,
        "assistant",
        normalize="sequence",
        config_extra=dict(gradient_accumulation_steps=2),
    )
    batches, count = ours.get_batch_samples(iter(ours.get_train_dataloader()), 2, torch.device("cpu"))
    assert int(count) == 8  # two micro-batches of 4 chats, each with answers
    loss = ours.compute_loss(ours.model, dict(batches[0]), num_items_in_batch=count)
    logits = plain(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    expected = lmloss.causal_lm_loss(logits, batches[0]["labels"], normalize="sequence", num_items_in_batch=8)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_one_forward_per_step_and_no_logits(tokenizer):
    model = _qwen2(tokenizer)
    ours = _trainer(LMLossSFTTrainer, model, tokenizer, "chats", label_smoothing=0.1)
    calls, shapes = [], []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    ours.compute_loss(ours.model, _batch(ours))
    assert len(calls) == 1 and shapes[0][1] == 0  # the head multiplied no position


def test_training_logs_trl_metrics(tokenizer):
    ours = _trainer(
        LMLossSFTTrainer,
        _qwen2(tokenizer),
        tokenizer,
        "assistant",
        z_loss=1e-4,
        config_extra=dict(gradient_accumulation_steps=2, max_steps=2),
    )
    ours.train()
    logged = [entry for entry in ours.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["loss"] > 0 and 0 <= entry["mean_token_accuracy"] <= 1 and entry["entropy"] > 0
        assert entry["num_tokens"] > 0


def test_apply_then_trl_sft_trainer_raises_instead_of_training_trls_loss(tokenizer):
    # Reproduction: apply(model, label_smoothing=0.5), then SFTTrainer trained on TRL's plain loss.
    model = lmloss_hf.apply(_qwen2(tokenizer), label_smoothing=0.5)
    trainer = _trainer(SFTTrainer, model, tokenizer, "chats")
    batch = _batch(trainer)
    with pytest.raises(RuntimeError, match="LMLossSFTTrainer"):
        trainer.compute_loss(trainer.model, dict(batch))
    assert lmloss_hf.trl_fused_head_installed(model)
    # Calls that go through the model's forward still work: generation-style calls and loss calls.
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"][:1, :8]).logits.shape[-1] == len(tokenizer)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert out.logits is None and torch.isfinite(out.loss)


def test_applied_model_is_refused(tokenizer):
    model = lmloss_hf.apply(_qwen2(tokenizer), z_loss=1e-4)
    with pytest.raises(ValueError, match="remove"):
        _trainer(LMLossSFTTrainer, model, tokenizer, "chats", z_loss=1e-4)


@pytest.mark.parametrize(
    "options, config_extra, match",
    [
        (dict(label_smoothing=1.5), {}, "label_smoothing"),
        (dict(token_loss="focal", focal_gamma=-1.0), {}, "focal_gamma"),
        (dict(backend="nope"), {}, "backend"),
        (dict(token_loss="focal"), dict(loss_type="dft"), "loss_type"),
        (dict(label_smoothing=0.2), dict(label_smoothing_factor=0.1), "label_smoothing"),
        (dict(normalize="sequence"), dict(packing=True), "sequence"),
        (dict(compute_loss_func=lambda *a, **k: 0), {}, "compute_loss_func"),
    ],
)
def test_bad_options_raise(tokenizer, options, config_extra, match):
    with pytest.raises(ValueError, match=match):
        _trainer(LMLossSFTTrainer, _qwen2(tokenizer), tokenizer, "chats", config_extra=config_extra, **options)


def test_trl_spellings_map_to_lmloss_options(tokenizer):
    ours = _trainer(
        LMLossSFTTrainer,
        _qwen2(tokenizer),
        tokenizer,
        "chats",
        config_extra=dict(loss_type="dft", label_smoothing_factor=0.2),
    )
    assert ours.lmloss_options["token_loss"] == "dft" and ours.lmloss_options["label_smoothing"] == 0.2
    assert ours.label_smoother is None


def test_evaluate_loss_equals_trl(tokenizer):
    model = _qwen2(tokenizer)
    results = []
    for cls, copy_of in ((SFTTrainer, copy.deepcopy(model)), (LMLossSFTTrainer, model)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(
                model=copy_of,
                args=_config("assistant", per_device_eval_batch_size=4),
                train_dataset=_data("assistant"),
                eval_dataset=_data("assistant"),
                processing_class=tokenizer,
            )
        results.append(trainer.evaluate())
    theirs, ours = results
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
    assert ours["eval_mean_token_accuracy"] == pytest.approx(theirs["eval_mean_token_accuracy"], abs=1e-6)


def test_z_loss_term_is_logged_as_its_own_metric(tokenizer):
    model = _qwen2(tokenizer)
    plain = copy.deepcopy(model)
    ours = _trainer(LMLossSFTTrainer, model, tokenizer, "assistant", z_loss=0.01)
    batch = _batch(ours)
    ours.compute_loss(ours.model, dict(batch))
    with torch.no_grad():
        logits = plain(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].double()
    scored = batch["labels"][:, 1:] != -100
    expected = 0.01 * torch.logsumexp(logits[scored], dim=-1).square().mean()
    assert ours._metrics["train"]["z_loss"][-1] == pytest.approx(expected.item(), rel=1e-5)
    without = _trainer(LMLossSFTTrainer, copy.deepcopy(plain), tokenizer, "assistant")
    without.compute_loss(without.model, dict(batch))
    assert "z_loss" not in without._metrics["train"]


def test_ignored_token_ids_are_not_counted_in_the_step(tokenizer):
    """Trainer counts num_items_in_batch from the collated labels: ids the loss never trains
    (e.g. image placeholders appearing as targets) must not be counted there either, or the
    mean would be over more targets than are trained."""
    model = _qwen2(tokenizer)
    plain = _trainer(SFTTrainer, copy.deepcopy(model), tokenizer, "chats")
    features = [plain.train_dataset[i] for i in range(4)]
    raw = plain.data_collator(features)["labels"]
    values, counts = raw[raw != -100].unique(return_counts=True)
    ids = tuple(int(v) for v in values[counts.argsort(descending=True)[:2]])  # two frequent targets
    ours = _trainer(LMLossSFTTrainer, model, tokenizer, "chats", ignore_token_ids=ids)
    hits = torch.isin(raw, torch.tensor(ids))
    batch = ours.data_collator(features)
    assert torch.equal(batch["labels"], raw.masked_fill(hits, -100))
    loaded = next(iter(ours.get_train_dataloader()))["labels"]
    assert not torch.isin(loaded, torch.tensor(ids)).any(), "the train loader's batches come masked"
    _, num_items = ours.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    trained = int((batch["labels"][..., 1:] != -100).sum())
    assert int(num_items) == trained == int((raw[..., 1:] != -100).sum()) - int(hits[..., 1:].sum())
    assert int(hits[..., 1:].sum()) > 0, "the chosen ids must be targets of the batch"
    ours.model.train()
    loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=num_items)
    with torch.no_grad():
        logits = copy.deepcopy(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = lmloss.causal_lm_loss(logits, batch["labels"], reduction="sum") / trained
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
