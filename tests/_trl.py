"""TRL 1.16's own GRPO loss code, called on given log-probs (no model, no generation).

``GRPOTrainer._compute_loss`` reads a handful of trainer attributes and asks
``_get_per_token_logps_and_entropies`` for the log-probs; a trainer object made
without ``__init__`` with just those attributes runs TRL's real method unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch


class _Accelerator:
    num_processes = 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def trl_grpo_loss(
    logprobs: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    *,
    loss_type: str,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    accumulation_steps: int = 1,
    use_bias_correction_kl: bool = False,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """TRL's ``_compute_loss`` with ``logprobs`` ([B, T], differentiable) as the policy's log-probs."""
    from trl import GRPOTrainer

    trainer: Any = GRPOTrainer.__new__(GRPOTrainer)
    trainer.loss_type = loss_type
    trainer.epsilon_low = epsilon
    trainer.epsilon_high = epsilon if epsilon_high is None else epsilon_high
    trainer.beta = beta
    trainer.importance_sampling_level = importance_sampling_level
    trainer.max_completion_length = max_completion_length
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = False
    trainer.current_gradient_accumulation_steps = accumulation_steps
    trainer.accelerator = _Accelerator()
    trainer.model = SimpleNamespace(training=True)
    trainer.args = SimpleNamespace(
        delta=delta,
        use_bias_correction_kl=use_bias_correction_kl,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        steps_per_generation=accumulation_steps,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
    )
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    entropies = torch.zeros_like(logprobs.detach())
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropies, None)
    batch = dict(inputs)
    b, t = logprobs.shape
    batch.setdefault("prompt_ids", torch.zeros(b, 1, dtype=torch.long))
    batch.setdefault("prompt_mask", torch.ones(b, 1, dtype=torch.long))
    batch.setdefault("completion_ids", torch.zeros(b, t, dtype=torch.long))
    loss = trainer._compute_loss(None, batch)
    return loss, dict(trainer._metrics["train"])
