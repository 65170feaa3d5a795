"""LossSpec: the options checked once, and every entry point spelling them alike."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch
from typing_extensions import Unpack

import lmloss
from lmloss import distill, nn, parallel
from lmloss._spec import (
    BACKENDS,
    MIN_SOFTCAP,
    NORMALIZATIONS,
    SPEC_OPTIONS,
    TOKEN_LOSSES,
    LossKeywords,
    LossSpec,
)
from lmloss.integrations import transformers as hf
from lmloss.integrations.transformers import loss as hf_loss
from lmloss.logprobs import LogprobKeywords, LogprobSpec
from lmloss.train import config as train_config

SPEC_FIELDS = {f.name: f for f in dataclasses.fields(LossSpec) if f.init}
PER_CALL = {"num_items_in_batch": None, "token_weights": None, "class_weights": None}
# Cross-entropy entry points that do not take class_weights ([V], torch's weight=), and why.
CLASS_WEIGHTS_FIXED = {
    "integrations.transformers": "Trainer's num_items_in_batch counts target tokens, not the targets' class "
    "weights, so torch's weighted mean could not be kept across micro-batches",
    "lmloss train": "a [V] tensor is not a command-line flag",
}


def _parameters(function: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)  # type: ignore[arg-type]  # signature() takes any callable


def _assert_spelled_like_the_spec(where: str, params: dict[str, inspect.Parameter], names: list[str]) -> None:
    for name in names:
        assert name in params, f"{where} misses the option {name}"
        param, spec_field = params[name], SPEC_FIELDS[name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{where}: {name} must be keyword-only"
        assert param.default == spec_field.default and type(param.default) is type(spec_field.default), (
            f"{where}: {name} defaults to {param.default!r}, the spec to {spec_field.default!r}"
        )
        # Annotations are strings (from __future__ import annotations): the same text.
        assert str(param.annotation) == str(spec_field.type), f"{where}: {name} is typed {param.annotation}"


# Entry points with explicit keyword parameters (the contract's functions, the modules) ...
FUNCTIONS = [lmloss.causal_lm_loss, lmloss.linear_cross_entropy]
# ... and those that pass the options on as ``**options: Unpack[LossKeywords]``.
KEYWORD_FUNCTIONS = [parallel.vocab_parallel_cross_entropy, parallel.vocab_parallel_linear_cross_entropy]


def _hints(cls: object) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _unpacked(function: object, name: str) -> object:
    """The TypedDict of ``function``'s ``**name: Unpack[...]``."""
    param = _parameters(function)[name]
    assert param.kind is inspect.Parameter.VAR_KEYWORD, f"{name} is not **{name}"
    hint = typing.get_type_hints(function, include_extras=True)[name]
    assert typing.get_origin(hint) is Unpack, hint
    return typing.get_args(hint)[0]


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_functions_take_every_option_with_the_spec_default(function):
    params = _parameters(function)
    _assert_spelled_like_the_spec(function.__name__, params, list(SPEC_OPTIONS))
    for name, default in PER_CALL.items():
        assert params[name].default is default


def test_loss_keywords_are_the_spec_options_with_their_types():
    spec_hints = _hints(LossSpec)
    assert list(_hints(LossKeywords)) == list(SPEC_OPTIONS)
    for name, hint in _hints(LossKeywords).items():
        assert hint == spec_hints[name], f"LossKeywords types {name} as {hint}, LossSpec as {spec_hints[name]}"
    assert not LossKeywords.__required_keys__, "an absent option takes the spec's default"


@pytest.mark.parametrize("function", KEYWORD_FUNCTIONS, ids=lambda f: f.__name__)
def test_keyword_functions_take_every_option_and_refuse_unknown_ones(function):
    assert _unpacked(function, "options") is LossKeywords
    params = _parameters(function)
    assert not set(SPEC_OPTIONS) & set(params), "an option spelled twice"
    for name, default in PER_CALL.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is default
    inputs = (torch.zeros(1, 3, 4), torch.zeros(5, 4), torch.zeros(1, 3, dtype=torch.long))
    args = inputs[1:] if function is parallel.vocab_parallel_cross_entropy else inputs
    # Checked before any collective: no process group is needed to be told.
    with pytest.raises(TypeError, match=rf"{function.__name__}\(\) got an unexpected keyword argument 'z_los'"):
        function(*args, group=None, z_los=1e-4)
    with pytest.raises(ValueError, match="z_loss must be a finite coefficient"):
        function(*args, group=None, z_loss=-1.0)


@pytest.mark.parametrize("module", [nn.CausalLMLoss, nn.LinearCrossEntropyLoss], ids=lambda m: m.__name__)
def test_modules_take_every_option_with_the_spec_default(module):
    _assert_spelled_like_the_spec(module.__name__, _parameters(module.__init__), list(SPEC_OPTIONS))


def test_sft_trainer_takes_every_option_it_does_not_fix_with_the_spec_default():
    from lmloss.integrations.trl import LMLossSFTTrainer

    params = _parameters(LMLossSFTTrainer.__init__)
    # TRL's SFTTrainer shifts, means over the step's targets and masks with -100 itself.
    taken = [name for name in SPEC_OPTIONS if name not in ("shift", "reduction", "ignore_index")]
    _assert_spelled_like_the_spec("LMLossSFTTrainer", params, taken)


@pytest.mark.parametrize("function", [hf.apply, hf.trainer_loss], ids=lambda f: f.__name__)
def test_transformers_integration_takes_every_option_it_does_not_fix(function):
    params = _parameters(function)
    assert "class_weights" not in params and "integrations.transformers" in CLASS_WEIGHTS_FIXED
    keywords = _unpacked(function, "loss_options")
    assert keywords is hf_loss.ModelLossKeywords
    taken = [name for name in SPEC_OPTIONS if name not in hf.SPEC_OPTIONS_FIXED]
    spec_hints = _hints(LossSpec)
    assert list(_hints(keywords)) == taken
    assert all(hint == spec_hints[name] for name, hint in _hints(keywords).items())
    assert not set(SPEC_OPTIONS) & set(params), "an option spelled twice"


def test_transformers_integration_names_a_fixed_option_and_why():
    with pytest.raises(TypeError, match=r"trainer_loss\(\) does not take softcap: the model's final_logit_softcapping"):
        hf.trainer_loss(softcap=30.0)  # type: ignore[call-arg]  # a fixed option on purpose
    with pytest.raises(TypeError, match=r"trainer_loss\(\) got an unexpected keyword argument 'label_smothing'"):
        hf.trainer_loss(label_smothing=0.1)  # type: ignore[call-arg]  # a misspelled option on purpose
    assert hf.trainer_loss(label_smoothing=0.1, z_loss=1) is not None


LOGPROB_FIELDS = {f.name: f for f in dataclasses.fields(LogprobSpec)}


@pytest.mark.parametrize("function", [lmloss.token_logprobs, lmloss.linear_token_logprobs], ids=lambda f: f.__name__)
def test_logprob_functions_take_every_option_with_the_spec_default(function):
    params = _parameters(function)
    for name, spec_field in LOGPROB_FIELDS.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == spec_field.default and str(params[name].annotation) == str(spec_field.type)
    assert _unpacked(parallel.vocab_parallel_linear_token_logprobs, "options") is LogprobKeywords
    assert _hints(LogprobKeywords) == _hints(LogprobSpec)


def test_backend_options_are_spelled_alike():
    for function in (lmloss.linear_cross_entropy, nn.LinearCrossEntropyLoss.__init__, hf.apply):
        params = _parameters(function)
        assert params["backend"].default == "auto" and params["chunk_size"].default is None
        assert str(params["backend"].annotation) == "Backend"
    assert typing.get_args(lmloss._spec.Backend) == BACKENDS


def test_modules_take_class_weights_as_torch_names_them():
    """torch.nn.CrossEntropyLoss(weight=...): CausalLMLoss under that name and lmloss's;
    LinearCrossEntropyLoss only as class_weights (its forward's weight is the lm_head's)."""
    causal, linear = _parameters(nn.CausalLMLoss.__init__), _parameters(nn.LinearCrossEntropyLoss.__init__)
    for params, names in ((causal, ("weight", "class_weights")), (linear, ("class_weights",))):
        for name in names:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None
    assert "weight" not in linear


def test_train_config_takes_every_option_it_does_not_fix():
    fields = {f.name: f for f in dataclasses.fields(train_config.TrainConfig)}
    assert "class_weights" not in fields and "lmloss train" in CLASS_WEIGHTS_FIXED
    for name in SPEC_OPTIONS:
        if name in train_config.LOSS_OPTIONS_FIXED:
            assert name not in fields
            continue
        assert name in fields, f"lmloss train misses the loss option --{name.replace('_', '-')}"
        assert fields[name].default == SPEC_FIELDS[name].default, f"--{name}: default {fields[name].default!r}"
    assert fields["token_loss"].metadata["choices"] == TOKEN_LOSSES
    assert fields["normalize"].metadata["choices"] == NORMALIZATIONS
    assert fields["loss_backend"].metadata["choices"] == BACKENDS
    assert not hasattr(train_config, "TOKEN_LOSSES") or train_config.TOKEN_LOSSES is TOKEN_LOSSES


def test_spec_checks_options_once_with_named_errors():
    assert LossSpec().gamma == 0.0 and LossSpec(token_loss="focal").gamma == 2.0
    with pytest.raises(ValueError, match="reduction='avg' is not supported"):
        LossSpec(reduction="avg")  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match=r"focal_gamma=3\.0 is only used with"):
        LossSpec(focal_gamma=3.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        LossSpec(ignore_index=1.5)  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossSpec().reduction = "sum"  # type: ignore[misc]  # assigning to a frozen field on purpose
    assert LossSpec().replace(reduction="sum").reduction == "sum"


@pytest.mark.parametrize("softcap", [1e-300, 1e-8, MIN_SOFTCAP / 2])
def test_softcap_below_the_minimum_is_refused(softcap):
    """Issue 12: softcap=1e-300 gave NaN gradients on the reference backend."""
    logits, labels = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True), torch.randint(0, 7, (2, 5))
    with pytest.raises(ValueError, match=rf"softcap={softcap} is below the minimum {MIN_SOFTCAP}"):
        lmloss.causal_lm_loss(logits, labels, softcap=softcap)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_at_the_minimum_gives_finite_gradients(backend, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = (100 * torch.randn(2, 6, 5, generator=g, dtype=dtype)).requires_grad_()
    weight = torch.randn(11, 5, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    loss = lmloss.linear_cross_entropy(hidden, weight, labels, softcap=MIN_SOFTCAP, z_loss=1e-2, backend=backend)
    loss.backward()
    assert bool(loss.isfinite()) and bool(hidden.grad.isfinite().all()) and bool(weight.grad.isfinite().all())


# --- modules hold a spec: setting an option validates it and takes effect ------------------


def _distill_inputs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    w = torch.randn(13, 8, generator=g, dtype=torch.float64)
    th, tw = (
        torch.randn(2, 6, 5, generator=g, dtype=torch.float64),
        torch.randn(13, 5, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 13, (2, 6), generator=g)
    return h, w, th, tw, labels


def test_setting_distillation_temperature_takes_effect():
    """It was silently ignored: forward used the options captured at construction."""
    h, w, th, tw, labels = _distill_inputs()
    s, t = h @ w.T, th @ tw.T
    module = nn.DistillationLoss()
    module.temperature = 3.0
    module.alpha = 0.5
    want = distill.distillation_loss(s, t, labels, temperature=3.0, alpha=0.5)
    assert module.temperature == 3.0
    torch.testing.assert_close(module(s, t, labels), want)
    assert not torch.allclose(want, distill.distillation_loss(s, t, labels))
    linear = nn.LinearDistillationLoss()
    linear.temperature, linear.alpha, linear.chunk_size = 3.0, 0.5, 2
    torch.testing.assert_close(linear(h, w, th, tw, labels), want)
    with pytest.raises(ValueError, match="temperature"):
        module.temperature = 0.0
    with pytest.raises(ValueError, match="chunk_size"):
        linear.chunk_size = 0
    assert module.temperature == 3.0 and linear.chunk_size == 2  # unchanged by the refused values


@pytest.mark.parametrize(
    "module, option, value, bad",
    [
        (nn.CausalLMLoss, "reduction", "sum", "avg"),
        (nn.CausalLMLoss, "softcap", 5.0, 1e-300),
        (nn.LinearCrossEntropyLoss, "z_loss", 1e-2, -1.0),
        (nn.LinearCrossEntropyLoss, "backend", "chunked", "cuda"),
        (nn.LinearCrossEntropyLoss, "label_smoothing", 0.2, 2.0),
    ],
)
def test_setting_an_option_validates_it_and_takes_effect(module, option, value, bad):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    loss = module()
    setattr(loss, option, value)
    assert getattr(loss, option) == value and loss.options[option] == value
    if module is nn.CausalLMLoss:
        got, want = loss(hidden @ weight.T, labels), lmloss.causal_lm_loss(hidden @ weight.T, labels, **{option: value})
    else:
        got, want = loss(hidden, weight, labels), lmloss.linear_cross_entropy(hidden, weight, labels, **{option: value})
    torch.testing.assert_close(got, want)
    with pytest.raises((ValueError, TypeError)):
        setattr(loss, option, bad)
    assert getattr(loss, option) == value
