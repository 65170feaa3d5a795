"""What the integration reads off a model: the transformers model inside a PEFT wrapper,
its output head, and what it does to the head's output (the logit transform)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["logit_transform", "output_head", "unwrap_peft"]


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (whose forward calls the inner ``forward``).

    Raises:
        ValueError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        inner = get_base()
        if isinstance(inner, nn.Module):
            return inner
    return model


def output_head(model: nn.Module) -> nn.Linear:
    """``model.get_output_embeddings()``, which must be a plain ``torch.nn.Linear``.

    Raises:
        ValueError: there is none, it is another module (quantized, adapter-wrapped), or its
            weight is not a floating ``[vocab, hidden]`` matrix.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is missing or returned "
            "None); lmloss.integrations.transformers.apply needs a causal LM with an lm_head"
        )
    # A subclass that overrides forward (bitsandbytes, ...) or a wrapper (PEFT LoRA on the
    # head) computes something other than h @ W^T + b from `weight`: refuse, do not guess.
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(
            f"the output embeddings of {type(model).__name__} are a {type(head).__name__}, not a plain "
            "torch.nn.Linear (quantized or adapter-wrapped heads are not supported); lmloss's fused loss needs "
            "the head's weight as a [vocab, hidden] tensor. Use trainer_loss() on the logits instead"
        )
    if head.weight.ndim != 2 or not head.weight.is_floating_point():
        shape = tuple(head.weight.shape)
        raise ValueError(
            f"the lm_head weight must be a floating [vocab, hidden] matrix, got {shape} {head.weight.dtype}"
        )
    return head


def _config_value(config: Any, key: str) -> Any:
    """``config.key``, else the text config's (multimodal configs nest the LM's)."""
    value = getattr(config, key, None)
    if value is None:
        value = getattr(getattr(config, "text_config", None), key, None)
    return value


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) such that the model's logits are ``softcap(scale * (h W^T + b))``.

    Raises:
        ValueError: the config's logit scale is not a finite number > 0.
    """
    config = getattr(model, "config", None)
    softcap = _config_value(config, "final_logit_softcapping")
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    if model_type.startswith("cohere") and _config_value(config, "logit_scale") is not None:
        scale = float(_config_value(config, "logit_scale"))  # logits * logit_scale
    elif model_type.startswith("granite") and _config_value(config, "logits_scaling") is not None:
        scale = 1.0 / float(_config_value(config, "logits_scaling"))  # logits / logits_scaling
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{type(model).__name__}: unsupported logit scale {scale}")
    return scale, None if softcap is None else float(softcap)
