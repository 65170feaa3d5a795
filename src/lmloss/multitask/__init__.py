"""Several losses in one step: composite losses, weighting strategies, curricula.

* ``CompositeLoss`` (``composite.py``): named terms ``term(batch, outputs) -> Tensor``,
  each with a weight (a number or a ``Schedule``), added up by a weighting strategy;
  the result carries the total, every raw term and every weight, ready to log.
* Weighting strategies (``weighting.py``): ``FixedWeights``, ``UncertaintyWeighting``
  (Kendall et al. 2018), ``DynamicWeightAverage`` (Liu et al. 2019), ``GradNorm``
  (Chen et al. 2018). All checkpoint through ``state_dict()``.
* Curricula (``curriculum.py``): schedules over optimizer steps (constant, linear,
  cosine, stages, piecewise linear), ``MixtureSchedule`` for the mix of data sources,
  ``MixtureSampler``/``MixtureIterator`` that draw sources deterministically from a
  seed and the step, so a resumed run draws what the first one would have.
"""

from lmloss.multitask.composite import CompositeLoss, CompositeResult, Term
from lmloss.multitask.curriculum import (
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    MixtureIterator,
    MixtureSampler,
    MixtureSchedule,
    PiecewiseLinearSchedule,
    Schedule,
    StepSchedule,
    schedule_from_state,
)
from lmloss.multitask.weighting import (
    DynamicWeightAverage,
    FixedWeights,
    GradNorm,
    UncertaintyWeighting,
    WeightingStrategy,
)

__all__ = [
    "CompositeLoss",
    "CompositeResult",
    "ConstantSchedule",
    "CosineSchedule",
    "DynamicWeightAverage",
    "FixedWeights",
    "GradNorm",
    "LinearSchedule",
    "MixtureIterator",
    "MixtureSampler",
    "MixtureSchedule",
    "PiecewiseLinearSchedule",
    "Schedule",
    "StepSchedule",
    "Term",
    "UncertaintyWeighting",
    "WeightingStrategy",
    "schedule_from_state",
]
