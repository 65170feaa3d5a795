"""GradNorm (Chen et al. 2018): loss weights trained so that the gradient norms of the
weighted terms on a shared layer follow each task's training rate.

A weighting strategy for ``CompositeLoss`` (see ``weighting.py`` for the protocol).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lmloss.multitask.curriculum import check_finite
from lmloss.multitask.terms import Losses, check_known, check_names, check_same_terms, weighted_sum

__all__ = ["GradNorm"]


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
        self.names = check_names(names)
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
        check_same_terms(f"GradNorm {what}", self.names, values)
        checked = [check_finite(f"{what}[{n!r}]", values[n]) for n in self.names]
        bad = [n for n, v in zip(self.names, checked) if v <= 0]
        if bad:
            raise ValueError(f"{what} must be > 0, but not for term(s) {bad}")
        return checked

    def check_terms(self, names: Sequence[str]) -> None:
        check_same_terms("GradNorm", self.names, names)

    @property
    def initial_losses_recorded(self) -> dict[str, bool]:
        """Name -> whether the term has its ``L_i(0)`` (it has been positive once)."""
        return {name: value is not None for name, value in zip(self.names, self._initial)}

    def combine(self, losses: Losses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_known("GradNorm", self.names, losses)
        if self._needs_renormalize:
            raise RuntimeError(
                "GradNorm: the weights were given a gradient by weight_backward() but renormalize() was not "
                "called after the weight update; use update(), or call renormalize() after stepping the weights"
            )
        # A copy, not a view: an in-place weight update later in this step must not
        # change the constants this total was built with.
        frozen = self.weights.detach().clone()
        weights = {name: frozen[self.names.index(name)] for name in losses}
        return weighted_sum(losses, weights), {n: w.float() for n, w in weights.items()}

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
        check_same_terms("GradNorm.weight_backward", self.names, losses)
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
