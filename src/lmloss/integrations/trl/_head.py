"""Per-token log-probs of a causal LM's completion tokens through lmloss's linear path."""

from __future__ import annotations

from typing import Any

import torch

from lmloss.logprobs import TokenLogprobs, linear_token_logprobs


def completion_logprobs(
    model: Any,
    head_owner: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    **model_kwargs: Any,
) -> TokenLogprobs:
    """Log-probs of ``labels`` (``[B, T]``, aligned with ``input_ids``, shifted like a causal
    LM's labels) from ``model``'s final hidden states and ``head_owner``'s ``lm_head``.

    ``model`` is called as given (through a DDP wrapper, so gradients synchronize) with
    ``logits_to_keep=1``: only one position's logits are made; the last entry of
    ``hidden_states`` is the backbone's final (normed) output.
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **model_kwargs,
    )
    hidden = outputs.hidden_states[-1]
    head = head_owner.get_output_embeddings()
    config = head_owner.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    weight = head.weight
    hidden = hidden.to(weight.device, weight.dtype)
    return linear_token_logprobs(
        hidden,
        weight,
        labels.to(weight.device),
        bias=head.bias,
        temperature=temperature,
        softcap=softcap,
        with_entropy=with_entropy,
    )


def check_plain_head(model: Any) -> None:
    """lmloss's head is ``softcap(hidden @ W.T + b)``: refuse models that scale their logits."""
    config = model.config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} scales its logits ({name}={value}); lmloss's head does not")
