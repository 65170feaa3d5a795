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

# Each module's __all__ is the one list of its public names; the package exports them all.
# Star imports bind exactly those names (and type checkers follow them, unlike
# `__all__ += module.__all__` after explicit imports).
from lmloss.multitask import composite, curriculum, weighting
from lmloss.multitask.composite import *  # noqa: F403
from lmloss.multitask.curriculum import *  # noqa: F403
from lmloss.multitask.weighting import *  # noqa: F403

__all__ = composite.__all__ + curriculum.__all__ + weighting.__all__
