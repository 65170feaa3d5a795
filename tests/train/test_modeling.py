"""The model side of ``lmloss train``: the fused loss module against transformers' own loss."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmloss.train.modeling import LossModel, logit_transform, per_sample_weights

V = 53
TEXT = dict(
    vocab_size=V,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "config_cls, model_cls, extra",
    [
        ("Qwen2Config", "Qwen2ForCausalLM", {}),
        ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
        ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
        ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0, "head_dim": 8}),
    ],
)
def test_loss_model_equals_the_models_own_loss(config_cls, model_cls, extra):
    """The trainer's loss reproduces the model's logit scaling and soft-capping."""
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TEXT, **extra)).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)  # large logits: scaling and capping matter
    ids = torch.randint(0, V, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    want = model(input_ids=ids, labels=labels).loss
    scale, softcap = logit_transform(model)
    options = {} if softcap is None else {"softcap": softcap}
    got = LossModel(model, options, scale=scale)({"input_ids": ids, "labels": labels})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_per_sample_weights_by_hand():
    # Two rows; row 0 packs samples A (positions 0-3) and B (0-2), row 1 holds C (0-4) and padding (0-1).
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]])
    labels = torch.tensor([[-100, 5, 6, 7, -100, 8, -100], [-100, 9, -100, 9, 9, -100, -100]])
    w = per_sample_weights(labels, position_ids)
    third = 1 / 3
    want = torch.tensor([[0, third, third, third, 0, 1, 0], [0, third, 0, third, third, 0, 0]])
    torch.testing.assert_close(w, want.float())
    assert w.sum().item() == pytest.approx(3.0)  # three samples with a target


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "softcap": 2.0}, {"token_loss": "dft"}])
def test_z_share_is_the_z_loss_term_of_the_loss(options):
    """``z_share=True`` returns the loss unchanged and the z-loss term's part of it,
    ``c * mean(lse^2)`` over the targets (of the soft-capped logits), here in float64."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT)).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    ids = torch.randint(0, V, (2, 9))
    labels = ids.clone()
    labels[1, :4] = -100
    c = 1e-2
    loss_model = LossModel(model, {"z_loss": c, **options})
    loss, z = loss_model({"input_ids": ids, "labels": labels}, z_share=True)
    torch.testing.assert_close(loss, loss_model({"input_ids": ids, "labels": labels}))
    assert loss.requires_grad and not z.requires_grad
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    if "softcap" in options:
        logits = options["softcap"] * torch.tanh(logits / options["softcap"])
    scored = labels[:, 1:] != -100
    want = c * logits[scored].logsumexp(-1).square().mean()
    assert want > 0.1  # a share far above float32 noise
    torch.testing.assert_close(z.double(), want, rtol=2e-5, atol=0)
