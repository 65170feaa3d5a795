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
  the weighted terms on a shared layer follow each task's training rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lmloss.multitask.curriculum import check_finite

__all__ = [
    "DynamicWeightAverage",
    "FixedWeights",
    "GradNorm",
    "UncertaintyWeighting",
    "WeightingStrategy",
]

Losses = Mapping[str, torch.Tensor]


@runtime_checkable
class WeightingStrategy(Protocol):
    """What ``CompositeLoss`` needs from a strategy (write your own: no base class needed)."""

    def combine(self, losses: Losses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``losses``: name -> 0-dim tensor. Returns the 0-dim total and name -> detached weight."""
        ...


# --- helpers --------------------------------------------------------------------------


def _check_names(names: object) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ValueError(f"names must be a list of term names, got {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError("names must name at least one term")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"term names must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"term names must be unique, got {list(names)}")
    return names


def _check_same_terms(strategy: str, expected: Sequence[str], names: Iterable[str]) -> None:
    names = list(names)
    missing = [n for n in expected if n not in names]
    unknown = [n for n in names if n not in expected]
    if missing or unknown:
        raise ValueError(
            f"{strategy} was built for terms {list(expected)}, but the composite has {names} "
            f"(unknown: {unknown}, missing: {missing})"
        )


def _check_known(strategy: str, expected: Sequence[str], losses: Losses) -> None:
    unknown = [n for n in losses if n not in expected]
    if unknown:
        raise ValueError(f"{strategy} got unknown term name(s) {unknown}; it knows {list(expected)}")


def _math_dtype(losses: Losses) -> torch.dtype:
    """float32 for low-precision terms; float64 stays float64."""
    dtype = torch.float32
    for loss in losses.values():
        dtype = torch.promote_types(dtype, loss.dtype)
    return dtype


def _weighted_sum(losses: Losses, weights: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
    dtype = _math_dtype(losses)
    parts = [losses[name].to(dtype) * weights[name] for name in losses]
    return torch.stack(parts).sum()


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
        total = _weighted_sum(losses, weights)
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
        self.names = _check_names(names)
        init = check_finite("init_log_var", init_log_var)
        self.log_vars = nn.Parameter(torch.full((len(self.names),), init, dtype=torch.float32))

    def check_terms(self, names: Sequence[str]) -> None:
        _check_same_terms("UncertaintyWeighting", self.names, names)

    def combine(
        self, losses: Losses, *, scales: Mapping[str, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``scales``: name -> the factor already applied to the term (its curriculum
        weight; ``CompositeLoss`` passes them). A term with scale 0 keeps its weighted
        part (an exact 0, still in the graph) but not its ``0.5 * s_i``."""
        _check_known("UncertaintyWeighting", self.names, losses)
        dtype = _math_dtype(losses)
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
        self.names = _check_names(names)
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
        _check_same_terms("DynamicWeightAverage", self.names, names)

    def combine(self, losses: Losses, *, unscaled: Losses | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``unscaled``: the terms before any curriculum weight (``CompositeLoss`` passes
        them): the rate of change DWA measures is the task's, not its schedule's."""
        _check_known("DynamicWeightAverage", self.names, losses)
        weights = {name: self._lambdas[self.names.index(name)] for name in losses}
        total = _weighted_sum(losses, weights)
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
        _check_same_terms("DynamicWeightAverage.update", self.names, losses)
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


# --- GradNorm -------------------------------------------------------------------------


class GradNorm(nn.Module):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

    Learned weights ``w_i`` (``self.weights``, an ``nn.Parameter`` of shape ``[K]``,
    ordered as ``names``, summing to ``K``). At each step, on the shared parameters
    ``W`` (typically the last shared layer)::

        G_i = || grad_W (w_i * L_i) ||             r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))
        L_grad = sum_i | G_i - stopgrad(mean_j(G_j) * r_i ** alpha) |

    ``grad_w L_grad`` updates the weights only; then ``w <- K * w / sum(w)``. The
    model trains on ``total = sum_i w_i * L_i`` with the weights held constant
    (``combine`` detaches them, so the model's backward leaves ``weights.grad``
    alone). Since ``w_i > 0``, ``G_i = w_i * ||grad_W L_i||``: one gradient per
    term, no double backward.

    **L_i(0)** is the first *positive* value of term ``i`` seen by
    ``weight_backward`` (unless given as ``initial_losses``). A term can be exactly
    0 at first (a box loss on a batch without boxes, a term switched off by its
    curriculum); until it has been positive once its ratio is taken as 1
    (``L_i / L_i(0)`` is unknown, so the term counts as training at the average
    rate: neutral), and it gets its ``L_i(0)`` at its first positive value.
    ``initial_losses_recorded`` tells which terms have one.

    **Skipped steps.** When the mean ratio ``mean_j(L_j / L_j(0))`` is 0 (every
    term is 0 at this step) or not finite (a NaN or infinite term), ``r_i`` is
    undefined: ``weight_backward`` leaves the weights alone for that step (it
    sets ``weights.grad`` to None, which optimizers skip, and ``update`` takes no
    step), returns 0 and sets ``last_step_skipped``. A negative term is an error:
    GradNorm's ratios assume losses >= 0.

    **Call order**, once per optimizer step::

        result = composite(batch, outputs)              # 1. total = sum w_i(t) L_i
        gradnorm.update(result.terms, lr=0.025)         # 2. BEFORE total.backward():
                                                        #    needs the terms' graph
        result.total.backward()                         # 3. the model's gradients
        optimizer.step(); optimizer.zero_grad()         # 4. the model's update

    ``update`` does ``weight_backward`` (sets ``weights.grad``), one step (plain
    SGD with ``lr``, or ``optimizer.step()`` of an optimizer that holds only
    ``self.weights``) and ``renormalize()``. Doing these by hand is allowed; the next
    ``combine`` raises if ``renormalize()`` was forgotten. **Do not put
    ``self.weights`` in the model's optimizer.**

    Args:
        names: the term names.
        shared_parameters: ``W``: one tensor or several (their gradients are
            concatenated for the norm); they are not registered in this module.
        alpha: the restoring force ``alpha`` (1.5; 0 pulls all ``G_i`` together).
        initial_weights: name -> starting weight (> 0), rescaled to sum to ``K``;
            default 1 each.
        initial_losses: name -> ``L_i(0)`` (> 0) for every term; default: each term's
            first positive value.
        min_weight: weights are clamped to at least this before renormalizing, so a
            large step cannot make a weight negative (which would ascend its loss).
    """

    def __init__(
        self,
        names: Sequence[str],
        shared_parameters: torch.Tensor | Iterable[torch.Tensor],
        *,
        alpha: float = 1.5,
        initial_weights: Mapping[str, float] | None = None,
        initial_losses: Mapping[str, float] | None = None,
        min_weight: float = 1e-6,
    ) -> None:
        super().__init__()
        self.names = _check_names(names)
        # A plain tuple: the shared parameters belong to the model, not to this module.
        self._shared = self._check_shared(shared_parameters)
        self.alpha = check_finite("alpha", alpha)
        self.min_weight = check_finite("min_weight", min_weight)
        if self.min_weight <= 0:
            raise ValueError(f"min_weight must be > 0, got {self.min_weight}")
        start = self._positive("initial_weights", initial_weights) if initial_weights else [1.0] * len(self.names)
        self.weights = nn.Parameter(torch.tensor(start, dtype=torch.float32))
        # L_i(0) per term; None until the term has been positive once.
        given = self._positive("initial_losses", initial_losses) if initial_losses else None
        self._initial: list[float | None] = list(given) if given else [None] * len(self.names)
        self._needs_renormalize = False
        self.last_step_skipped = False
        self.renormalize()

    @staticmethod
    def _check_shared(shared: torch.Tensor | Iterable[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        params = (shared,) if isinstance(shared, torch.Tensor) else tuple(shared)
        if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
            raise ValueError("shared_parameters must be one or more tensors that require grad (e.g. a layer's weight)")
        return params

    def _positive(self, what: str, values: Mapping[str, float]) -> list[float]:
        _check_same_terms(f"GradNorm {what}", self.names, values)
        checked = [check_finite(f"{what}[{n!r}]", values[n]) for n in self.names]
        bad = [n for n, v in zip(self.names, checked) if v <= 0]
        if bad:
            raise ValueError(f"{what} must be > 0, but not for term(s) {bad}")
        return checked

    def check_terms(self, names: Sequence[str]) -> None:
        _check_same_terms("GradNorm", self.names, names)

    @property
    def initial_losses_recorded(self) -> dict[str, bool]:
        """Name -> whether the term has its ``L_i(0)`` (it has been positive once)."""
        return {name: value is not None for name, value in zip(self.names, self._initial)}

    def combine(self, losses: Losses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_known("GradNorm", self.names, losses)
        if self._needs_renormalize:
            raise RuntimeError(
                "GradNorm: the weights were given a gradient by weight_backward() but renormalize() was not "
                "called after the weight update; use update(), or call renormalize() after stepping the weights"
            )
        # A copy, not a view: an in-place weight update later in this step must not
        # change the constants this total was built with.
        frozen = self.weights.detach().clone()
        weights = {name: frozen[self.names.index(name)] for name in losses}
        return _weighted_sum(losses, weights), {n: w.float() for n, w in weights.items()}

    def _term_gradient_norms(self, losses: Losses) -> torch.Tensor:
        """``[K]``: ``||grad_W L_i||`` per term, constants (the graph of the terms is kept)."""
        norms = []
        for name in self.names:
            loss = losses[name]
            if not loss.requires_grad:
                raise ValueError(f"term {name!r} is not attached to a graph; GradNorm needs its gradient")
            try:
                grads = torch.autograd.grad(loss, self._shared, retain_graph=True, allow_unused=True)
            except RuntimeError as error:
                if "second time" in str(error) or "freed" in str(error):
                    raise RuntimeError(
                        "GradNorm needs the graph of the terms: call weight_backward()/update() before "
                        "result.total.backward() (or use backward(retain_graph=True))"
                    ) from error
                raise
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else self.weights.new_zeros(()))
        return torch.stack(norms).to(self.weights.device)

    def weight_backward(self, losses: Losses) -> torch.Tensor:
        """Set ``self.weights.grad`` to ``grad_w L_grad`` (overwriting it); returns ``L_grad``.

        Args:
            losses: name -> the raw (unweighted) 0-dim term of this step, still
                attached to the graph (``CompositeResult.terms``). Every term is needed.

        Returns:
            The detached 0-dim ``L_grad`` (0 when the step is skipped: see the class).

        The term values are read on the host (one sync per call) to record ``L_i(0)``
        and to decide whether the step is skipped.
        """
        _check_same_terms("GradNorm.weight_backward", self.names, losses)
        current = torch.stack([losses[n].detach().reshape(()).float() for n in self.names]).to(self.weights.device)
        ratios = self._ratios(current.tolist())
        mean_ratio = math.fsum(ratios) / len(ratios)
        self.last_step_skipped = not (math.isfinite(mean_ratio) and mean_ratio > 0)
        if self.last_step_skipped:
            # r_i = ratio / mean is 0/0 or NaN: no target to pull the weights towards.
            self.weights.grad = None
            self._needs_renormalize = False
            return self.weights.new_zeros(())
        norms = self._term_gradient_norms(losses)
        gradient_norms = self.weights * norms  # G_i, differentiable in w_i
        rate = torch.tensor(ratios, dtype=torch.float32, device=current.device) / mean_ratio
        target = (gradient_norms.mean() * rate**self.alpha).detach()
        l_grad = (gradient_norms - target).abs().sum()
        (grad,) = torch.autograd.grad(l_grad, self.weights)
        self.weights.grad = grad
        self._needs_renormalize = True
        return l_grad.detach()

    def _ratios(self, current: list[float]) -> list[float]:
        """``L_i / L_i(0)`` per term, recording ``L_i(0)`` at a term's first positive value.

        A term without ``L_i(0)`` yet has ratio 1 (neutral); a non-finite term gives a
        non-finite ratio (and the step is skipped), a negative one is an error.
        """
        negative = [n for n, value in zip(self.names, current) if value < 0]
        if negative:
            values = {n: current[self.names.index(n)] for n in negative}
            raise ValueError(f"GradNorm needs losses >= 0 (its ratios L_i / L_i(0) are rates), got {values}")
        ratios = []
        for i, value in enumerate(current):
            if not math.isfinite(value):
                ratios.append(value)  # even before its L_i(0): this step cannot be used
                continue
            if self._initial[i] is None and value > 0:
                self._initial[i] = value
            initial = self._initial[i]
            ratios.append(1.0 if initial is None else value / initial)
        return ratios

    def renormalize(self) -> None:
        """``w <- K * w / sum(w)`` after clamping to ``min_weight``; call after each weight step."""
        with torch.no_grad():
            self.weights.clamp_(min=self.min_weight)
            self.weights.mul_(len(self.names) / self.weights.sum())
        self._needs_renormalize = False

    def update(
        self, losses: Losses, *, lr: float | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.Tensor:
        """One GradNorm step on the weights: ``weight_backward``, a step, ``renormalize``.

        Args:
            losses: as in ``weight_backward``.
            lr: plain SGD, ``w <- w - lr * grad``.
            optimizer: or an optimizer over ``self.weights`` (e.g. Adam); give one of the two.

        Returns:
            The detached ``L_grad``.
        """
        if (lr is None) == (optimizer is None):
            raise ValueError("GradNorm.update takes exactly one of lr= or optimizer=")
        if optimizer is not None and not any(p is self.weights for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer given to GradNorm.update does not hold gradnorm.weights")
        l_grad = self.weight_backward(losses)
        if self.last_step_skipped:
            return l_grad  # weights unchanged (no optimizer step: Adam would still move them)
        if optimizer is not None:
            optimizer.step()
        else:
            step = check_finite("lr", lr)
            if step <= 0:
                raise ValueError(f"lr must be > 0, got {step}")
            grad = self.weights.grad
            assert grad is not None  # set by weight_backward, as the step was not skipped
            with torch.no_grad():
                self.weights.sub_(step * grad)
        self.weights.grad = None
        self.renormalize()
        return l_grad

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "alpha": self.alpha,
            "min_weight": self.min_weight,
            "initial_losses": list(self._initial),  # None for a term not yet positive
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if tuple(state["names"]) != self.names:
            raise ValueError(f"state is for terms {state['names']}, this GradNorm has {list(self.names)}")
        self.alpha = float(state["alpha"])
        self.min_weight = float(state["min_weight"])
        initial = state["initial_losses"]
        if initial is None:  # saved before any step by an older version
            initial = [None] * len(self.names)
        self._initial = [None if v is None else float(v) for v in initial]
        self._needs_renormalize = False
        self.last_step_skipped = False
