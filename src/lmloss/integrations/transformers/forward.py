"""The forward ``apply`` installs: calls without labels go to the original, loss calls are fused."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmloss._validation import value_checks_enabled
from lmloss.integrations.transformers.loss import logits_loss
from lmloss.integrations.transformers.outputs import logits_of, with_loss
from lmloss.integrations.transformers.state import STATE_ATTR, FusedState, LossCall

__all__ = ["make_forward"]


def make_forward(signature: inspect.Signature, original: Callable[..., Any]) -> Callable[..., Any]:
    """A fresh function per model, so that it can carry that model's signature.

    It closes over nothing model-specific (deepcopy shares functions between copies);
    everything comes from the instance it is bound to.
    """

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: FusedState = self.__dict__[STATE_ATTR]
        state.depth += 1  # the backbone runs inside lmloss's forward (see FusedState.backbone_hook)
        try:
            return _fused_forward(self, args, kwargs)
        finally:
            state.depth -= 1

    params = list(signature.parameters.values())
    # Trainer (4.46/4.47) passes num_items_in_batch only to a forward with **loss_kwargs;
    # later versions look for any **kwargs (or accepts_loss_kwargs, which apply sets).
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        params.append(inspect.Parameter("loss_kwargs", inspect.Parameter.VAR_KEYWORD))
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    new_signature = signature.replace(parameters=[self_param] + params)
    forward.__signature__ = new_signature  # type: ignore[attr-defined]  # typeshed's Callable has no __signature__
    forward.__doc__ = getattr(original, "__doc__", None)
    return forward


def _fused_forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    state: FusedState = model.__dict__[STATE_ATTR]
    if not state.active:
        return state.original(*args, **kwargs)
    if args:  # labels may come positionally: read the call as the original would bind it
        try:
            bound = state.signature.bind_partial(*args, **kwargs)
        except TypeError:
            return state.original(*args, **kwargs)  # let the original raise its own error
        if bound.arguments.get("labels") is None:
            return state.original(*args, **kwargs)
        kwargs = _keywords(bound)
    elif kwargs.get("labels") is None:
        return state.original(**kwargs)
    return _loss_call(state, dict(kwargs))


def _keywords(bound: inspect.BoundArguments) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError("lmloss: a forward with *args cannot take labels positionally; pass labels=...")
        else:
            kwargs[name] = value
    return kwargs


def _loss_call(state: FusedState, kwargs: dict[str, Any]) -> Any:
    """A call with labels: the original forward without them, and lmloss's loss."""
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    targets, shift = (shift_labels, False) if shift_labels is not None else (labels, True)
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"labels must be a tensor of token ids, got {type(targets).__name__}")
    targets, hit = state.mask(targets)
    if not torch.is_grad_enabled() and state.eval_logits:
        out = state.original(**kwargs)
        logits = logits_of(out)
        if not isinstance(logits, torch.Tensor):
            raise RuntimeError(f"lmloss: the model returned no logits ({type(out).__name__})")
        loss = logits_loss(logits, targets, state.spec, shift=shift, num_items_in_batch=num_items)
        return with_loss(out, loss, keep_logits=True)
    if hit is not None and num_items is not None and value_checks_enabled() and bool(hit.any()):
        warnings.warn(
            "lmloss: labels contain placeholder token ids (image/video); they are not targets, but the "
            "num_items_in_batch given (e.g. Trainer's count) includes them. Mask them in the collator "
            "(lmloss.labels ignore_token_ids) so the count is right",
            stacklevel=4,
        )
    if state.call is not None:
        raise RuntimeError("lmloss: a loss call started inside another one on the same model")
    call = state.call = LossCall(targets, shift, num_items, probe=not state.verified)
    try:
        out = state.original(**kwargs)
    finally:
        state.call = None
    if call.loss is None:
        raise RuntimeError(
            f"lmloss: the forward never called the output embeddings ({type(state.head).__name__}) on its hidden "
            "states, so lmloss cannot compute its loss; remove it with lmloss.integrations.transformers.remove"
        )
    if call.probe:
        if call.raw_probe is None:  # post_hook keeps the head's output whenever it computes a probe call's loss
            raise RuntimeError("lmloss: the output embeddings' output on the probe positions was not seen")
        state.verify(logits_of(out), call.raw_probe)
        state.verified = True
    return with_loss(out, call.loss, keep_logits=False)
