"""lmloss inside transformers models and Trainer: tiny random-weight models, float32, CPU.

Truths: transformers' own loss and gradients on the same model and batch (text models),
``F.cross_entropy`` in float64 on the model's own logits with placeholders masked
(Qwen2-VL, whose transformers loss counts placeholders), the unchanged model's outputs
(bit for bit) and generations, and one big batch stepped by hand with SGD (Trainer).
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lmloss.integrations import transformers as lmloss_hf

V = 61  # odd, not a power of two
IMAGE, VIDEO, VSTART, VEND = 55, 56, 57, 58  # Qwen2-VL special ids in the tiny vocabulary
TEXT = dict(
    vocab_size=V,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Per model: its config class name, model class name, and what makes it special.
TEXT_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=8)),
    "llama-tied-bias": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=8, tie_word_embeddings=True)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=1.5)),
    "cohere-scale": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "granite-scale": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
}


def text_model(name: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra = TEXT_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TEXT, **extra)).float()
    if name == "llama-tied-bias":  # a head with a bias, sharing the embedding matrix
        head = torch.nn.Linear(16, V, bias=True)
        head.weight = model.model.embed_tokens.weight
        torch.nn.init.normal_(head.bias, std=0.5)
        model.lm_head = head
    return model


def vl_model(seed: int = 0, version: str = "2") -> torch.nn.Module:
    """A tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``): 2x2 patches, one vision block."""
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    vision = dict(depth=1, hidden_size=16, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision.update(embed_dim=16, mlp_ratio=2)
    else:
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision.update(out_hidden_size=16, intermediate_size=16, window_size=8, fullatt_block_indexes=[0])
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    torch.manual_seed(seed)
    return model_cls(config).float()


def text_batch(seed: int = 1, batch: int = 3, length: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding-like tail
    labels[2, 5] = -100
    return {"input_ids": ids, "labels": labels}


def vl_sample(seed: int, n_masked: int) -> dict[str, torch.Tensor]:
    """One image (a 4x4 patch grid -> 4 placeholder tokens) between text tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.randint(3, 50, (3,), generator=g),
            torch.tensor([VSTART, IMAGE, IMAGE, IMAGE, IMAGE, VEND]),
            torch.randint(3, 50, (5,), generator=g),
        ]
    )
    labels = ids.clone()
    labels[:n_masked] = -100
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.randn(16, 24, generator=g),
        "image_grid_thw": torch.tensor([1, 4, 4]),
    }


def vl_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.stack([s["image_grid_thw"] for s in samples]),
    }
    # transformers 5.2x needs the modality of every token for M-RoPE; older versions find it themselves.
    if "mm_token_type_ids" in inspect.signature(transformers.Qwen2VLForConditionalGeneration.forward).parameters:
        batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE).int()
    return batch


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item() + 1e-12
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, grads(model)


def ce_truth(logits: torch.Tensor, labels: torch.Tensor, ignore_ids=(), num_items=None) -> torch.Tensor:
    """Float64 next-token CE, placeholders masked, sum / (num_items or the target count)."""
    z, y = logits[:, :-1].double(), labels[:, 1:].clone()
    for i in ignore_ids:
        y[y == i] = -100
    total = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum", ignore_index=-100)
    return total / (num_items if num_items is not None else (y != -100).sum())


# ------------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("name", list(TEXT_MODELS))
@pytest.mark.parametrize("num_items", [None, 40])
def test_loss_and_gradients_equal_transformers_own(name, num_items):
    model = text_model(name)
    batch = text_batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want, want_grads = loss_and_grads(model, batch, **kwargs)
    lmloss_hf.apply(model, backend="chunked", chunk_size=5)
    got, got_grads = loss_and_grads(model, batch, **kwargs)
    assert got.logits is None and got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    assert_grads_close(got_grads, want_grads)
    assert want.loss.item() > 0.1 and (num_items is None or abs(got.loss.item() - want.loss.item()) < 1)


def test_dft_option_equals_the_direct_formula():
    """token_loss="dft": CE times the detached target probability, / the target count."""
    model = text_model("qwen2-tied")
    batch = text_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.double()
    z, y = logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    ce = F.cross_entropy(z[keep], y[keep], reduction="none")
    want = (ce * torch.exp(-ce)).sum() / keep.sum()
    lmloss_hf.apply(model, token_loss="dft")
    got = model(**batch).loss
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    loss_func = lmloss_hf.trainer_loss(token_loss="dft")
    lmloss_hf.remove(model)
    torch.testing.assert_close(
        loss_func(model(input_ids=batch["input_ids"]), batch["labels"]).double(), want, rtol=1e-5, atol=0
    )
    with pytest.raises(ValueError, match="focal_gamma"):
        lmloss_hf.apply(model, focal_gamma=1.0)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen2_vl_placeholders_are_never_targets_and_num_items_is_honoured(version):
    model = vl_model(version=version)
    batch = vl_collate([vl_sample(0, 2), vl_sample(1, 0)])  # labels include the image placeholders
    truth_model = copy.deepcopy(model)
    lmloss_hf.apply(model, backend="chunked", chunk_size=4)
    for num_items in (None, 30):
        logits = truth_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        want = ce_truth(logits, batch["labels"], ignore_ids=(IMAGE, VIDEO), num_items=num_items)
        truth_model.zero_grad(set_to_none=True)
        want.backward()
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, got_grads = loss_and_grads(model, batch, **kwargs)
        torch.testing.assert_close(got.loss.double(), want, rtol=1e-5, atol=0)
        assert_grads_close(got_grads, grads(truth_model))
        # With a count from outside (Trainer's), placeholders left in the labels are reported.
        assert any("placeholder" in str(w.message) for w in caught) == (num_items is not None)
    # transformers' own loss counts the 8 placeholders as targets: a different number.
    own = truth_model(**batch).loss
    assert abs(own.item() - ce_truth(logits, batch["labels"], ignore_ids=(IMAGE, VIDEO)).item()) > 1e-3


def test_no_batch_seq_vocab_tensor_is_created():
    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    cfg = dict(TEXT, vocab_size=512, head_dim=8)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    batch = {"input_ids": torch.randint(0, 512, (2, 48)), "labels": torch.randint(0, 512, (2, 48))}
    logits_numel = 2 * 48 * 512  # the embedding gradient has 512 * 16, a quarter of it

    def largest(m):
        with LargestTensor() as mode:
            m(**batch).loss.backward()
        return mode.largest

    assert largest(model) >= logits_numel  # the control: transformers materializes the logits
    lmloss_hf.apply(model, backend="chunked", chunk_size=8)
    largest(model)  # the first loss call checks the logit transform on one extra row per sequence
    assert largest(model) <= logits_numel // 4


# ------------------------------------------------------------------- behaviour kept


def test_remove_restores_the_original_bit_for_bit():
    model = text_model("gemma2-softcap")
    batch = text_batch()
    before_keys = set(model.__dict__)
    before_sig = inspect.signature(model.forward)
    want = model(**batch)
    lmloss_hf.apply(model)
    assert lmloss_hf.is_applied(model) and model.accepts_loss_kwargs is True
    assert inspect.signature(model.forward) == before_sig  # Trainer and generate read it
    model(**batch).loss.backward()
    lmloss_hf.remove(model)
    got = model(**batch)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logits, want.logits)
    assert set(model.__dict__) == before_keys and not lmloss_hf.is_applied(model)
    assert not model.lm_head._forward_hooks and not model.lm_head._forward_pre_hooks
    assert not hasattr(model, "accepts_loss_kwargs") or "accepts_loss_kwargs" not in model.__dict__


def test_remove_under_a_later_wrapper_passes_through_with_a_warning():
    model = text_model("qwen3")
    batch = text_batch()
    want = model(**batch)
    lmloss_hf.apply(model)
    inner = model.forward
    model.forward = lambda *args, **kwargs: inner(*args, **kwargs)  # as accelerate wraps it for autocast
    with pytest.warns(UserWarning, match="wrapped again"):
        lmloss_hf.remove(model)
    got = model(**batch)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logits, want.logits)
    assert not lmloss_hf.is_applied(model)
    with pytest.raises(ValueError, match="freshly loaded"):
        lmloss_hf.apply(model)


def test_calls_without_labels_and_generation_are_unchanged():
    model = text_model("qwen2-tied")
    ids = text_batch()["input_ids"][:, :6]
    want_logits = model(input_ids=ids).logits
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    lmloss_hf.apply(model)
    assert torch.equal(model(input_ids=ids).logits, want_logits)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_qwen2_vl_generation_is_unchanged():
    model = vl_model()
    batch = vl_collate([vl_sample(0, 0)])
    batch.pop("labels")
    want = model.generate(**batch, max_new_tokens=4, do_sample=False)
    lmloss_hf.apply(model)
    assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), want)


def test_evaluation_returns_real_logits_and_the_same_loss():
    model = text_model("llama")
    batch = text_batch()
    with torch.no_grad():
        want = model(**batch, num_items_in_batch=33)
    lmloss_hf.apply(model)
    with torch.no_grad():
        got = model(**batch, num_items_in_batch=33)
    assert torch.equal(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
    lmloss_hf.remove(model)
    lmloss_hf.apply(model, eval_logits=False)
    with torch.no_grad():
        fused = model(**batch, num_items_in_batch=33)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, want.loss, rtol=1e-5, atol=0)


def test_tuple_output_logits_to_keep_shift_labels_and_positional_labels():
    model = text_model("mistral")
    batch = text_batch()
    own_tuple = model(**batch, return_dict=False)
    kept = batch["labels"][:, -4:]
    own_kept = model(input_ids=batch["input_ids"], labels=kept, logits_to_keep=4).loss
    shifted = torch.cat([batch["labels"][:, 1:], torch.full((3, 1), -100)], dim=1)
    lmloss_hf.apply(model, backend="chunked", chunk_size=3)
    got = model(**batch, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(own_tuple) - 1  # no logits
    torch.testing.assert_close(got[0], own_tuple[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(
        model(input_ids=batch["input_ids"], labels=kept, logits_to_keep=4).loss, own_kept, rtol=1e-5, atol=0
    )
    by_shift = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=shifted).loss
    torch.testing.assert_close(by_shift, own_tuple[0], rtol=1e-5, atol=0)
    # forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels)
    positional = model(batch["input_ids"], None, None, None, None, batch["labels"])
    assert positional.logits is None
    torch.testing.assert_close(positional.loss, own_tuple[0], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**batch, logits_to_keep=4)


def test_a_deep_copy_trains_its_own_weights():
    model = lmloss_hf.apply(text_model("llama"))
    batch = text_batch()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    mine, theirs = model(**batch).loss, twin(**batch).loss
    assert mine.item() != pytest.approx(theirs.item(), rel=1e-3)
    lmloss_hf.remove(twin)
    torch.testing.assert_close(twin(**batch).loss, theirs, rtol=1e-5, atol=0)
    assert lmloss_hf.is_applied(model) and not lmloss_hf.is_applied(twin)


# ------------------------------------------------------------------- errors


def test_bad_uses_fail_with_clear_errors():
    model = text_model("llama")
    lmloss_hf.apply(model)
    with pytest.raises(ValueError, match="already applied"):
        lmloss_hf.apply(model)
    lmloss_hf.remove(model)
    with pytest.raises(ValueError, match="not applied"):
        lmloss_hf.remove(model)
    with pytest.raises(ValueError, match="label_smoothing"):
        lmloss_hf.apply(model, label_smoothing=1.5)
    with pytest.raises(ValueError, match="backend"):
        lmloss_hf.apply(model, backend="fast")
    with pytest.raises(ValueError, match="ignore_token_ids"):
        lmloss_hf.apply(model, ignore_token_ids=[-3])

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model.lm_head = ScaledHead(16, V, bias=False)
    with pytest.raises(ValueError, match=r"not a plain torch\.nn\.Linear"):
        lmloss_hf.apply(model)
    model.lm_head = None
    with pytest.raises(ValueError, match="no output embeddings"):
        lmloss_hf.apply(model)
    assert not lmloss_hf.is_applied(model)


def test_an_unknown_logit_transform_is_caught_on_the_first_loss_call():
    model = text_model("llama")
    # Something the model does to its logits after the head that lmloss knows nothing of.
    model.lm_head.register_forward_hook(lambda module, args, out: out * 3.0)
    lmloss_hf.apply(model)
    with pytest.raises(RuntimeError, match="changes its logits"):
        model(**text_batch())


# ------------------------------------------------------------------- Trainer


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def text_samples() -> list[dict[str, torch.Tensor]]:
    """8 samples of 12 tokens with 10, 1, 6, 2, 9, 3, 11 and 4 targets."""
    g = torch.Generator().manual_seed(3)
    samples = []
    for masked in (1, 10, 5, 9, 2, 8, 0, 7):
        ids = torch.randint(3, 50, (12,), generator=g)
        labels = ids.clone()
        labels[:masked] = -100
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def train_one_step(model, samples, tmp_path, collate=None, **trainer_kwargs) -> dict[str, torch.Tensor]:
    """One optimizer step of Trainer: 4 micro-batches of 2, SGD lr 1, no clipping or decay."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=1,
        max_grad_norm=0.0,
        weight_decay=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
        logging_strategy="no",
    )
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    constant = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=ListDataset(samples),
        data_collator=collate,
        optimizers=(sgd, constant),
        **trainer_kwargs,
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def sgd_step(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= p.grad
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(got, want):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=name)


def far(got, want) -> bool:
    return max((got[n] - want[n]).abs().max().item() for n in want) > 1e-3


def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path):
    samples = text_samples()
    stacked = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    big = sgd_step(reference := text_model("llama"), reference(**stacked).loss)  # transformers' own loss
    means = text_model("llama")  # the control: a mean of the micro-batches' own means
    loss = sum(means(**{k: v[i : i + 2] for k, v in stacked.items()}).loss for i in range(0, 8, 2)) / 4
    assert far(sgd_step(means, loss), big)

    model = lmloss_hf.apply(text_model("llama"), backend="chunked", chunk_size=4)
    assert_params_close(train_one_step(model, samples, tmp_path / "apply"), big)

    plain = text_model("llama")
    got = train_one_step(plain, samples, tmp_path / "func", compute_loss_func=lmloss_hf.trainer_loss())
    assert_params_close(got, big)


def test_trainer_gradient_accumulation_qwen2_vl(tmp_path):
    # Labels as lmloss.labels builds them: prompt and placeholders masked, uneven target counts.
    samples = [vl_sample(i, n) for i, n in enumerate((0, 9, 3, 12, 6, 1, 10, 4))]
    for s in samples:
        s["labels"][s["input_ids"] == IMAGE] = -100
    reference = vl_model()
    stacked = vl_collate(samples)
    logits = reference(**{k: v for k, v in stacked.items() if k != "labels"}).logits
    big = sgd_step(reference, ce_truth(logits, stacked["labels"]).float())
    model = lmloss_hf.apply(vl_model(), backend="chunked", chunk_size=4)
    assert_params_close(train_one_step(model, samples, tmp_path, collate=vl_collate), big)


def test_trainer_passes_num_items_to_qwen2_5_vl_only_once_applied(tmp_path):
    # transformers marks Qwen2.5-VL accepts_loss_kwargs=False: Trainer would then divide each
    # micro-batch's mean by the accumulation steps (a mean of means). apply() lifts that.
    model = vl_model(version="2.5")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert transformers.Trainer(model=model, args=args).model_accepts_loss_kwargs is False
    lmloss_hf.apply(model)
    assert transformers.Trainer(model=model, args=args).model_accepts_loss_kwargs is True
    lmloss_hf.remove(model)
    assert transformers.Trainer(model=model, args=args).model_accepts_loss_kwargs is False


def test_trainer_loss_masks_placeholders_and_refuses_a_fused_output():
    loss_func = lmloss_hf.trainer_loss(ignore_token_ids=[IMAGE])
    logits = torch.randn(2, 7, V)
    labels = torch.randint(3, 50, (2, 7))
    labels[0, 3] = IMAGE
    want = ce_truth(logits, labels, ignore_ids=(IMAGE,), num_items=20)
    got = loss_func(transformers.modeling_outputs.CausalLMOutput(logits=logits), labels, num_items_in_batch=20)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="no logits"):
        loss_func(transformers.modeling_outputs.CausalLMOutput(loss=got), labels)
    assert lmloss_hf.placeholder_token_ids(vl_model()) == (IMAGE, VIDEO)
    assert lmloss_hf.placeholder_token_ids(text_model("llama")) == ()


def test_reachable_from_the_top_level_package():
    """The README's one line: ``lmloss.integrations.transformers.apply(model)``."""
    import lmloss

    assert lmloss.integrations.transformers.apply is lmloss_hf.apply
