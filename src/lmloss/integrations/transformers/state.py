"""The integration's state on one model instance: its options, the head's hooks, the fused loss.

The state lives in the model's ``__dict__`` under ``STATE_ATTR`` (its presence means
"applied"). Its hooks are bound methods, so ``copy.deepcopy(model)`` (TRL's reference
models) gives a copy whose hooks act on the copy.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmloss._spec import Backend, LossSpec
from lmloss.fused import linear_cross_entropy
from lmloss.integrations.transformers.loss import count_on_device, options_text
from lmloss.integrations.transformers.tokens import token_hits
from lmloss.integrations.transformers.trl_guard import trl_fused_head_installed

__all__ = ["STATE_ATTR", "FusedState", "LossCall"]

# Instance attribute holding the integration's state; its presence means "applied".
STATE_ATTR = "_lmloss_fused"


@dataclasses.dataclass
class LossCall:
    """One loss call in flight: what the hooks need and what they produce."""

    labels: torch.Tensor  # [..., T] targets, placeholders masked
    shift: bool
    num_items: Any
    probe: bool  # the head gets one position per row, to check the logit transform
    hidden: torch.Tensor | None = None  # [..., T, D] the head's input
    loss: torch.Tensor | None = None
    raw_probe: torch.Tensor | None = None  # [..., 1, V] the head's output on the probe


class FusedState:
    """The integration's state on one model instance (``model._lmloss_fused``).

    The hooks are bound methods of this object and ``model.forward`` is bound to the
    model, so ``copy.deepcopy(model)`` (TRL's reference models) gives a copy whose hooks
    and forward act on the copy.
    """

    def __init__(
        self,
        *,
        head: nn.Linear,
        spec: LossSpec,
        backend: Backend,
        chunk_size: int | None,
        scale: float,
        softcap: float | None,
        ignore_token_ids: tuple[int, ...],
        eval_logits: bool,
        original: Callable[..., Any],
    ) -> None:
        self.head = head
        self.spec = spec  # the per-token options (shift, reduction, softcap: see SPEC_OPTIONS_FIXED)
        self.backend: Backend = backend
        self.chunk_size = chunk_size
        self.scale = scale
        self.softcap = softcap
        self.ignore_token_ids = ignore_token_ids
        self.eval_logits = eval_logits
        self.original = original
        self.signature = inspect.signature(original)
        self.call: LossCall | None = None
        self.verified = False
        self.active = True
        self.handles: list[Any] = []
        self.installed: Any = None
        self.saved: dict[str, Any] = {}
        self.owner: nn.Module | None = None  # the model (deepcopy maps it to the copy)
        self.depth = 0  # calls of the installed forward in progress

    # -- installation

    def install(self, model: nn.Module, forward: Callable[..., Any]) -> None:
        """Hook the head (and the backbone) and make ``forward`` (bound to ``model``) its forward."""
        self.handles = [
            self.head.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
            # prepend: run before any other post-hook (an FSDP reshard) while the weight is whole.
            self.head.register_forward_hook(self.post_hook, with_kwargs=True, prepend=True),
        ]
        # Remember the instance attributes we shadow, to put back exactly what was there.
        backbone = getattr(model, "base_model", None)
        if isinstance(backbone, nn.Module) and backbone is not model:
            self.handles.append(backbone.register_forward_pre_hook(self.backbone_hook))
        self.owner = model
        self.saved = {k: model.__dict__[k] for k in ("forward", "accepts_loss_kwargs") if k in model.__dict__}
        self.installed = types.MethodType(forward, model)
        # Plain instance attributes, written where uninstall takes them back from (what
        # nn.Module.__setattr__ does for values that are neither parameters nor modules).
        model.__dict__[STATE_ATTR] = self
        model.__dict__["forward"] = self.installed
        model.__dict__["accepts_loss_kwargs"] = True

    def uninstall(self, model: nn.Module) -> None:
        """Remove the hooks and put back ``forward`` and ``accepts_loss_kwargs`` as they were."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.active = False
        model.__dict__.pop("accepts_loss_kwargs", None)
        if "accepts_loss_kwargs" in self.saved:
            model.__dict__["accepts_loss_kwargs"] = self.saved["accepts_loss_kwargs"]
        if model.__dict__.get("forward") is not self.installed:
            warnings.warn(
                "lmloss remove(): model.forward was wrapped again after apply() (e.g. by accelerate); that "
                "wrapper stays and lmloss's layer inside it now passes every call through unchanged",
                stacklevel=3,
            )
            return
        del model.__dict__["forward"]
        if "forward" in self.saved:
            model.__dict__["forward"] = self.saved["forward"]
        del model.__dict__[STATE_ATTR]

    # -- a loss computed around lmloss (TRL's fused head)

    def backbone_hook(self, module: nn.Module, args: Any) -> None:
        """Refuse a backbone call made by TRL's fused head, which computes its own loss.

        TRL (1.16+) replaces ``model.forward`` with one that, for its loss, runs the
        backbone and multiplies ``lm_head.weight`` itself: lmloss's forward and head
        hooks never run and its options would be silently ignored.
        """
        if self.depth == 0 and self.active and self.owner is not None and trl_fused_head_installed(self.owner):
            raise RuntimeError(
                "lmloss: a TRL trainer put its own fused LM head on this model (trl add_fused_lm_head) and computes "
                "its loss without calling the model's forward, so the loss options given to "
                f"lmloss.integrations.transformers.apply ({options_text(self.spec)}) would be silently ignored. Use "
                "lmloss.integrations.trl.LMLossSFTTrainer(model=..., <the same options>) on a model without apply() "
                "(lmloss.integrations.transformers.remove(model) first), or the TRL trainer without apply()"
            )

    # -- the head's hooks

    def pre_hook(self, module: nn.Linear, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """On a loss call, keep the head's input and hand the head an empty (or probe) slice of it."""
        call = self.call
        if call is None:  # not a loss call: the head computes logits as usual
            return None
        if call.hidden is not None:
            raise RuntimeError(
                f"lmloss: the output embeddings ({type(module).__name__}) were called twice in one forward; "
                "lmloss cannot fuse this model's loss (remove it with lmloss.integrations.transformers.remove)"
            )
        hidden = args[0] if args else kwargs.get("input")
        if not isinstance(hidden, torch.Tensor) or hidden.ndim < 2:
            raise RuntimeError("lmloss: the output embeddings were not called on [..., T, D] hidden states")
        call.hidden = hidden
        # The head multiplies only this slice: no position (or one per row, to check the
        # model's logit transform once); the loss comes from the whole `hidden` in post_hook.
        stub = hidden.narrow(-2, 0, min(int(call.probe), hidden.shape[-2]))
        if args:
            return (stub,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input": stub}

    def post_hook(self, module: nn.Linear, args: Any, kwargs: Any, output: Any) -> None:
        """On a loss call, compute the fused loss while the head's weight is whole (inside its call)."""
        call = self.call
        if call is None or call.hidden is None or call.loss is not None:
            return
        call.loss = self.fused_loss(call, module.weight, getattr(module, "bias", None))
        if call.probe:
            call.raw_probe = output.detach()

    # -- the loss

    def fused_loss(self, call: LossCall, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``linear_cross_entropy`` of the call's hidden states ``[..., T, D]`` and the head ``[V, D]``."""
        hidden = call.hidden
        if hidden is None:  # pre_hook sets it before the head runs
            raise RuntimeError("lmloss: the output embeddings ran without their input being seen")
        labels = call.labels.to(hidden.device)
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but the model's output embeddings see hidden states for "
                f"positions {tuple(hidden.shape[:-1])}; with logits_to_keep, pass the labels of the kept positions"
            )
        if self.scale != 1.0:  # z = s * (h W^T + b) = (s h) W^T + s b
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale
        spec = self.spec
        return linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            shift=call.shift,
            num_items_in_batch=count_on_device(call.num_items, hidden),
            softcap=self.softcap,
            ignore_index=spec.ignore_index,
            label_smoothing=spec.label_smoothing,
            z_loss=spec.z_loss,
            token_loss=spec.token_loss,
            focal_gamma=spec.focal_gamma,
            backend=self.backend,
            chunk_size=self.chunk_size,
        )

    def transform(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """What lmloss assumes the model does to its head's output (float32)."""
        z = raw_logits.float() * self.scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def verify(self, model_logits: Any, raw_probe: torch.Tensor) -> None:
        """The model's logits for the probe positions must be ``transform`` of the head's output."""
        expected = self.transform(raw_probe)
        tol = 1e-3 if raw_probe.element_size() >= 4 else 3e-2
        ok = (
            isinstance(model_logits, torch.Tensor)
            and model_logits.shape == expected.shape
            and torch.allclose(model_logits.float(), expected, rtol=tol, atol=tol)
        )
        if not ok:
            raise RuntimeError(
                "lmloss: this model changes its logits after the output embeddings in a way lmloss does not "
                f"reproduce (lmloss assumes scale={self.scale:g}, softcap={self.softcap}); its fused loss would "
                "differ from the model's. Use lmloss.integrations.transformers.remove(model) and trainer_loss() "
                "on the logits instead"
            )

    def mask(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``labels`` with the placeholder ids set to ``ignore_index``, and where they were."""
        hit = token_hits(labels, self.ignore_token_ids)
        return (labels, None) if hit is None else (labels.masked_fill(hit, self.spec.ignore_index), hit)
