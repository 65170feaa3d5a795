"""``LMLossSFTTrainer``: TRL's ``SFTTrainer`` with lmloss's fused loss and options.

TRL 1.16's ``SFTTrainer`` puts its own fused LM head on the model and trains its
plain negative log-likelihood; label smoothing goes through a second forward with the
full logits, and ``compute_loss_func`` is deprecated. This subclass keeps everything
else of ``SFTTrainer`` (data preparation, chat templates, ``assistant_only_loss``,
``completion_only_loss``, packing, padding-free batches, PEFT, its metrics) and
replaces only ``compute_loss``::

    from lmloss.integrations.trl import LMLossSFTTrainer

    trainer = LMLossSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats,
                               processing_class=tokenizer, label_smoothing=0.1, z_loss=1e-4)
    trainer.train()

One step, per micro-batch, is one forward of the model *without* labels. Two hooks on
the output embeddings take the final hidden states, hand the head an empty slice of
them (so the ``[batch, seq_len, vocab]`` logits never exist) and, while the head's
weight is whole (inside FSDP's gather), compute
``lmloss.linear_cross_entropy(hidden, lm_head.weight, labels, bias=lm_head.bias, ...)``
with the trainer's options, and TRL's metrics (``entropy``, ``mean_token_accuracy``)
from the same hidden states without gradient. The loss is divided by
``num_items_in_batch``, the step's target count that ``Trainer`` passes (always
counted: this trainer sets ``model_accepts_loss_kwargs``), so gradient accumulation
and data parallelism give the gradient of one big batch, as in ``SFTTrainer``.

With default options the loss is TRL's loss (its mean negative log-likelihood over the
targets); ``args.loss_type="dft"`` is ``token_loss="dft"`` and
``args.label_smoothing_factor`` is ``label_smoothing``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from trl import SFTTrainer

from lmloss._spec import LossSpec
from lmloss._validation import check_bool
from lmloss.fused import Backend, check_backend_options, linear_cross_entropy
from lmloss.integrations.transformers import is_applied, placeholder_token_ids
from lmloss.integrations.transformers.tokens import mask_token_ids
from lmloss.reference import Normalize, TokenLoss

__all__ = ["LMLossSFTTrainer"]

# Rows of logits per chunk for the metrics (no gradient): bounded memory at any vocabulary.
_METRIC_BYTES = 64 << 20


class LMLossSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose training and evaluation loss is lmloss's fused loss.

    Args:
        *args, **kwargs: as for ``trl.SFTTrainer`` (``model``, ``args``, ``train_dataset``,
            ``processing_class``, ...), except ``compute_loss_func``.
        label_smoothing, z_loss, token_loss, focal_gamma, normalize: as in
            :func:`lmloss.causal_lm_loss`. ``normalize="sequence"`` counts the step's
            sequences with a target (not with packing or padding-free batches, whose
            rows hold several sequences).
        softcap: the logit softcap; default the model's own ``final_logit_softcapping``
            (Gemma 2/3), and giving a different one for such a model is an error.
        ignore_token_ids: token ids never trained; default the placeholder ids of the
            model's config (:func:`lmloss.integrations.transformers.placeholder_token_ids`).
            They are masked in the collated labels, so ``num_items_in_batch`` does not
            count them either (the mean is over the trained targets).
        backend, chunk_size: as in :func:`lmloss.linear_cross_entropy`.
        token_metrics: compute TRL's ``entropy`` and ``mean_token_accuracy``, and with
            ``z_loss`` the z-loss term's share of the loss as ``z_loss`` (one more pass
            of the head over the targets, without gradient).

    Raises:
        ValueError: a bad option; ``compute_loss_func`` given; options that contradict
            ``args.loss_type``/``args.label_smoothing_factor``; a model with
            ``lmloss.integrations.transformers.apply`` in effect (give its options here);
            a model whose logits are scaled after the head (``logit_scale``...).
    """

    def __init__(
        self,
        *args: Any,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        normalize: Normalize = "token",
        token_loss: TokenLoss = "ce",
        focal_gamma: float | None = None,
        ignore_token_ids: Iterable[int] | None = None,
        backend: Backend = "auto",
        chunk_size: int | None = None,
        token_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "LMLossSFTTrainer computes the loss itself; pass lmloss's options instead of compute_loss_func"
            )
        LossSpec.from_arguments(locals())  # checks the options this trainer takes
        check_backend_options(backend, chunk_size)
        check_bool("token_metrics", token_metrics)
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module) and is_applied(model):
            raise ValueError(
                "lmloss.integrations.transformers.apply is in effect on this model; LMLossSFTTrainer computes the "
                "loss itself: call lmloss.integrations.transformers.remove(model) and give the options here"
            )
        super().__init__(*args, **kwargs)
        self.lmloss_options: dict[str, Any] = dict(
            label_smoothing=_smoothing_of(self.args, float(label_smoothing)), z_loss=float(z_loss),
            normalize=normalize, token_loss=_token_loss_of(self.args, token_loss), focal_gamma=focal_gamma,
            backend=backend, chunk_size=chunk_size,
        )  # fmt: skip
        self.label_smoother = None  # the smoothing is lmloss's (TRL would run a second forward for it)
        inner = _inner_model(self.model)
        self.lmloss_softcap = _softcap_of(inner, softcap)
        self.lmloss_ignore_ids = (
            placeholder_token_ids(inner)
            if ignore_token_ids is None
            else tuple(sorted({int(i) for i in ignore_token_ids}))
        )
        if self.lmloss_ignore_ids:
            # Masked where the batches are made, so that Trainer's step count
            # (num_items_in_batch, taken from the collated labels) counts only what is trained.
            self.data_collator = _IgnoreIdsCollator(self.data_collator, self.lmloss_ignore_ids)
        self.lmloss_token_metrics = token_metrics
        if normalize == "sequence" and (self.padding_free or getattr(self.args, "packing", False)):
            raise ValueError("normalize='sequence' needs one sequence per row; packing and padding_free put several")
        # The loss honours num_items_in_batch whatever the model's forward does, so let
        # Trainer always count it (and never divide by the accumulation steps instead).
        self.model_accepts_loss_kwargs = True

    # -- the step's item count

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | int | None]:
        """Trainer's micro-batches of one step and their target count (sequences with
        ``normalize="sequence"``), summed over processes as ``Trainer`` does."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.lmloss_options["normalize"] != "sequence" or num_items is None:
            return batches, num_items
        rows = sum(int(((b["labels"][..., 1:] != -100).any(-1)).sum()) for b in batches)
        count = torch.tensor(rows, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    # -- the loss

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """lmloss's loss of one micro-batch (``sum / num_items_in_batch``), TRL's metrics logged."""
        mode = "train" if model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        if labels is None and shift_labels is None:
            raise ValueError("LMLossSFTTrainer: the batch has no 'labels'")
        forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        targets = cast(torch.Tensor, shift_labels if shift_labels is not None else labels)
        # Batches from the trainer's collator come masked already; this covers batches made elsewhere.
        targets = mask_token_ids(targets, self.lmloss_ignore_ids, -100)
        call = _HeadCall(self, targets, shift_labels is None, num_items_in_batch)
        head = _inner_model(model).get_output_embeddings()
        handles = [
            head.register_forward_pre_hook(call.pre_hook, with_kwargs=True),
            head.register_forward_hook(call.post_hook, with_kwargs=True, prepend=True),
        ]
        try:
            outputs = model(**forward_inputs)
        finally:
            for handle in handles:
                handle.remove()
        if call.loss is None:
            raise RuntimeError(
                f"LMLossSFTTrainer: the forward never called the output embeddings ({type(head).__name__})"
            )
        loss = call.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages the gradients
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_token_metrics(mode, call, inputs)
        if return_outputs:  # the logits for compute_metrics: an extra forward, as in SFTTrainer
            with torch.no_grad():
                outputs = model(**forward_inputs)
            return loss, outputs
        return loss

    def _log_token_metrics(self, mode: str, call: _HeadCall, inputs: dict[str, Any]) -> None:
        """TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``, reduced over processes."""
        gather = self.accelerator.gather_for_metrics
        if call.stats is not None:
            valid, entropy, correct, lse_squared = (gather(x).sum() for x in call.stats)
            self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            z_loss = self.lmloss_options["z_loss"]
            if z_loss > 0:  # the z-loss term's share of the loss, per target (OLMo-core's "Z loss")
                self._metrics[mode]["z_loss"].append((z_loss * lse_squared / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free: one row of real tokens
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += int(gather(local).sum().item()) // self.get_tp_size()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class _HeadCall:
    """One forward's hooks on the output embeddings: the hidden states in, the loss out."""

    def __init__(self, trainer: LMLossSFTTrainer, targets: torch.Tensor, shift: bool, num_items: Any) -> None:
        self.trainer = trainer
        self.targets = targets
        self.shift = shift
        self.num_items = num_items
        self.hidden: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.stats: tuple[torch.Tensor, ...] | None = None

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.hidden is not None:
            raise RuntimeError("LMLossSFTTrainer: the output embeddings were called twice in one forward")
        hidden = args[0] if args else kwargs["input"]
        self.hidden = hidden
        stub = hidden.narrow(-2, 0, 0)  # the head multiplies nothing; the loss comes from `hidden`
        return ((stub,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": stub})

    def post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        hidden = self.hidden
        if hidden is None or self.loss is not None:
            return
        targets = self.targets.to(hidden.device)
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels have shape {tuple(targets.shape)} but the head sees hidden states for positions "
                f"{tuple(hidden.shape[:-1])}"
            )
        num_items = self.num_items.to(hidden.device) if isinstance(self.num_items, torch.Tensor) else self.num_items
        weight, bias = cast(torch.Tensor, module.weight), getattr(module, "bias", None)
        trainer = self.trainer
        self.loss = linear_cross_entropy(
            hidden, weight, targets, bias=bias, shift=self.shift, num_items_in_batch=num_items,
            softcap=trainer.lmloss_softcap, **trainer.lmloss_options,
        )  # fmt: skip
        if trainer.lmloss_token_metrics:
            with torch.no_grad():
                self.stats = _token_stats(hidden, weight, bias, targets, self.shift, trainer.lmloss_softcap)


def _token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    shift: bool,
    softcap: float | None,
) -> tuple[torch.Tensor, ...]:
    """(target count, summed entropy, argmax hits, summed squared log-sum-exp) over the
    targets, in bounded chunks.

    ``hidden``: ``[..., T, D]``; ``targets``: ``[..., T]`` (next-token shift applied here
    when ``shift``). The entropy is of the model's next-token distribution, as TRL logs it.
    """
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    mask = targets != -100
    rows, wanted = hidden[mask], targets[mask]
    entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    lse_squared = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = max(1, _METRIC_BYTES // (4 * weight.shape[0]))
    for start in range(0, rows.shape[0], step):
        logits = nn.functional.linear(rows[start : start + step], weight, bias).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        logp = logits - lse
        lse_squared += lse.square().sum()
        entropy += -(logp.exp() * logp).sum()
        correct += (logits.argmax(-1) == wanted[start : start + step]).sum()
    return mask.sum(), entropy, correct, lse_squared


def _inner_model(model: Any) -> Any:
    """The transformers model under DDP/FSDP-style ``.module`` wrappers and PEFT."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "get_output_embeddings"):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    return model


def _softcap_of(model: Any, softcap: float | None) -> float | None:
    """The model's own logit softcap, or ``softcap``; a model scaling its logits is refused."""
    config = model.config.get_text_config()
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, key, None)
        if value is not None and value != 1:
            raise ValueError(
                f"{type(model).__name__} scales its logits ({key}={value}); LMLossSFTTrainer does not reproduce that. "
                "Use trl.SFTTrainer, or lmloss.integrations.transformers.apply with transformers.Trainer"
            )
    own = getattr(config, "final_logit_softcapping", None)
    if own is None:
        return softcap
    if softcap is not None and not math.isclose(float(softcap), float(own)):
        raise ValueError(f"softcap={softcap} contradicts the model's final_logit_softcapping={own}; omit softcap")
    return float(own)


def _token_loss_of(args: Any, token_loss: TokenLoss) -> TokenLoss:
    if getattr(args, "loss_type", "nll") == "dft":
        if token_loss not in ("ce", "dft"):
            raise ValueError(f"args.loss_type='dft' contradicts token_loss={token_loss!r}; set one of them")
        return "dft"
    return token_loss


def _smoothing_of(args: Any, label_smoothing: float) -> float:
    factor = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
    if factor and label_smoothing and not math.isclose(factor, label_smoothing):
        raise ValueError(
            f"args.label_smoothing_factor={factor} contradicts label_smoothing={label_smoothing}; set one of them"
        )
    return label_smoothing or factor


@dataclass(frozen=True)
class _IgnoreIdsCollator:
    """The trainer's collator with ``ids`` masked (-100) in the ``[B, L]`` ``labels`` and
    ``shift_labels`` it makes (module level: data loader workers pickle it)."""

    collator: Callable[[list[Any]], dict[str, Any]]
    ids: tuple[int, ...]

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        batch = self.collator(features)
        for key in ("labels", "shift_labels"):
            if isinstance(batch.get(key), torch.Tensor):
                batch[key] = mask_token_ids(batch[key], self.ids, -100)
        return batch
