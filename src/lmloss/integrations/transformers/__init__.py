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

The package, one concept per module: ``patch`` (``apply``/``remove``/``is_applied``),
``state`` (the per-instance state and the head's hooks), ``forward`` (the installed
forward), ``model`` (the head, PEFT unwrapping, ``logit_transform``), ``trl_guard``
(``trl_fused_head_installed``), ``trainer`` (``trainer_loss``), ``loss`` (the options
and the loss on logits), ``tokens`` (placeholder ids), ``outputs`` (model outputs).
"""

from __future__ import annotations

from lmloss.integrations.transformers.loss import SPEC_OPTIONS_FIXED
from lmloss.integrations.transformers.model import logit_transform
from lmloss.integrations.transformers.patch import apply, is_applied, remove
from lmloss.integrations.transformers.tokens import PLACEHOLDER_CONFIG_KEYS, placeholder_token_ids
from lmloss.integrations.transformers.trainer import trainer_loss
from lmloss.integrations.transformers.trl_guard import trl_fused_head_installed

__all__ = [
    "apply",
    "is_applied",
    "placeholder_token_ids",
    "remove",
    "trainer_loss",
    "logit_transform",
    "trl_fused_head_installed",
    "PLACEHOLDER_CONFIG_KEYS",
    "SPEC_OPTIONS_FIXED",
]
