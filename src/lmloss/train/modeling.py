"""The model side of ``lmloss train``: load or build a model and tokenizer, and a module
whose forward is the fused loss (hidden states + ``lm_head`` weight, no logits).

Wrapping the loss in a module matters under DDP: gradients are synchronised only for
a forward that goes through the ``DistributedDataParallel`` wrapper, so the whole
computation (backbone and loss) must be one module's forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lmloss
from lmloss.train.config import BUILTIN_MODELS

__all__ = ["LossModel", "load_model", "load_tokenizer"]

IGNORE_INDEX = -100


def load_tokenizer(model: str, texts: Sequence[str], vocab_size: int) -> Any:
    """A built-in size trains a BPE tokenizer on ``texts``; a directory loads its own."""
    if model in BUILTIN_MODELS:
        from lmloss.train.builtin import build_tokenizer

        return build_tokenizer(texts, vocab_size=vocab_size)
    from lmloss.check import load_tokenizer as load_dir

    tokenizer = load_dir(_model_dir(model))
    if tokenizer.pad_token_id is None:
        # Collators need a pad id; padded positions are never targets, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, vocab_size: int) -> Any:
    """A built-in Qwen2 size (random weights) or a local transformers causal LM, in float32."""
    if model in BUILTIN_MODELS:
        from lmloss.train.builtin import build_model

        return build_model(vocab_size, model)
    from transformers import AutoModelForCausalLM

    directory = _model_dir(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"could not load a causal LM from {model!r}: {err}") from err
    if loaded.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(f"the tokenizer of {model!r} has {vocab_size} tokens but the model only "
                         f"{loaded.get_input_embeddings().num_embeddings} embeddings")
    return loaded


def _model_dir(model: str) -> Path:
    directory = Path(model)
    if not directory.is_dir():
        raise ValueError(f"--model {model!r} is neither a built-in size ({', '.join(BUILTIN_MODELS)}) nor an existing "
                         f"local directory (a transformers model saved with save_pretrained; nothing is downloaded)")
    if not (directory / "config.json").is_file():
        raise ValueError(f"--model {model!r} has no config.json: not a transformers model directory")
    return directory


def backbone_of(model: nn.Module) -> nn.Module:
    """The part of a causal LM that returns the last hidden states (before ``lm_head``)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    for name in ("model", "transformer", "base_model"):
        candidate = getattr(model, name, None)
        if isinstance(candidate, nn.Module) and candidate is not model:
            return candidate
    raise ValueError(f"cannot find the backbone of {type(model).__name__} (tried get_decoder(), .model, "
                     f".transformer): lmloss train needs the hidden states before lm_head")


def head_of(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}.get_output_embeddings() is {type(head).__name__}, not nn.Linear: "
                         f"the fused loss needs the lm_head weight")
    return head


def model_softcap(model: nn.Module) -> float | None:
    """Gemma 2 style final-logit soft-capping from the model config, if any."""
    value = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(value) if value else None


class LossModel(nn.Module):
    """``forward(batch, num_items_in_batch)`` -> the fused loss of a causal LM on ``batch``.

    ``batch`` holds ``input_ids``, ``labels`` (``[B, T]``, unshifted) and
    ``attention_mask`` or ``position_ids`` (packed rows). ``loss_options`` go to
    :func:`lmloss.linear_cross_entropy`.
    """

    def __init__(self, model: nn.Module, loss_options: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_options = dict(loss_options)

    def hidden_states(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T, D]`` last hidden states."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # use_cache=False: transformers separates packed samples by position_ids only without a cache.
        return backbone_of(self.model)(**inputs, use_cache=False).last_hidden_state

    def forward(self, batch: Mapping[str, torch.Tensor], num_items_in_batch: torch.Tensor | None = None,
                **overrides: Any) -> torch.Tensor:
        head = head_of(self.model)
        options = {**self.loss_options, **overrides}
        return lmloss.linear_cross_entropy(self.hidden_states(batch), head.weight, batch["labels"], bias=head.bias,
                                           num_items_in_batch=num_items_in_batch, **options)


@torch.no_grad()
def correct_targets(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    rows_per_chunk: int = 1024) -> torch.Tensor:
    """Targets whose argmax prediction is right, chunk by chunk (never all logits at once).

    ``hidden`` ``[B, T, D]``, ``labels`` ``[B, T]`` unshifted; returns a 0-dim int64 count.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    for start in range(0, h.shape[0], rows_per_chunk):
        logits = h[start:start + rows_per_chunk] @ weight.T
        correct += (logits.argmax(-1) == y[start:start + rows_per_chunk]).sum()
    return correct
