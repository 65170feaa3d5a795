"""Weighting strategies: how the terms of a ``CompositeLoss`` are added up.

A strategy is any object with ``combine(losses) -> (total, weights)``, where
``losses`` maps term names to 0-dim loss tensors (attached to the graph), ``total``
is the 0-dim tensor to call ``backward()`` on and ``weights`` maps each name to the
detached 0-dim multiplier of that term (for logging). An optional
``check_terms(names)`` lets the strategy refuse a composite whose term names it
does not know. The strategies here are ``torch.nn.Module``\\ s, so ``state_dict()`` /
``load_state_dict()`` checkpoint them (learned weights as parameters, the rest as
extra state made of plain Python values), also as part of a larger module.

* ``FixedWeights``: constant weights (the default).
* ``UncertaintyWeighting``: Kendall, Gal & Cipolla (2018), learned log-variances.
* ``DynamicWeightAverage``: Liu, Johns & Davison (2019), weights from the rate at
  which each loss falls, updated once per epoch or period.
* ``GradNorm``: Chen et al. (2018), weights trained so that the gradient norms of
  the weighted terms on a shared layer follow each task's training rate
  (in ``gradnorm.py``, re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lmloss.multitask.curriculum import check_finite
from lmloss.multitask.gradnorm import GradNorm
from lmloss.multitask.terms import Losses, check_known, check_names, check_same_terms, math_dtype, weighted_sum

__all__ = [
    "DynamicWeightAverage",
    "FixedWeights",
    "GradNorm",
    "UncertaintyWeighting",
    "WeightingStrategy",
]


@runtime_checkable
class WeightingStrategy(Protocol):
    """What ``CompositeLoss`` needs from a strategy (write your own: no base class needed)."""

    def combine(self, losses: Losses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``losses``: name -> 0-dim tensor. Returns the 0-dim total and name -> detached weight."""
        ...


# --- fixed ----------------------------------------------------------------------------


class FixedWeights(nn.Module):
    """Constant weights: ``total = sum_i w_i * L_i``.

    Args:
        weights: term name -> weight (finite, >= 0); terms not named get 1.0.
            ``FixedWeights()`` adds the terms up unweighted. For weights that change
            over training, give a ``Schedule`` as the term's weight in
            ``CompositeLoss`` instead.
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self._weights = self._checked(weights or {})

    @staticmethod
    def _checked(weights: Mapping[str, float]) -> dict[str, float]:
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a dict of term name -> weight, got {weights!r}")
        checked = {}
        for name, weight in weights.items():
            value = check_finite(f"weight of term {name!r}", weight)
            if value < 0:
                raise ValueError(f"weight of term {name!r} must be >= 0, got {value}")
            checked[name] = value
        return checked

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def check_terms(self, names: Sequence[str]) -> None:
        unknown = [n for n in self._weights if n not in names]
        if unknown:
            raise ValueError(f"FixedWeights has weights for unknown term name(s) {unknown}; terms are {list(names)}")

    def combine(self, losses: Losses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = {name: self._weights.get(name, 1.0) for name in losses}
        total = weighted_sum(losses, weights)
        return total, {n: torch.tensor(w, dtype=torch.float32, device=total.device) for n, w in weights.items()}

    def get_extra_state(self) -> dict[str, Any]:
        return {"weights": dict(self._weights)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._weights = self._checked(state["weights"])


# --- uncertainty weighting ------------------------------------------------------------


class UncertaintyWeighting(nn.Module):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    ``total = sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i`` with a learned
    ``s_i = log(sigma_i^2)`` per term. This is the paper's regression form (a
    Gaussian likelihood gives ``L_i / (2 sigma_i^2) + log sigma_i``), used for every
    term, as most implementations do. The paper's classification form (a
    softmax with temperature ``sigma^2``) is approximately
    ``exp(-s_i) * L_i + 0.5 * s_i``: the same minimizer for ``L_i`` with a weight
    twice as large. The logged weight of a term is ``0.5 * exp(-s_i)``.

    The ``s_i`` live in ``self.log_vars`` (an ``nn.Parameter`` of shape ``[K]``,
    ordered as ``names``). **Add them to your optimizer**, e.g.
    ``torch.optim.AdamW([*model.parameters(), *weighting.parameters()])``; they train
    jointly with the model on the same total (usually without weight decay).

    **A term weighted 0** (e.g. a curriculum ``Schedule`` that starts at 0) gives
    ``0.5 * exp(-s_i) * 0 + 0.5 * s_i``: only the regularizer is left, its gradient
    is a constant ``0.5``, and ``s_i`` would drift down without bound, so that the
    term would start with a huge weight ``exp(-s_i)`` when the schedule turns it on.
    ``combine(losses, scales=...)`` therefore leaves out the ``0.5 * s_i`` of every
    term whose scale is 0: its ``s_i`` gets no gradient and keeps its value (weight
    decay, if the optimizer applies it, still moves it). ``CompositeLoss`` passes the
    scales of its term weights. With a scale ``c > 0`` the fixed point is
    ``s_i = log(c * L_i)``, so a schedule's scale is absorbed into ``s_i`` over time.

    Args:
        names: the term names, in a fixed order.
        init_log_var: starting ``s_i`` (0.0: every weight starts at 0.5).
    """

    def __init__(self, names: Sequence[str], *, init_log_var: float = 0.0) -> None:
        super().__init__()
        self.names = check_names(names)
        init = check_finite("init_log_var", init_log_var)
        self.log_vars = nn.Parameter(torch.full((len(self.names),), init, dtype=torch.float32))

    def check_terms(self, names: Sequence[str]) -> None:
        check_same_terms("UncertaintyWeighting", self.names, names)

    def combine(
        self, losses: Losses, *, scales: Mapping[str, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``scales``: name -> the factor already applied to the term (its curriculum
        weight; ``CompositeLoss`` passes them). A term with scale 0 keeps its weighted
        part (an exact 0, still in the graph) but not its ``0.5 * s_i``."""
        check_known("UncertaintyWeighting", self.names, losses)
        dtype = math_dtype(losses)
        parts, weights = [], {}
        for name, loss in losses.items():
            s = self.log_vars[self.names.index(name)].to(dtype)
            weight = 0.5 * torch.exp(-s)
            switched_off = scales is not None and scales.get(name, 1.0) == 0
            parts.append(weight * loss.to(dtype) + (0.0 if switched_off else 0.5 * s))
            weights[name] = weight.detach().float()
        return torch.stack(parts).sum(), weights

    def get_extra_state(self) -> dict[str, Any]:
        return {"names": list(self.names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if tuple(state["names"]) != self.names:
            raise ValueError(f"state is for terms {state['names']}, this UncertaintyWeighting has {list(self.names)}")


# --- dynamic weight average -----------------------------------------------------------


class DynamicWeightAverage(nn.Module):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    With ``L_k(t)`` the average loss of term ``k`` over period ``t`` (an epoch, or a
    window of steps of your choice), the weights of period ``t`` are::

        w_k(t-1) = L_k(t-1) / L_k(t-2)
        lambda_k(t) = K * exp(w_k(t-1) / T) / sum_j exp(w_j(t-1) / T)      (T = 2)

    and ``lambda_k = 1`` until two periods have ended (the paper's first two
    epochs). ``total = sum_k lambda_k * L_k``; the lambdas are constants (no
    gradient flows into them) and sum to ``K``.

    **Call order.** Weights change only at ``update``, called at the end of each
    period::

        for epoch in range(epochs):
            for batch in loader:
                result = composite(batch, model(batch))   # uses this period's lambdas
                ...
            dwa.update()           # mean of the losses combine() saw this period

    ``update()`` averages the losses that ``combine`` saw in training mode since
    the last update (in ``eval()`` mode nothing is recorded); ``update(losses)``
    takes the period's averages from you instead (e.g. averaged over ranks).

    Args:
        names: the term names.
        temperature: ``T``; larger is closer to equal weights.
    """

    def __init__(self, names: Sequence[str], *, temperature: float = 2.0) -> None:
        super().__init__()
        self.names = check_names(names)
        self.temperature = check_finite("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self._history: list[list[float]] = []  # the last two period averages, oldest first
        self._lambdas = [1.0] * len(self.names)
        self._reset_period()

    def _reset_period(self) -> None:
        # Sums stay tensors on the loss's device: recording a step costs no sync.
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}

    @property
    def weights(self) -> dict[str, float]:
        """The lambdas in use now."""
        return dict(zip(self.names, self._lambdas))

    def check_terms(self, names: Sequence[str]) -> None:
        check_same_terms("DynamicWeightAverage", self.names, names)

    def combine(
        self, losses: Losses, *, unscaled: Losses | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``unscaled``: the terms before any curriculum weight (``CompositeLoss`` passes
        them): the rate of change DWA measures is the task's, not its schedule's."""
        check_known("DynamicWeightAverage", self.names, losses)
        weights = {name: self._lambdas[self.names.index(name)] for name in losses}
        total = weighted_sum(losses, weights)
        if self.training:
            for name, loss in (unscaled if unscaled is not None else losses).items():
                self._sums[name] = self._sums.get(name, 0.0) + loss.detach().double()
                self._counts[name] = self._counts.get(name, 0) + 1
        return total, {n: torch.tensor(w, dtype=torch.float32, device=total.device) for n, w in weights.items()}

    def update(self, losses: Mapping[str, float | torch.Tensor] | None = None) -> dict[str, float]:
        """End a period: record its average losses and compute the next lambdas.

        Args:
            losses: name -> the period's average loss of every term; None uses the
                average of what ``combine`` recorded since the last update.

        Returns:
            The lambdas for the next period.
        """
        averages = self._period_average() if losses is None else self._given_average(losses)
        self._history = (self._history + [averages])[-2:]
        self._reset_period()
        if len(self._history) == 2:
            self._lambdas = self._dwa(*self._history)
        return self.weights

    def _period_average(self) -> list[float]:
        empty = [n for n in self.names if self._counts.get(n, 0) == 0]
        if empty:
            raise ValueError(
                f"no loss was recorded for term(s) {empty} since the last update (combine() records only "
                f"in training mode); pass the period's averages as update(losses)"
            )
        return [float(self._sums[n]) / self._counts[n] for n in self.names]

    def _given_average(self, losses: Mapping[str, float | torch.Tensor]) -> list[float]:
        check_same_terms("DynamicWeightAverage.update", self.names, losses)
        averages = []
        for name in self.names:
            value = losses[name]
            number = float(value.detach()) if torch.is_tensor(value) else value
            averages.append(check_finite(f"loss of term {name!r}", number))
        return averages

    def _dwa(self, before: list[float], last: list[float]) -> list[float]:
        for name, value in zip(self.names, before):
            if not value > 0:
                raise ValueError(
                    f"DWA divides by the previous period's loss, but term {name!r} averaged {value}; "
                    f"it needs positive losses"
                )
        rates = [now / prev / self.temperature for now, prev in zip(last, before)]
        top = max(rates)  # subtracted for a softmax that cannot overflow
        exps = [math.exp(r - top) for r in rates]
        total = math.fsum(exps)
        return [len(self.names) * e / total for e in exps]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "temperature": self.temperature,
            "history": [list(h) for h in self._history],
            "lambdas": list(self._lambdas),
            "sums": {n: float(s) for n, s in self._sums.items()},
            "counts": dict(self._counts),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if tuple(state["names"]) != self.names:
            raise ValueError(f"state is for terms {state['names']}, this DynamicWeightAverage has {list(self.names)}")
        self.temperature = float(state["temperature"])
        self._history = [[float(v) for v in h] for h in state["history"]]
        self._lambdas = [float(v) for v in state["lambdas"]]
        self._sums = {n: float(s) for n, s in state["sums"].items()}
        self._counts = {n: int(c) for n, c in state["counts"].items()}
