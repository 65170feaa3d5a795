"""CompositeLoss: named loss terms, weighted by a strategy, logged by name.

A term is any callable ``term(batch, outputs) -> Tensor`` returning a scalar loss
(a function, a lambda, an ``nn.Module`` such as ``lmloss.nn.CausalLMLoss`` wrapped
in a lambda, or an object with ``__call__``): no base class to inherit. Each term
has a weight, a number or a ``Schedule`` over optimizer steps (a curriculum), that
scales it before the weighting strategy sees it::

    total = strategy.combine({name: weight_i(step) * L_i})

With the default ``FixedWeights()`` that is ``sum_i weight_i(step) * L_i``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lmloss._validation import value_checks_enabled
from lmloss.multitask.curriculum import Schedule, check_finite, check_step, schedule_from_state
from lmloss.multitask.weighting import FixedWeights, WeightingStrategy

__all__ = ["CompositeLoss", "CompositeResult", "Term"]

Term = Callable[[Any, Any], torch.Tensor]
OnNonFinite = Literal["raise", "skip"]
_RESERVED = ("total",)


@dataclass(frozen=True)
class CompositeResult:
    """What one call of a ``CompositeLoss`` returns.

    Attributes:
        total: 0-dim float32 (float64 if a term is float64) tensor to ``backward()``.
        terms: name -> the raw, unweighted 0-dim term, still attached to the graph
            (what ``GradNorm.update`` needs); skipped terms are absent.
        weights: name -> detached 0-dim tensor, the factor that multiplies the raw
            term in ``total`` (curriculum weight times strategy weight; 0 if skipped).
        skipped: names of terms left out of ``total`` because they were not finite.
        step: the optimizer step the weights were evaluated at.

    ``lmloss.monitor.LossMonitor.update(step, loss=result.total, terms=result.terms)``
    watches every term; ``result.log()`` gives floats for any other logger.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    skipped: tuple[str, ...] = ()
    step: int = 0
    _raw_values: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def log(self, prefix: str = "") -> dict[str, float]:
        """Floats for a logger: ``loss/total``, ``loss/<name>``, ``weight/<name>``.

        ``prefix`` is put in front of every key (e.g. ``"train/"``). Skipped terms log
        their non-finite value. One host-device copy for all values.
        """
        keys = [f"{prefix}loss/total"]
        values = [self.total.detach().float().reshape(())]
        for name, raw in self._raw_values.items():
            keys += [f"{prefix}loss/{name}", f"{prefix}weight/{name}"]
            values += [raw.detach().float().reshape(()).to(values[0].device), self.weights[name].to(values[0].device)]
        return dict(zip(keys, torch.stack(values).tolist()))


class CompositeLoss(nn.Module):
    """Named loss terms added up by a weighting strategy.

    Args:
        terms: name -> term callable, ``term(batch, outputs) -> 0-dim Tensor``.
        weights: name -> weight of a term of ``terms``: a number >= 0 or a
            ``Schedule`` (evaluated at ``step``, must stay >= 0); default 1.0.
        weighting: the strategy (``FixedWeights()`` by default); an ``nn.Module``
            strategy becomes a submodule, so its learned parameters appear in
            ``self.parameters()`` and its state in ``self.state_dict()``.
        on_nonfinite: ``"raise"`` (a ValueError naming the term) or ``"skip"`` (leave
            the term out of this step's total, warn, and list it in
            ``result.skipped``). Checking reads the terms' values (one host sync per
            call); under ``lmloss.validation(False)`` ``"raise"`` does not check.

    Example::

        loss_fn = CompositeLoss(
            {"text": lambda b, o: causal_lm_loss(o.logits, b["labels"]),
             "box": lambda b, o: box_l1(o.boxes, b["boxes"])},
            weights={"box": LinearSchedule(0.0, 2.0, 0, 1000)},
        )
        result = loss_fn(batch, outputs, step=optimizer_step)
        result.total.backward()
        logger.log(result.log(prefix="train/"))

    Terms that are ``nn.Module``\\ s are registered as submodules (``self.term_modules``),
    so ``.to(device)`` and ``state_dict()`` include them.

    Note: a strategy whose ``combine`` takes ``scales=`` gets each term's weight at
    this step. ``UncertaintyWeighting`` uses it to leave the ``0.5 * s_i`` of a term
    weighted 0 out of the total (else its log-variance would drift down without
    bound while a schedule holds the term at 0, and the term would come back with a
    huge weight); see its docstring.
    """

    def __init__(
        self,
        terms: Mapping[str, Term] | None = None,
        *,
        weights: Mapping[str, float | Schedule] | None = None,
        weighting: WeightingStrategy | None = None,
        on_nonfinite: OnNonFinite = "raise",
    ) -> None:
        super().__init__()
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not supported; use 'raise' or 'skip'")
        if weighting is None:
            weighting = FixedWeights()
        if not callable(getattr(weighting, "combine", None)):
            raise ValueError(f"weighting must have a combine(losses) method, got {type(weighting).__name__}")
        self.on_nonfinite = on_nonfinite
        self.weighting = weighting
        self.term_modules = nn.ModuleDict()
        self._terms: dict[str, Term] = {}
        self._weights: dict[str, float | Schedule] = {}
        self._step = 0
        terms = dict(terms or {})
        unknown = [name for name in (weights or {}) if name not in terms]
        if unknown:
            raise ValueError(f"weights given for unknown term name(s) {unknown}; terms are {list(terms)}")
        for name, term in terms.items():
            self.add(name, term, weight=(weights or {}).get(name, 1.0))

    # --- building -----------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._terms)

    @property
    def current_step(self) -> int:
        """The step of the last call (0 before any)."""
        return self._step

    def add(self, name: str, term: Term, *, weight: float | Schedule = 1.0) -> CompositeLoss:
        """Add a term; returns ``self`` so calls chain."""
        # '/' separates the parts of logged names (loss/<name>) and '.' those of state_dict keys.
        if not isinstance(name, str) or not name or "." in name or "/" in name or name in _RESERVED:
            raise ValueError(f"a term name must be a non-empty string without '.' or '/', not 'total'; got {name!r}")
        if name in self._terms:
            raise ValueError(f"a term named {name!r} already exists")
        if not callable(term):
            raise ValueError(f"term {name!r} must be callable as term(batch, outputs), got {type(term).__name__}")
        self._weights[name] = self._check_weight(name, weight)
        self._terms[name] = term
        if isinstance(term, nn.Module):
            self.term_modules[name] = term
        return self

    def set_weight(self, name: str, weight: float | Schedule) -> None:
        """Replace the weight (number or schedule) of an existing term."""
        self._require_term(name)
        self._weights[name] = self._check_weight(name, weight)

    def weight(self, name: str) -> float | Schedule:
        """The weight (number or schedule) given to a term."""
        self._require_term(name)
        return self._weights[name]

    def _require_term(self, name: str) -> None:
        if name not in self._terms:
            raise ValueError(f"unknown term name {name!r}; terms are {list(self._terms)}")

    @staticmethod
    def _check_weight(name: str, weight: object) -> float | Schedule:
        if isinstance(weight, Schedule):
            return weight
        value = check_finite(f"weight of term {name!r}", weight)
        if value < 0:
            raise ValueError(f"weight of term {name!r} must be >= 0, got {value}")
        return value

    # --- the call -----------------------------------------------------------------------

    def forward(self, batch: Any, outputs: Any, *, step: int | None = None) -> CompositeResult:
        """Evaluate every term and combine them.

        Args:
            batch: passed to every term as is.
            outputs: passed to every term as is (e.g. the model's outputs).
            step: the optimizer step; required when a weight is a ``Schedule``.
        """
        if not self._terms:
            raise ValueError("CompositeLoss has no terms; add one with add(name, term)")
        self._set_step(step)
        scales = {name: self._scale(name) for name in self._terms}
        raw = {name: self._evaluate(name, term, batch, outputs) for name, term in self._terms.items()}
        skipped = self._nonfinite(raw)
        if hasattr(self.weighting, "check_terms"):
            self.weighting.check_terms(self.names)
        kept = {name: loss for name, loss in raw.items() if name not in skipped}
        scaled = {name: loss if scales[name] == 1.0 else loss * scales[name] for name, loss in kept.items()}
        accepts = inspect.signature(self.weighting.combine).parameters
        extra: dict[str, Any] = {}
        if "unscaled" in accepts:
            # Loss-rate strategies (DWA) must see the task's loss, not loss x its schedule.
            extra["unscaled"] = kept
        if "scales" in accepts:
            # UncertaintyWeighting must not learn a term that its weight switches off.
            extra["scales"] = {name: scales[name] for name in kept}
        total, strategy_weights = self.weighting.combine(scaled, **extra)
        weights = {}
        for name in raw:
            factor = strategy_weights[name] * scales[name] if name in kept else torch.zeros(())
            weights[name] = factor.detach().float().reshape(()).to(total.device)
        return CompositeResult(total, kept, weights, tuple(skipped), self._step, raw)

    def _set_step(self, step: int | None) -> None:
        if step is not None:
            self._step = check_step("step", step)
            return
        scheduled = [n for n, w in self._weights.items() if isinstance(w, Schedule)]
        if scheduled:
            raise ValueError(f"term(s) {scheduled} have scheduled weights: pass step=<optimizer step>")

    def _scale(self, name: str) -> float:
        weight = self._weights[name]
        if not isinstance(weight, Schedule):
            return weight
        weight.set_step(self._step)
        value = weight.value()
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"the schedule of term {name!r} gives weight {value} at step {self._step}; need >= 0")
        return value

    @staticmethod
    def _evaluate(name: str, term: Term, batch: Any, outputs: Any) -> torch.Tensor:
        loss = term(batch, outputs)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"term {name!r} must return a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"term {name!r} must return a scalar loss, got shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise ValueError(f"term {name!r} must return a floating-point loss, got dtype {loss.dtype}")
        # float32 math for low-precision terms (float64 stays float64).
        return loss.reshape(()).to(torch.promote_types(loss.dtype, torch.float32))

    def _nonfinite(self, raw: dict[str, torch.Tensor]) -> list[str]:
        if self.on_nonfinite == "raise" and not value_checks_enabled():
            return []
        names = list(raw)
        device = raw[names[0]].device
        finite = torch.stack([raw[n].detach().isfinite().to(device) for n in names]).tolist()
        bad = [n for n, ok in zip(names, finite) if not ok]
        if not bad:
            return []
        values = {n: float(raw[n].detach()) for n in bad}
        if self.on_nonfinite == "raise":
            raise ValueError(
                f"loss term(s) {bad} are not finite ({values}); fix the term or build the CompositeLoss "
                f"with on_nonfinite='skip'"
            )
        if len(bad) == len(names):
            raise ValueError(f"every loss term is non-finite ({values}): nothing left to train on at this step")
        warnings.warn(f"CompositeLoss: skipping non-finite term(s) {values} at step {self._step}", stacklevel=3)
        return bad

    # --- checkpointing ------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        weights = {n: w.state_dict() if isinstance(w, Schedule) else w for n, w in self._weights.items()}
        return {"step": self._step, "weights": weights}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state["weights"]
        if set(saved) != set(self._terms):
            raise ValueError(f"the state has terms {sorted(saved)}, this CompositeLoss has {sorted(self._terms)}")
        for name, weight in saved.items():
            current = self._weights[name]
            if isinstance(weight, Mapping):
                restored = schedule_from_state(weight)
                if type(current) is type(restored):
                    current.load_state_dict(weight)  # keep the object the caller holds
                    restored = current
                self._weights[name] = restored
            else:
                self._weights[name] = self._check_weight(name, weight)
        self._step = check_step("step", state["step"])
