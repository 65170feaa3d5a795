"""Deprecated alias of :mod:`lmloss.accounting` (step accounting: ``count_targets``, ``micro_batches``).

Kept so that ``from lmloss.normalize import count_targets`` keeps working; import
from ``lmloss.accounting`` (or ``lmloss``) instead.
"""

from __future__ import annotations

import warnings

from lmloss.accounting import MicroBatch, count_targets, micro_batches

__all__ = ["MicroBatch", "count_targets", "micro_batches"]

warnings.warn(
    "lmloss.normalize is renamed lmloss.accounting; import count_targets, micro_batches and MicroBatch from there",
    DeprecationWarning,
    stacklevel=2,
)
