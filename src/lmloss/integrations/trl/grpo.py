"""``trl.GRPOTrainer`` with lmloss's log-probs and policy loss.

Usage: replace ``GRPOTrainer`` by ``LMLossGRPOTrainer``; the arguments are TRL's.

- Log-probs and entropy of the completion tokens (for the policy, the old policy and
  the reference model) come from :func:`lmloss.linear_token_logprobs` on the model's
  final hidden states, never from ``[N, V]`` logits once lmloss's chunked backend is
  in the build (before that, its reference backend).
- The loss is :func:`lmloss.rl.policy_loss` with ``num_items_in_batch`` the exact count
  of the accumulation window (over its micro-batches and ranks) of what the loss type
  divides by. For ``grpo``, ``sapo``, ``dr_grpo``, ``luspo``, ``dapo``, ``cispo`` and
  ``vespo`` this is TRL's own loss (GRPO micro-batches hold equally many sequences, and
  TRL's token count spans the generation batch); for ``bnpo`` it differs where it
  should: TRL divides each micro-batch's token mean by the accumulation count, which is
  not the window's token mean when micro-batches hold different numbers of tokens; here
  it is.
- Options lmloss's loss does not implement (entropy bonus or mask, off-policy mask, vLLM
  importance-sampling correction, MoE aux loss, tool masks, and ``vespo`` with
  ``importance_sampling_level='sequence'``, which TRL only warns about) fall back to TRL's
  loss computation, still on lmloss's log-probs.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer

from lmloss.integrations.trl._head import check_plain_head, completion_logprobs
from lmloss.rl import LOSS_TYPES, TOKEN_LOSS_TYPES, policy_loss

__all__ = ["LMLossGRPOTrainer"]


class LMLossGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` computing log-probs with lmloss's linear path and the loss with ``lmloss.rl``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_plain_head(self.accelerator.unwrap_model(self.model))

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``[B, logits_to_keep]`` log-probs (and entropies) of the completion tokens."""
        extra = {k: v for k, v in multimodal.items() if v is not None}
        if compute_aux_loss or extra:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **multimodal,
            )
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        owner = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():  # as TRL runs its forward (bf16 autocast by default)
            out = completion_logprobs(
                model,
                owner,
                input_ids,
                attention_mask,
                labels,
                temperature=self.temperature,
                with_entropy=compute_entropy,
            )
        entropy = None if out.entropy is None else out.entropy[:, -logits_to_keep:]
        return out.logprobs[:, -logits_to_keep:], entropy, None

    def _lmloss_supported(self, inputs: dict[str, Any]) -> bool:
        return (
            self.loss_type in LOSS_TYPES
            and not (self.loss_type == "vespo" and self.importance_sampling_level != "token")
            and self.top_entropy_quantile >= 1.0
            and self.off_policy_mask_threshold is None
            and not (self.use_vllm and self.vllm_importance_sampling_correction)
            and not self._entropy_bonus_enabled
            and not self.aux_loss_enabled
            and "tool_mask" not in inputs
        )

    def _window_count(self, inputs: dict[str, Any], mask: torch.Tensor, training: bool) -> torch.Tensor | float:
        """This rank's share of the accumulation window's count (DDP averages over ranks)."""
        accumulation = self.current_gradient_accumulation_steps if training else 1
        if self.loss_type in TOKEN_LOSS_TYPES:
            # TRL's count spans the generation batch on every rank: rescale it to one window.
            count = inputs["num_items_in_batch"].float() / self.accelerator.num_processes
            config: Any = self.args  # a GRPOConfig
            return count * accumulation / config.steps_per_generation if training else count
        return float(mask.shape[0] * accumulation)  # GRPO micro-batches hold equally many sequences

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if not self._lmloss_supported(inputs):
            return super()._compute_loss(model, inputs)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
        )
        mask = inputs["completion_mask"]
        training = bool(getattr(self.model, "training", True))
        config: Any = self.args  # a GRPOConfig
        out = policy_loss(
            logps,
            inputs.get("old_per_token_logps"),
            inputs["advantages"],
            mask,
            loss_type=self.loss_type,  # type: ignore[arg-type]  # checked by _lmloss_supported
            epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=config.delta,
            beta=self.beta,
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            importance_sampling_level=self.importance_sampling_level,  # type: ignore[arg-type]  # grpo_loss checks it
            max_completion_length=self.max_completion_length,
            num_items_in_batch=self._window_count(inputs, mask, training),
            sapo_temperature_pos=config.sapo_temperature_pos,
            sapo_temperature_neg=config.sapo_temperature_neg,
            kl_importance_correction=bool(config.use_bias_correction_kl),
            vespo_k_pos=config.vespo_k_pos,
            vespo_lambda_pos=config.vespo_lambda_pos,
            vespo_k_neg=config.vespo_k_neg,
            vespo_lambda_neg=config.vespo_lambda_neg,
        )
        self._log_lmloss_metrics(out.metrics, entropies, mask, "train" if training else "eval")
        return out.loss

    def _log_lmloss_metrics(
        self, metrics: dict[str, torch.Tensor], entropies: torch.Tensor | None, mask: torch.Tensor, mode: str
    ) -> None:
        """TRL's metric names, averaged over ranks."""
        gather = self.accelerator.gather_for_metrics
        if entropies is not None:
            totals = gather(torch.stack([(entropies.detach() * mask).sum(), mask.sum().float()]).unsqueeze(0))
            self._metrics[mode]["entropy"].append((totals[:, 0].sum() / totals[:, 1].sum().clamp(min=1)).item())
        for name in ("kl", "vespo/phi_seq_mean"):
            if name in metrics:
                self._metrics[mode][name].append(gather(metrics[name].reshape(1)).mean().item())
        for name in ("low", "high", "region"):
            value = gather(metrics[f"clip_ratio/{name}"].reshape(1)).mean().item()
            self._metrics[mode][f"clip_ratio/{name}_mean"].append(value)
