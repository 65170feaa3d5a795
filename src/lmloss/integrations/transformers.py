"""lmloss inside transformers models and ``Trainer``.

Most training code never calls a loss function: it calls
``model(input_ids, labels=labels)`` or ``Trainer.train()``. This module puts lmloss
behind those calls::

    from lmloss.integrations import transformers as lmloss_hf

    model = lmloss_hf.apply(AutoModelForCausalLM.from_pretrained(...))
    out = model(input_ids, labels=labels, num_items_in_batch=n)  # out.loss; out.logits is None
    Trainer(model=model, args=args, train_dataset=data).train()  # nothing else changes
    lmloss_hf.remove(model)                                      # back to the original, exactly

``apply(model)``: a *loss call* (one with ``labels``) computes the loss with
``lmloss.linear_cross_entropy`` from the hidden states the model feeds its output
embeddings (the ``lm_head``), so the ``[batch, seq_len, vocab]`` logits never exist.

How, per model instance (no transformers class is patched):

- ``model.forward`` becomes an instance attribute wrapping the original (same signature,
  so ``Trainer`` and ``generate`` inspect it as before). A call without ``labels`` goes
  straight to the original: generation, logits, everything unchanged.
- A loss call runs the original *without* ``labels`` while two hooks on
  ``model.get_output_embeddings()`` take the hidden states, hand the head an empty slice
  of them (it multiplies nothing), and compute the fused loss from the head's weight and
  bias. The hooks compute inside the head's call, where sharding wrappers (FSDP) hold
  its full weight. The output is the model's own, with ``loss`` set and ``logits=None``.
- What a model does to its logits after the head is reproduced: ``final_logit_softcapping``
  (Gemma 2/3) becomes the ``softcap`` option; Cohere's ``logit_scale`` and Granite's
  ``logits_scaling`` a scale of the hidden states. The first loss call *checks* this: the
  head gets one position per row instead of none, and the model's logits for it must equal
  lmloss's; a model that changes its logits some other way fails with a ``RuntimeError``
  instead of training on another loss.
- Under ``torch.no_grad()`` (evaluation) a loss call by default returns the real logits
  and the loss computed from them by ``lmloss.causal_lm_loss`` with the same options, so
  ``Trainer.evaluate`` with ``compute_metrics`` still gets logits (``eval_logits=False``:
  the fused path there too).

Labels are transformers' (the input ids, ``-100`` where nothing is trained; the model
shifts); an already shifted ``shift_labels`` is honoured as transformers does. Placeholder
ids named in the config (``image_token_id``, ``video_token_id``, ... of Qwen2-VL and other
VLMs) are never targets. The loss sum is divided by ``num_items_in_batch`` (the target
count of the whole optimizer step) when given, else by the call's own target count.

Trainer: ``apply`` also sets ``model.accepts_loss_kwargs = True`` on the instance, because
the fused forward honours ``num_items_in_batch`` even where transformers' own forward does
not (Qwen2.5-VL and others are marked ``False``, which makes ``Trainer`` divide by the
accumulation steps: a mean of micro-batch means). With it, ``Trainer`` (transformers 4.48+):

- counts the step's targets over all its micro-batches (``labels[..., 1:] != -100``; before
  transformers PR #46204 over ``labels``, which counts position 0 too: a constant factor),
  sums that over processes when ``average_tokens_across_devices`` (default ``True``),
- passes it to every micro-batch's forward as ``num_items_in_batch``,
- does not divide the loss by the accumulation steps again, and multiplies it by the number
  of processes (which DDP's gradient average undoes).

So every micro-batch contributes ``sum / N_step``: the gradient of one big batch.
``trainer_loss()`` gives the same normalisation as a ``compute_loss_func`` for models you
do not want to wrap (it works on the logits, so they are materialized).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from lmloss._spec import Backend, LossSpec, TokenLoss
from lmloss._validation import check_bool, check_int, value_checks_enabled
from lmloss.fused import check_backend_options, linear_cross_entropy
from lmloss.reference import causal_lm_loss

__all__ = ["apply", "is_applied", "placeholder_token_ids", "remove", "trainer_loss"]

# The LossSpec options that apply() and trainer_loss() do not take, and why: the
# model's loss always shifts and means over the step's targets (num_items_in_batch
# from Trainer), and a model's logit softcap is its own config's.
SPEC_OPTIONS_FIXED = {
    "shift": "transformers' causal-LM loss always shifts the labels",
    "reduction": "a model's loss is the mean over the step's targets",
    "normalize": "Trainer counts num_items_in_batch in tokens",
    "softcap": "the model's final_logit_softcapping",
}

ModelT = TypeVar("ModelT", bound=nn.Module)

# Instance attribute holding the integration's state; its presence means "applied".
_STATE = "_lmloss_fused"
# Config attributes naming placeholder tokens (image/video/audio features are spliced in
# at these positions, so they are inputs, never targets).
PLACEHOLDER_CONFIG_KEYS = (
    "image_token_id",
    "video_token_id",
    "audio_token_id",
    "image_token_index",
    "video_token_index",
    "audio_token_index",
)


def apply(
    model: ModelT,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_loss: TokenLoss = "ce",
    focal_gamma: float | None = None,
    ignore_token_ids: Iterable[int] | None = None,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    eval_logits: bool = True,
) -> ModelT:
    """Make ``model(..., labels=...)`` compute the fused lmloss loss, without logits.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``Qwen2VLForConditionalGeneration``,
            ...; any model whose forward calls ``get_output_embeddings()``, a plain
            ``torch.nn.Linear``, on the final hidden states), or a PEFT model wrapping one.
        ignore_index: label value that is not a target.
        label_smoothing, z_loss, token_loss, focal_gamma: as in :func:`lmloss.causal_lm_loss`
            (``token_loss="dft"``: Dynamic Fine-Tuning).
        ignore_token_ids: token ids that are never targets. Default: the placeholder ids
            of the config (:func:`placeholder_token_ids`); ``()`` for none.
        backend, chunk_size: as in :func:`lmloss.linear_cross_entropy`.
        eval_logits: under ``torch.no_grad()``, return real logits (and the loss from
            them) from loss calls; ``False`` uses the fused path there too.

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
    target = _unwrap_peft(model)
    if _STATE in target.__dict__:
        if not target.__dict__[_STATE].active:
            raise ValueError(
                "lmloss was removed from this model while another wrapper still calls through its forward; "
                "apply it to a freshly loaded model instead"
            )
        raise ValueError("lmloss is already applied to this model; call remove(model) first to change its options")
    # The other per-token options are fixed here: transformers shifts, means over the
    # step's targets, and the softcap is the model's own (see SPEC_OPTIONS_FIXED).
    LossSpec(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, token_loss=token_loss,
             focal_gamma=focal_gamma)
    check_backend_options(backend, chunk_size)
    check_bool("eval_logits", eval_logits)
    head = _output_head(target)
    ids = placeholder_token_ids(target) if ignore_token_ids is None else _check_token_ids(ignore_token_ids)
    scale, softcap = logit_transform(target)
    state = _Fused(
        head=head,
        loss_options=dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                          token_loss=token_loss, focal_gamma=focal_gamma),
        fused_options=dict(backend=backend, chunk_size=chunk_size),
        scale=scale,
        softcap=softcap,
        ignore_token_ids=ids,
        eval_logits=eval_logits,
        original=target.forward,
    )
    state.install(target)
    return model


def remove(model: ModelT) -> ModelT:
    """Undo :func:`apply`: the hooks, ``forward`` and ``accepts_loss_kwargs`` are restored.

    If something wrapped ``model.forward`` again after ``apply`` (accelerate does, for
    mixed precision), that wrapper stays and lmloss's layer inside it becomes a
    pass-through (with a warning): the behaviour is the original's, the object is not.

    Raises:
        ValueError: if lmloss is not applied to ``model``.
    """
    target = _unwrap_peft(model)
    state = target.__dict__.get(_STATE)
    if state is None or not state.active:
        raise ValueError("lmloss is not applied to this model (nothing to remove)")
    state.uninstall(target)
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` is in effect on ``model``."""
    state = _unwrap_peft(model).__dict__.get(_STATE)
    return state is not None and state.active


def placeholder_token_ids(model_or_config: Any) -> tuple[int, ...]:
    """The placeholder token ids (image/video/audio) a model's config names.

    Args:
        model_or_config: a transformers model (its ``.config`` is read) or config.

    Returns:
        The sorted distinct non-negative ids of ``PLACEHOLDER_CONFIG_KEYS`` found on the
        config (e.g. Qwen2-VL: ``(151655, 151656)``); ``()`` for text-only models.
    """
    config = getattr(model_or_config, "config", model_or_config)
    found = set()
    for key in PLACEHOLDER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            found.add(value)
    return tuple(sorted(found))


def trainer_loss(
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_loss: TokenLoss = "ce",
    focal_gamma: float | None = None,
    ignore_token_ids: Iterable[int] = (),
) -> Callable[..., torch.Tensor]:
    """A ``compute_loss_func`` for ``transformers.Trainer``: lmloss on the model's logits.

    ``Trainer(model=model, compute_loss_func=trainer_loss(), ...)``: ``Trainer`` takes the
    ``labels`` out of the batch, calls the model (which returns its logits), and calls
    ``loss_func(outputs, labels, num_items_in_batch=n)``; this computes
    ``lmloss.causal_lm_loss(outputs.logits, labels, num_items_in_batch=n, ...)``. With a
    ``compute_loss_func``, ``Trainer`` always counts ``num_items_in_batch`` over the step,
    never divides by the accumulation steps, and multiplies by the number of processes
    under ``average_tokens_across_devices``: the same normalisation as :func:`apply`.

    Use :func:`apply` instead to avoid the logits; this is for models you do not want to
    wrap, or when the logits are wanted anyway. A model's softcap is already in its logits.
    For TRL's ``SFTTrainer`` use ``lmloss.integrations.trl.LMLossSFTTrainer``: TRL 1.16
    computes its loss with its own fused head (bypassing :func:`apply`, which then
    raises) and runs a second forward for a ``compute_loss_func`` (deprecated there).

    Args:
        ignore_index, label_smoothing, z_loss, token_loss, focal_gamma: as in
            :func:`lmloss.causal_lm_loss`.
        ignore_token_ids: ids never counted as targets (e.g. ``placeholder_token_ids(model)``);
            make the collator mask them too, so that ``Trainer``'s count agrees.

    Returns:
        ``loss_func(outputs, labels, num_items_in_batch=None) -> Tensor`` (a float32 scalar).
    """
    # The other per-token options are fixed here: transformers shifts, means over the
    # step's targets, and the softcap is the model's own (see SPEC_OPTIONS_FIXED).
    LossSpec(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, token_loss=token_loss,
             focal_gamma=focal_gamma)
    ids = _check_token_ids(ignore_token_ids)
    options = dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                   token_loss=token_loss, focal_gamma=focal_gamma)

    def loss_func(outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("trainer_loss: the batch has no 'labels' (Trainer passes labels=None)")
        logits = _logits_of(outputs)
        if logits is None:
            raise ValueError(
                "trainer_loss: the model output has no logits; a model with lmloss applied computes its loss "
                "itself, so pass it to Trainer without compute_loss_func"
            )
        labels = _mask_ids(labels.to(logits.device), ids, ignore_index)
        return causal_lm_loss(logits, labels, num_items_in_batch=_on_device(num_items_in_batch, logits), **options)

    return loss_func


# ---------------------------------------------------------------------------- state


@dataclasses.dataclass
class _LossCall:
    """One loss call in flight: what the hooks need and what they produce."""

    labels: torch.Tensor  # [..., T] targets, placeholders masked
    shift: bool
    num_items: Any
    probe: bool  # the head gets one position per row, to check the logit transform
    hidden: torch.Tensor | None = None  # [..., T, D] the head's input
    loss: torch.Tensor | None = None
    raw_probe: torch.Tensor | None = None  # [..., 1, V] the head's output on the probe


class _Fused:
    """The integration's state on one model instance (``model._lmloss_fused``).

    The hooks are bound methods of this object and ``model.forward`` is bound to the
    model, so ``copy.deepcopy(model)`` (TRL's reference models) gives a copy whose hooks
    and forward act on the copy.
    """

    def __init__(
        self,
        *,
        head: nn.Module,
        loss_options: dict[str, Any],
        fused_options: dict[str, Any],
        scale: float,
        softcap: float | None,
        ignore_token_ids: tuple[int, ...],
        eval_logits: bool,
        original: Callable[..., Any],
    ) -> None:
        self.head = head
        self.loss_options = loss_options
        self.fused_options = fused_options
        self.scale = scale
        self.softcap = softcap
        self.ignore_token_ids = ignore_token_ids
        self.eval_logits = eval_logits
        self.original = original
        self.signature = inspect.signature(original)
        self.call: _LossCall | None = None
        self.verified = False
        self.active = True
        self.handles: list[Any] = []
        self.installed: Any = None
        self.saved: dict[str, Any] = {}
        self.owner: nn.Module | None = None  # the model (deepcopy maps it to the copy)
        self.depth = 0  # calls of the installed forward in progress

    # -- installation

    def install(self, model: nn.Module) -> None:
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
        self.installed = types.MethodType(_make_forward(self.signature, self.original), model)
        model.__dict__[_STATE] = self
        model.forward = self.installed  # type: ignore[method-assign]
        model.accepts_loss_kwargs = True

    def uninstall(self, model: nn.Module) -> None:
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
        del model.__dict__[_STATE]

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
                f"lmloss.integrations.transformers.apply ({self.loss_options}) would be silently ignored. Use "
                "lmloss.integrations.trl.LMLossSFTTrainer(model=..., <the same options>) on a model without apply() "
                "(lmloss.integrations.transformers.remove(model) first), or the TRL trainer without apply()"
            )

    # -- the head's hooks

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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

    def post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        call = self.call
        if call is None or call.hidden is None or call.loss is not None:
            return None
        call.loss = self.fused_loss(call, module.weight, getattr(module, "bias", None))
        if call.probe:
            call.raw_probe = output.detach()
        return None

    # -- the loss

    def fused_loss(self, call: _LossCall, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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
        return linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            shift=call.shift,
            num_items_in_batch=_on_device(call.num_items, hidden),
            softcap=self.softcap,
            **self.loss_options,
            **self.fused_options,
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
        hit = _hits(labels, self.ignore_token_ids)
        return (labels, None) if hit is None else (labels.masked_fill(hit, self.loss_options["ignore_index"]), hit)


def _make_forward(signature: inspect.Signature, original: Callable[..., Any]) -> Callable[..., Any]:
    """A fresh function per model, so that it can carry that model's signature.

    It closes over nothing model-specific (deepcopy shares functions between copies);
    everything comes from the instance it is bound to.
    """

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: _Fused = self.__dict__[_STATE]
        state.depth += 1  # the backbone runs inside lmloss's forward (see backbone_hook)
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
    forward.__signature__ = signature.replace(parameters=[self_param] + params)  # type: ignore[attr-defined]
    forward.__doc__ = getattr(original, "__doc__", None)
    return forward


def _fused_forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    state: _Fused = model.__dict__[_STATE]
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


def _loss_call(state: _Fused, kwargs: dict[str, Any]) -> Any:
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
        logits = _logits_of(out)
        if not isinstance(logits, torch.Tensor):
            raise RuntimeError(f"lmloss: the model returned no logits ({type(out).__name__})")
        loss = causal_lm_loss(
            logits, targets.to(logits.device), shift=shift, num_items_in_batch=_on_device(num_items, logits),
            **state.loss_options,
        )
        return _with_loss(out, loss, keep_logits=True)
    if hit is not None and num_items is not None and value_checks_enabled() and bool(hit.any()):
        warnings.warn(
            "lmloss: labels contain placeholder token ids (image/video); they are not targets, but the "
            "num_items_in_batch given (e.g. Trainer's count) includes them. Mask them in the collator "
            "(lmloss.labels ignore_token_ids) so the count is right",
            stacklevel=4,
        )
    if state.call is not None:
        raise RuntimeError("lmloss: a loss call started inside another one on the same model")
    call = state.call = _LossCall(targets, shift, num_items, probe=not state.verified)
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
        state.verify(_logits_of(out), call.raw_probe)  # type: ignore[arg-type]
        state.verified = True
    return _with_loss(out, call.loss, keep_logits=False)


# ---------------------------------------------------------------------------- helpers


def trl_fused_head_installed(model: nn.Module) -> bool:
    """Whether TRL's ``add_fused_lm_head`` wrapped ``model.forward`` (possibly under other wrappers).

    TRL's trainers (``SFTTrainer`` from 1.16) install it; its loss path bypasses
    ``apply``'s forward, so ``apply`` refuses to train under it.
    """
    fn: Any = model.__dict__.get("forward")
    for _ in range(8):  # accelerate and others wrap forward with functools.wraps (``__wrapped__``)
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)  # not __qualname__: functools.wraps copies the model's
        if code is not None and (
            "add_fused_lm_head" in getattr(code, "co_qualname", "")  # Python 3.11+
            or (code.co_name == "_fused_forward" and "trl" in code.co_filename)
        ):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (whose forward calls the inner ``forward``)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        inner = get_base()
        if isinstance(inner, nn.Module):
            return inner
    return model


def _output_head(model: nn.Module) -> nn.Linear:
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
        raise ValueError(f"the lm_head weight must be a floating [vocab, hidden] matrix, got {shape} {head.weight.dtype}")
    return head


def _config_value(config: Any, key: str) -> Any:
    """``config.key``, else the text config's (multimodal configs nest the LM's)."""
    value = getattr(config, key, None)
    if value is None:
        value = getattr(getattr(config, "text_config", None), key, None)
    return value


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) such that the model's logits are ``softcap(scale * (h W^T + b))``."""
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


def _check_token_ids(ids: Iterable[int]) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"ignore_token_ids must be an iterable of token ids, got {ids!r}")
    checked = []
    for i in ids:
        if check_int("ignore_token_ids item", i) < 0:
            raise ValueError(f"ignore_token_ids must be token ids >= 0, got {i}")
        checked.append(i)
    return tuple(sorted(set(checked)))


def _hits(labels: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor | None:
    """Where ``labels`` holds one of ``ids`` (``[..., T]`` bool), or None without ids."""
    if not ids:
        return None
    return torch.isin(labels, torch.tensor(ids, device=labels.device, dtype=labels.dtype))


def _mask_ids(labels: torch.Tensor, ids: tuple[int, ...], ignore_index: int) -> torch.Tensor:
    hit = _hits(labels, ids)
    return labels if hit is None else labels.masked_fill(hit, ignore_index)


def _on_device(num_items: Any, like: torch.Tensor) -> Any:
    """A tensor count moved to the loss's device (Trainer keeps it on the batch's)."""
    return num_items.to(like.device) if isinstance(num_items, torch.Tensor) else num_items


def _logits_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    return getattr(outputs, "logits", None)


def _with_loss(out: Any, loss: torch.Tensor, *, keep_logits: bool) -> Any:
    """The model's output with ``loss`` set (and ``logits=None`` unless kept).

    A ``ModelOutput`` is rebuilt rather than edited so that its key order, and so
    ``out[0]`` / ``to_tuple()``, is what transformers gives (loss first).
    """
    if dataclasses.is_dataclass(out) and isinstance(out, Mapping):
        values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        if "loss" not in values:
            raise TypeError(f"lmloss: {type(out).__name__} has no 'loss' field to return the loss in")
        values["loss"] = loss
        if not keep_logits:
            values["logits"] = None
        return type(out)(**values)
    if isinstance(out, tuple):  # return_dict=False: (logits, ...) without a loss
        return (loss,) + (out if keep_logits else out[1:])
    raise TypeError(f"lmloss: unsupported model output type {type(out).__name__}")
