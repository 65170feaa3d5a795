"""lmloss: the loss layer of causal language model training in PyTorch.

The pipeline: ``labels`` (which tokens are trained) -> ``batching`` (padding,
packing) -> ``reference`` (the loss) -> ``normalize`` (token counts across
micro-batches and ranks).
"""

from lmloss import nn
from lmloss._validation import validation
from lmloss.normalize import MicroBatch, count_targets, micro_batches
from lmloss.reference import causal_lm_loss

__version__ = "0.1.0"

__all__ = [
    "MicroBatch",
    "causal_lm_loss",
    "count_targets",
    "micro_batches",
    "nn",
    "validation",
    "__version__",
]
