"""``trl.DPOTrainer`` with lmloss's log-probs and :func:`lmloss.preference.dpo_loss`.

Usage: replace ``DPOTrainer`` by ``LMLossDPOTrainer``; the arguments are TRL's.
The policy's and the reference model's completion log-probs come from
:func:`lmloss.linear_token_logprobs` on the final hidden states; the loss, for
``loss_type`` any of ``sigmoid``, ``hinge``, ``ipo``, ``robust`` (or a weighted list of
them, as TRL allows), from :func:`lmloss.preference.dpo_loss`: TRL's own loss.
Options outside that (other loss types, f-divergences, ``ld_alpha``, WPO weighting,
MoE aux loss, PEFT without a reference model, ``return_outputs``) fall back to TRL's
computation.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from lmloss.integrations.trl._head import check_plain_head, completion_logprobs
from lmloss.preference import DPO_LOSS_TYPES, dpo_loss

__all__ = ["LMLossDPOTrainer"]


class LMLossDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` computing log-probs with lmloss's linear path and the loss with ``lmloss.preference``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_plain_head(self.accelerator.unwrap_model(self.model))

    def _lmloss_supported(self, return_outputs: bool) -> bool:
        return (
            not return_outputs
            and all(t in DPO_LOSS_TYPES for t in self.loss_types)
            and self.f_divergence_type == "reverse_kl"
            and self.ld_alpha is None
            and not self.use_weighting
            and not self.aux_loss_enabled
            and (self.precompute_ref_logps or self.ref_model is not None)
        )

    def _sequence_logps(self, model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """``[2B]`` summed completion log-probs, ``[chosen; rejected]``."""
        owner = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            out = completion_logprobs(model, owner, inputs["input_ids"], inputs["attention_mask"], labels)
        return out.logprobs.sum(-1)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if not self._lmloss_supported(return_outputs):
            return super()._compute_loss(model, inputs, return_outputs)
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        logps = self._sequence_logps(model, inputs, labels)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            with torch.no_grad():
                ref_logps = self._sequence_logps(self.ref_model, inputs, labels)
        lengths = completion_mask.sum(1).clamp(min=1).to(logps.dtype)
        loss = logps.new_zeros(())
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            # TRL's ipo uses per-token averages of the log-ratios; its sigmoid has no label smoothing.
            scale = lengths if loss_type == "ipo" else torch.ones_like(lengths)
            policy, ref = (logps / scale).chunk(2), (ref_logps.to(logps.dtype) / scale).chunk(2)
            smoothing = self.label_smoothing if loss_type == "robust" else 0.0
            out = dpo_loss(
                policy[0],
                policy[1],
                ref[0],
                ref[1],
                beta=self.beta,
                loss_type=loss_type,  # type: ignore[arg-type]  # checked by _lmloss_supported
                label_smoothing=smoothing,
            )
            loss = loss + out.losses.mean() * weight
        self._log_rewards(logps.detach(), ref_logps.detach())
        return loss

    def _log_rewards(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> None:
        """TRL's reward metrics: ``beta * (logps - ref_logps)`` of chosen and rejected."""
        mode = "train" if getattr(self.model, "training", True) else "eval"
        chosen, rejected = (self.beta * (logps - ref_logps)).chunk(2)
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen).mean().item())
        metrics["rewards/rejected"].append(gather(rejected).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen > rejected).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen - rejected).mean().item())
        metrics["logps/chosen"].append(gather(logps.chunk(2)[0]).mean().item())
        metrics["logps/rejected"].append(gather(logps.chunk(2)[1]).mean().item())
