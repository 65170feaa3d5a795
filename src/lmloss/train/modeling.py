"""The model side of ``lmloss train``: load or build a model and tokenizer, and a module
whose forward is the fused loss (hidden states + ``lm_head`` weight, no logits).

Wrapping the loss in a module matters under DDP: gradients are synchronised only for
a forward that goes through the ``DistributedDataParallel`` wrapper, so the whole
computation (backbone and loss) must be one module's forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast, overload

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
    rows = _embedding_rows(loaded)
    if rows < vocab_size:
        raise ValueError(f"the tokenizer of {model!r} has {vocab_size} tokens but the model only {rows} embeddings")
    return loaded


def _embedding_rows(model: Any) -> int:
    """How many tokens the input embeddings of a transformers model have rows for."""
    embeddings: nn.Module = model.get_input_embeddings()
    # An nn.Embedding (transformers' own embeddings subclass it) holds num_embeddings as an
    # int; nn.Module.__getattr__, which mypy sees instead, is typed Tensor | Module.
    return cast(int, embeddings.num_embeddings)


def _model_dir(model: str) -> Path:
    directory = Path(model)
    if not directory.is_dir():
        raise ValueError(
            f"--model {model!r} is neither a built-in size ({', '.join(BUILTIN_MODELS)}) nor an existing "
            f"local directory (a transformers model saved with save_pretrained; nothing is downloaded)"
        )
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
    raise ValueError(
        f"cannot find the backbone of {type(model).__name__} (tried get_decoder(), .model, "
        f".transformer): lmloss train needs the hidden states before lm_head"
    )


def head_of(model: nn.Module) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__}.get_output_embeddings() is {type(head).__name__}, not nn.Linear: "
            f"the fused loss needs the lm_head weight"
        )
    return head


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` such that the model's logits are ``softcap(scale * (h W^T + b))``:
    Gemma 2's final-logit soft-capping, Cohere's and Granite's logit scales (also when
    nested in a multimodal ``text_config``)."""
    from lmloss.integrations.transformers import logit_transform as of_model

    return of_model(model)


class LossModel(nn.Module):
    """``forward(batch, num_items_in_batch)`` -> the fused loss of a causal LM on ``batch``.

    ``batch`` holds ``input_ids``, ``labels`` (``[B, T]``, unshifted) and
    ``attention_mask`` or ``position_ids`` (packed rows). ``loss_options`` go to
    :func:`lmloss.linear_cross_entropy`.
    """

    def __init__(self, model: nn.Module, loss_options: Mapping[str, Any], *, scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.loss_options = dict(loss_options)
        self.scale = scale  # the model's own logit scale (Cohere, Granite): applied to the hidden states

    def hidden_states(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T, D]`` last hidden states."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # use_cache=False: transformers separates packed samples by position_ids only without a cache.
        return backbone_of(self.model)(**inputs, use_cache=False).last_hidden_state

    @overload
    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | None = None,
        *,
        z_share: Literal[False] = False,
        **overrides: Any,
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | None = None,
        *,
        z_share: Literal[True],
        **overrides: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | None = None,
        *,
        z_share: bool = False,
        **overrides: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The loss (0-dim); with ``z_share=True``, ``(loss, z)`` where ``z`` (0-dim, detached)
        is the z-loss term's part of ``loss`` (``loss`` minus :meth:`z_free_loss`)."""
        head = head_of(self.model)
        options = {**self.loss_options, **overrides}
        if "token_weights" in batch:
            options["token_weights"] = batch["token_weights"]
        hidden, bias = self.scaled(self.hidden_states(batch), head.bias)
        loss = lmloss.linear_cross_entropy(
            hidden, head.weight, batch["labels"], bias=bias, num_items_in_batch=num_items_in_batch, **options
        )
        if not z_share:
            return loss
        plain = self.z_free_loss(hidden, head.weight, bias, batch["labels"], num_items_in_batch, options)
        return loss, loss.detach() - plain

    @staticmethod
    @torch.no_grad()
    def z_free_loss(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | None,
        options: Mapping[str, Any],
    ) -> torch.Tensor:
        """The same loss with ``z_loss=0``: no gradient, so one more pass of the fused head
        forward only (the backbone is not run again). ``loss - z_free_loss`` is the z term's
        share, ``c * sum_i w_i lse_i^2 / N`` over the same targets, weights and ``N`` as the
        loss, so its sum over a step's micro-batches and processes is the step's share."""
        return lmloss.linear_cross_entropy(
            hidden, weight, labels, bias=bias, num_items_in_batch=num_items_in_batch, **{**options, "z_loss": 0.0}
        )

    def scaled(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``scale * (h W^T + b)`` as ``(scale h) W^T + scale b``."""
        if self.scale == 1.0:
            return hidden, bias
        return hidden * self.scale, None if bias is None else bias * self.scale


def per_sample_weights(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``[R, L]`` token weights that make a token mean a mean of per-*sample* means in packed rows.

    A packed row holds several samples (each starts where ``position_ids`` is 0); every
    target of a sample with ``n`` targets gets weight ``1 / n``, so the weighted sum over a
    step is the sum of per-sample means and the weight sum is the number of samples
    with a target. Weights are aligned with ``labels`` (the weight of target ``labels[t]``).
    """
    starts = (position_ids == 0).reshape(-1)
    sample = starts.long().cumsum(0) - 1  # sample index of every position, over the flattened rows
    is_target = labels.reshape(-1) != IGNORE_INDEX
    # Position 0 of a row is never a target under the shift (and a packing collator masks
    # every sample's first label), so nothing predicts across a sample boundary.
    is_target[:: labels.shape[-1]] = False
    counts = torch.bincount(sample, weights=is_target.double(), minlength=int(sample.max()) + 1)
    weights = torch.where(is_target, 1.0 / counts[sample].clamp_min(1.0), torch.zeros((), dtype=torch.float64))
    return weights.float().view_as(labels)


@torch.no_grad()
def correct_targets(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, rows_per_chunk: int = 1024
) -> torch.Tensor:
    """Targets whose argmax prediction is right, chunk by chunk (never all logits at once).

    ``hidden`` ``[B, T, D]``, ``labels`` ``[B, T]`` unshifted; returns a 0-dim int64 count.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    for start in range(0, h.shape[0], rows_per_chunk):
        logits = h[start : start + rows_per_chunk] @ weight.T
        correct += (logits.argmax(-1) == y[start : start + rows_per_chunk]).sum()
    return correct
