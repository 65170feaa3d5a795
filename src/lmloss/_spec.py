"""``LossSpec``: the per-token options of every cross-entropy entry point, typed and checked once.

The option vocabularies are defined here once, as ``Literal`` types (what users and
type checkers see) and as tuples derived from them (what the checks and the command
line use). Public functions keep explicit keyword signatures and build a spec first;
a spec is frozen, so once built it is known to be valid and every backend can trust it.

Per-call data (``num_items_in_batch``, ``token_weights``) is not part of the spec: it
changes every step, the spec does not.

Entry points that pass the options on to another (the vocab-parallel functions, the
transformers integration) take them as ``**options: Unpack[LossKeywords]``, the way
transformers types its own forwarded keywords: type checkers and IDEs see every
option, the defaults are the spec's by construction, and an unknown keyword is a
``TypeError`` naming it (:func:`spec_from_keywords`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal, TypedDict, get_args

from lmloss._validation import check_bool, check_choice, check_int, check_keywords, check_real

__all__ = [
    "LossSpec",
    "LossKeywords",
    "Reduction",
    "Normalize",
    "TokenLoss",
    "Backend",
    "REDUCTIONS",
    "NORMALIZATIONS",
    "TOKEN_LOSSES",
    "BACKENDS",
    "DEFAULT_FOCAL_GAMMA",
    "MIN_SOFTCAP",
    "SPEC_OPTIONS",
    "check_loss_options",
    "spec_from_keywords",
    "check_softcap",
    "resolve_focal_gamma",
]

Reduction = Literal["mean", "sum", "none"]
Normalize = Literal["token", "sequence"]
# Per-token loss forms: plain cross-entropy, DFT (CE times the detached target
# probability) and focal weighting (CE times (1 - p)^gamma, detached or not).
TokenLoss = Literal["ce", "dft", "focal", "focal_attached"]
Backend = Literal["auto", "chunked", "reference", "triton", "triton-lowmem"]

REDUCTIONS: tuple[str, ...] = get_args(Reduction)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalize)
TOKEN_LOSSES: tuple[str, ...] = get_args(TokenLoss)
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_FOCAL_GAMMA = 2.0
# Below this softcap s, z / s overflows float32 for ordinary logits and the derivative
# 1 - tanh(z/s)^2 underflows to 0 everywhere: no useful loss, NaN gradients in float64
# (s = 1e-300). Gemma 2 uses 30; nothing sensible comes near this floor.
MIN_SOFTCAP = 1e-3


@dataclass(frozen=True)
class LossSpec:
    """The per-token options, as in :func:`lmloss.causal_lm_loss` (see its docstring).

    Raises ``ValueError``/``TypeError`` on construction when an option is invalid,
    with the message naming the option. ``gamma`` is the focal exponent in use
    (``focal_gamma`` or its default for the focal forms, 0.0 otherwise).
    """

    shift: bool = True
    ignore_index: int = -100
    reduction: Reduction = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    normalize: Normalize = "token"
    token_loss: TokenLoss = "ce"
    focal_gamma: float | None = None

    def __post_init__(self) -> None:
        check_bool("shift", self.shift)
        check_int("ignore_index", self.ignore_index)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_real("label_smoothing", self.label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        check_real("z_loss", self.z_loss)
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0.0):
            raise ValueError(f"z_loss must be a finite coefficient >= 0, got {self.z_loss}")
        check_softcap(self.softcap)
        object.__setattr__(self, "gamma", resolve_focal_gamma(self.token_loss, self.focal_gamma))

    # The focal exponent in use, derived by __post_init__ (not an option).
    gamma: float = field(init=False, default=0.0, repr=False, compare=False)

    def replace(self, **changes: object) -> LossSpec:
        """A new, checked spec with ``changes`` applied."""
        return check_loss_options(**{**self.options(), **changes})

    def options(self) -> dict[str, object]:
        """The options as keywords of a public entry point."""
        return {name: getattr(self, name) for name in SPEC_OPTIONS}

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, object]) -> LossSpec:
        """The spec of an entry point's explicit keyword parameters: call it first thing with
        ``locals()``. The parameters are the options' names (``tests/test_spec.py`` holds every
        entry point to that, and to the spec's defaults); options an entry point does not take
        keep their defaults."""
        return check_loss_options(**{name: arguments[name] for name in SPEC_OPTIONS if name in arguments})


# The option names, in signature order (every entry point spells them this way).
SPEC_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(LossSpec) if f.init)


class LossKeywords(TypedDict, total=False):
    """The options of :class:`LossSpec` as keywords, for ``**options: Unpack[LossKeywords]``;
    an absent one takes the spec's default."""

    shift: bool
    ignore_index: int
    reduction: Reduction
    label_smoothing: float
    z_loss: float
    softcap: float | None
    normalize: Normalize
    token_loss: TokenLoss
    focal_gamma: float | None


def check_loss_options(**options: object) -> LossSpec:
    """Check per-token options (keywords of :class:`LossSpec`) together; returns their spec."""
    return LossSpec(**options)  # type: ignore[arg-type]  # keywords typed object; __post_init__ checks each


def spec_from_keywords(
    where: str,
    options: Mapping[str, object],
    taken: tuple[str, ...] = SPEC_OPTIONS,
    fixed: Mapping[str, str] | None = None,
) -> LossSpec:
    """The spec of the ``**options`` that the entry point ``where`` took (those in ``taken``;
    the others keep their defaults); an unknown keyword is a ``TypeError`` naming it, with the
    reason when it is one of ``fixed`` (name -> why the entry point fixes it)."""
    check_keywords(where, options, taken, fixed)
    return check_loss_options(**options)


def check_softcap(softcap: object) -> None:
    """``softcap``: None or a finite number ``>= MIN_SOFTCAP``."""
    if softcap is None:
        return
    softcap = check_real("softcap", softcap)
    if not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if softcap < MIN_SOFTCAP:
        raise ValueError(
            f"softcap={softcap} is below the minimum {MIN_SOFTCAP}: logits / softcap would overflow and "
            "every gradient vanish; use softcap=None for no capping"
        )


def resolve_focal_gamma(token_loss: object, focal_gamma: object) -> float:
    """Check ``token_loss`` and ``focal_gamma`` together; returns the gamma to use.

    ``focal_gamma`` belongs to the focal forms only: given with any other
    ``token_loss`` it would silently do nothing, so it is refused. ``None`` means
    ``DEFAULT_FOCAL_GAMMA`` for the focal forms (0.0, unused, for the others).
    """
    check_choice("token_loss", token_loss, TOKEN_LOSSES)
    focal = token_loss in ("focal", "focal_attached")
    if focal_gamma is None:
        return DEFAULT_FOCAL_GAMMA if focal else 0.0
    if not focal:
        raise ValueError(
            f"focal_gamma={focal_gamma!r} is only used with token_loss='focal' or 'focal_attached', "
            f"but token_loss={token_loss!r}; leave focal_gamma=None"
        )
    focal_gamma = check_real("focal_gamma", focal_gamma)
    if not (math.isfinite(focal_gamma) and focal_gamma >= 0.0):
        raise ValueError(f"focal_gamma must be a finite number >= 0, got {focal_gamma}")
    return float(focal_gamma)
