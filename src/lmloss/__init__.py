"""lmloss: the loss layer of causal language model training in PyTorch.

The pipeline, one module each: ``labels`` (which tokens are trained) ->
``batching`` (padding, packing) -> ``reference`` (the loss on logits) and
``fused`` (the loss from hidden states, without logits) ->
``normalize`` (token counts across micro-batches and ranks).
"""

from lmloss import batching, fused, labels, nn
from lmloss._validation import validation
from lmloss.batching import PackingCollator, PaddingCollator
from lmloss.fused import linear_cross_entropy
from lmloss.labels import Example, encode_chat, encode_dataset, encode_prompt_completion, mask_token_ids
from lmloss.normalize import MicroBatch, count_targets, micro_batches
from lmloss.reference import causal_lm_loss

__version__ = "0.1.0"

__all__ = [
    "Example",
    "MicroBatch",
    "PackingCollator",
    "PaddingCollator",
    "batching",
    "causal_lm_loss",
    "count_targets",
    "encode_chat",
    "encode_dataset",
    "encode_prompt_completion",
    "fused",
    "labels",
    "linear_cross_entropy",
    "mask_token_ids",
    "micro_batches",
    "nn",
    "validation",
    "__version__",
]
