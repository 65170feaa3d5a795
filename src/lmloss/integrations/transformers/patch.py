"""``apply``/``remove``: the fused loss put into (and taken out of) one model instance."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from torch import nn
from typing_extensions import Unpack

from lmloss._spec import Backend
from lmloss._validation import check_bool
from lmloss.fused import check_backend_options
from lmloss.integrations.transformers.forward import make_forward
from lmloss.integrations.transformers.loss import ModelLossKeywords, loss_spec
from lmloss.integrations.transformers.model import logit_transform, output_head, unwrap_peft
from lmloss.integrations.transformers.state import STATE_ATTR, FusedState
from lmloss.integrations.transformers.tokens import check_token_ids, placeholder_token_ids

__all__ = ["apply", "is_applied", "remove"]

ModelT = TypeVar("ModelT", bound=nn.Module)


def apply(
    model: ModelT,
    *,
    ignore_token_ids: Iterable[int] | None = None,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    eval_logits: bool = True,
    **loss_options: Unpack[ModelLossKeywords],
) -> ModelT:
    """Make ``model(..., labels=...)`` compute the fused lmloss loss, without logits.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``Qwen2VLForConditionalGeneration``,
            ...; any model whose forward calls ``get_output_embeddings()``, a plain
            ``torch.nn.Linear``, on the final hidden states), or a PEFT model wrapping one.
        ignore_token_ids: token ids that are never targets. Default: the placeholder ids
            of the config (:func:`placeholder_token_ids`); ``()`` for none.
        backend, chunk_size: as in :func:`lmloss.linear_cross_entropy`.
        eval_logits: under ``torch.no_grad()``, return real logits (and the loss from
            them) from loss calls; ``False`` uses the fused path there too.
        **loss_options: ``ignore_index``, ``label_smoothing``, ``z_loss``, ``token_loss``
            (``"dft"``: Dynamic Fine-Tuning), ``focal_gamma``: as in
            :func:`lmloss.causal_lm_loss`, with its defaults (``ModelLossKeywords``).

    The softcap is not an option: it is the model's ``final_logit_softcapping``.

    Returns:
        ``model`` itself, changed in place (also ``model.accepts_loss_kwargs = True``).

    Raises:
        ValueError: if lmloss is already applied (call :func:`remove` first to change the
            options), the model has no output embeddings, they are not a plain
            ``torch.nn.Linear`` (quantized, LoRA-wrapped, ...), or an option is bad.

    A loss call returns the model's own output class with ``loss`` (a float32 scalar:
    sum over targets / ``num_items_in_batch`` or the call's target count) and
    ``logits=None``. ``labels`` (``[batch, seq_len]``) must match the positions the head
    sees: with ``logits_to_keep``, pass the labels of the kept positions.
    """
    target = unwrap_peft(model)
    if STATE_ATTR in target.__dict__:
        if not target.__dict__[STATE_ATTR].active:
            raise ValueError(
                "lmloss was removed from this model while another wrapper still calls through its forward; "
                "apply it to a freshly loaded model instead"
            )
        raise ValueError("lmloss is already applied to this model; call remove(model) first to change its options")
    # The other per-token options are fixed here: transformers shifts, means over the
    # step's targets, and the softcap is the model's own (see SPEC_OPTIONS_FIXED).
    spec = loss_spec("apply", loss_options)
    check_backend_options(backend, chunk_size)
    check_bool("eval_logits", eval_logits)
    head = output_head(target)
    ids = placeholder_token_ids(target) if ignore_token_ids is None else check_token_ids(ignore_token_ids)
    scale, softcap = logit_transform(target)
    state = FusedState(
        head=head,
        spec=spec,
        backend=backend,
        chunk_size=chunk_size,
        scale=scale,
        softcap=softcap,
        ignore_token_ids=ids,
        eval_logits=eval_logits,
        original=target.forward,
    )
    state.install(target, make_forward(state.signature, state.original))
    return model


def remove(model: ModelT) -> ModelT:
    """Undo :func:`apply`: the hooks, ``forward`` and ``accepts_loss_kwargs`` are restored.

    If something wrapped ``model.forward`` again after ``apply`` (accelerate does, for
    mixed precision), that wrapper stays and lmloss's layer inside it becomes a
    pass-through (with a warning): the behaviour is the original's, the object is not.

    Raises:
        ValueError: if lmloss is not applied to ``model``.
    """
    target = unwrap_peft(model)
    state = target.__dict__.get(STATE_ATTR)
    if state is None or not state.active:
        raise ValueError("lmloss is not applied to this model (nothing to remove)")
    state.uninstall(target)
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` is in effect on ``model``."""
    state = unwrap_peft(model).__dict__.get(STATE_ATTR)
    return state is not None and state.active
