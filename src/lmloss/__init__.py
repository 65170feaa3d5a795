"""lmloss: the loss layer of causal language model training in PyTorch.

The pipeline, one module each: ``labels`` (which tokens are trained) ->
``batching`` (padding, packing) -> ``reference`` (the loss on logits) and
``fused`` (the loss from hidden states, without logits) ->
``accounting`` (token counts across micro-batches and ranks) -> ``parallel``
(vocab-parallel loss) -> ``multitask`` (several loss terms, weighting, curricula),
``distill`` (knowledge distillation) and ``grounding`` (boxes as tokens);
``logprobs`` (per-token log-probs and entropy), ``rl`` (GRPO-family policy losses)
and ``preference`` (DPO family) for post-training.
``monitor`` watches the loss; ``integrations.transformers`` plugs lmloss into
transformers models and ``Trainer``; ``train`` is the ``lmloss train`` command.
"""

from lmloss import (
    accounting,
    batching,
    distill,
    fused,
    grounding,
    integrations,
    labels,
    multitask,
    nn,
    parallel,
    preference,
    rl,
)
from lmloss._spec import LossKeywords, LossSpec
from lmloss._validation import validation
from lmloss.accounting import MicroBatch, count_targets, micro_batches
from lmloss.batching import PackingCollator, PaddingCollator
from lmloss.distill import distillation_loss, linear_distillation_loss
from lmloss.fused import linear_cross_entropy
from lmloss.labels import Example, encode_chat, encode_dataset, encode_prompt_completion, mask_token_ids
from lmloss.logprobs import TokenLogprobs, linear_token_logprobs, token_logprobs
from lmloss.multitask import CompositeLoss
from lmloss.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from lmloss.reference import causal_lm_loss

__version__ = "0.1.0"

__all__ = [
    "CompositeLoss",
    "Example",
    "LossKeywords",
    "LossSpec",
    "MicroBatch",
    "PackingCollator",
    "PaddingCollator",
    "TokenLogprobs",
    "accounting",
    "batching",
    "causal_lm_loss",
    "count_targets",
    "distill",
    "distillation_loss",
    "encode_chat",
    "encode_dataset",
    "encode_prompt_completion",
    "fused",
    "grounding",
    "integrations",
    "labels",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_token_logprobs",
    "mask_token_ids",
    "micro_batches",
    "multitask",
    "nn",
    "parallel",
    "preference",
    "rl",
    "token_logprobs",
    "validation",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "__version__",
]
