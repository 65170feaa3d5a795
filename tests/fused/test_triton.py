"""The Triton backends (``"triton"`` and ``"triton-lowmem"``) against the reference loss.

The kernels run under the Triton interpreter on CPU, which Triton selects once per
process, at its import, from ``TRITON_INTERPRET=1`` (its own ``tl.max``/``tl.sum``
are ``@jit`` functions made interpreted or compiled then). Setting the variable in
this pytest process would depend on import order and would change Triton for every
other test (and every process they spawn). So the kernels run in ONE child process
(this file run as a script, with the variable set only in the child's environment),
which saves each case's loss and gradients; the tests here rebuild the same inputs
and compare with the truth computed in this process: ``causal_lm_loss`` on the
materialized float64 logits ``hidden @ weight.T + bias``, with autograd's gradients.

``import triton`` at the top: without Triton these tests fail at collection instead
of being skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

import lmloss
from lmloss import causal_lm_loss
from lmloss._engine.rowmath import LossMath
from lmloss.fused import triton as triton_backends
from lmloss.fused.triton_launch import interpreting, math_constexprs, tiles_for

MODES = ("triton", "triton-lowmem")
DEFAULTS = dict(
    shift=True,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    token_weights=None,
    normalize="token",
)
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    """One problem: shapes, options, and how the backend is called."""

    name: str
    lead: tuple[int, ...] = (2,)
    seq_len: int = 7
    hidden_size: int = 24  # not a power of two; 2 blocks of 16 in the interpreter
    vocab: int = 37  # 2 blocks of 32 in the interpreter, the second almost empty
    bias: bool = True
    ignore: float = 0.3
    options: dict = field(default_factory=dict)
    weights: str | None = None  # "float" | "mask"
    dtype: torch.dtype = torch.float32
    chunk_size: int | None = None
    static: bool = False  # lmloss.validation(False): unscored rows masked, not dropped
    frozen_weight: bool = False  # e.g. LoRA: no weight gradient wanted
    confident: bool = False  # half the targets are the argmax of a sharp head (p near or at 1)
    classes: str | None = None  # class_weights: "random" (some 0) | "zero-targets" (0 at every target)
    seed: int = 0

    @property
    def atol(self) -> float:
        """Absolute tolerance of float32 results: the sharp head's logits and weights are 8x
        larger, and so is the float32 rounding of every product sum (``eps * sum |terms|``)."""
        return 2e-5 if self.confident else 2e-6


CASES = [
    Case("plain-mean"),
    Case("all-options-sum-V130", hidden_size=20, vocab=130, chunk_size=3,
         options=dict(reduction="sum", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
    Case("none-unshifted-weights", vocab=130, weights="float",
         options=dict(reduction="none", shift=False, label_smoothing=0.2, softcap=2.5)),
    Case("none-shifted-zloss", lead=(2, 2), seq_len=4, bias=False, chunk_size=5,
         options=dict(reduction="none", z_loss=1e-3)),
    Case("num-items-tensor", options=dict(num_items_in_batch=torch.tensor(50), z_loss=1e-2)),
    Case("sequence-mask-no-bias", bias=False, weights="mask", seq_len=9,
         options=dict(normalize="sequence", label_smoothing=0.1)),
    Case("sequence-float-weights-sum", weights="float", options=dict(normalize="sequence", reduction="sum")),
    Case("static-rows", static=True, chunk_size=4, options=dict(label_smoothing=0.1, softcap=4.0)),
    Case("static-none", static=True, options=dict(reduction="none", z_loss=1e-2)),
    Case("frozen-weight", frozen_weight=True, options=dict(softcap=5.0)),
    Case("all-ignored-mean", ignore=1.0),
    Case("all-ignored-none", ignore=1.0, options=dict(reduction="none")),
    Case("T1-nothing-scored", lead=(3,), seq_len=1),
    Case("bf16", seq_len=16, hidden_size=32, vocab=130, ignore=0.2, dtype=torch.bfloat16,
         options=dict(label_smoothing=0.1, z_loss=1e-3, softcap=10.0)),
]  # fmt: skip
# token_loss (DFT, focal detached and attached) x reduction x {label smoothing, z-loss, softcap}
# combinations, V not a power of two, ignored and all-ignored rows.
TOKEN_LOSS_CASES = [
    Case("dft-mean", options=dict(token_loss="dft")),
    Case("dft-sum-all-options-V130", hidden_size=20, vocab=130, chunk_size=3,
         options=dict(token_loss="dft", reduction="sum", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
    Case("dft-none-unshifted-weights", weights="float",
         options=dict(token_loss="dft", reduction="none", shift=False, label_smoothing=0.2, softcap=2.5)),
    Case("focal-mean-smoothing-zloss", chunk_size=4,
         options=dict(token_loss="focal", label_smoothing=0.1, z_loss=1e-2)),
    Case("focal-sum-softcap-gamma1.5", bias=False, options=dict(token_loss="focal", focal_gamma=1.5, reduction="sum",
                                                              softcap=4.0)),
    Case("focal-none-all-options-V130", vocab=130, lead=(2, 2), seq_len=4,
         options=dict(token_loss="focal", focal_gamma=3.0, reduction="none", label_smoothing=0.1, z_loss=1e-3,
                      softcap=5.0)),
    Case("attached-mean-all-options-V130", vocab=130, chunk_size=5,
         options=dict(token_loss="focal_attached", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
    Case("attached-sum-zloss", options=dict(token_loss="focal_attached", reduction="sum", z_loss=1e-2)),
    Case("attached-none-sequence-smoothing", weights="mask", seq_len=9,
         options=dict(token_loss="focal_attached", focal_gamma=1.0, reduction="none", normalize="sequence",
                      label_smoothing=0.1)),
    Case("attached-static-softcap", static=True, chunk_size=4,
         options=dict(token_loss="focal_attached", softcap=4.0, z_loss=1e-3)),
    # gamma < 1: d w/dp is infinite at p = 1 (the weight's limit 0 is taken where p rounds to 1)
    Case("attached-gamma0.5-confident", confident=True, options=dict(token_loss="focal_attached", focal_gamma=0.5)),
    Case("attached-confident-smoothing", confident=True, seed=1,
         options=dict(token_loss="focal_attached", label_smoothing=0.1, reduction="sum")),
    Case("attached-gamma0-is-ce", options=dict(token_loss="focal_attached", focal_gamma=0.0, reduction="sum")),
    Case("focal-confident-none", confident=True,
         options=dict(token_loss="focal", reduction="none", z_loss=1e-2, label_smoothing=0.1)),
    Case("attached-all-ignored-mean", ignore=1.0, options=dict(token_loss="focal_attached", label_smoothing=0.1)),
    Case("dft-all-ignored-none", ignore=1.0, options=dict(token_loss="dft", reduction="none", z_loss=1e-2)),
    Case("bf16-attached", seq_len=16, hidden_size=32, vocab=130, ignore=0.2, dtype=torch.bfloat16,
         options=dict(token_loss="focal_attached", label_smoothing=0.1, z_loss=1e-3, softcap=10.0)),
]  # fmt: skip
CASES += TOKEN_LOSS_CASES
# class_weights (torch's weight=) x token_loss x reduction x options; zero class weights.
CLASS_WEIGHT_CASES = [
    Case("classes-mean", classes="random"),
    Case("classes-sum-all-options-V130", hidden_size=20, vocab=130, chunk_size=3, classes="random",
         options=dict(reduction="sum", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
    Case("classes-none-dft-smoothing", classes="random", weights="float",
         options=dict(reduction="none", token_loss="dft", label_smoothing=0.2)),
    Case("classes-attached-mean-all-options-V130", vocab=130, chunk_size=5, classes="random",
         options=dict(token_loss="focal_attached", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
    Case("classes-focal-sequence-mask-smoothing", classes="random", weights="mask", seq_len=9,
         options=dict(token_loss="focal", normalize="sequence", label_smoothing=0.1)),
    Case("classes-static-smoothing-zloss", classes="random", static=True, chunk_size=4,
         options=dict(label_smoothing=0.1, z_loss=1e-2)),
    Case("classes-zero-at-targets-mean", classes="zero-targets", options=dict(z_loss=1e-2)),
    Case("classes-zero-at-targets-smoothing-sum", classes="zero-targets",
         options=dict(reduction="sum", label_smoothing=0.1, token_loss="focal_attached")),
]  # fmt: skip
CASES += CLASS_WEIGHT_CASES
BY_NAME = {case.name: case for case in CASES}


def inputs(case: Case):
    """``(hidden, weight, bias, labels, token_weights)`` in ``case.dtype``, deterministic."""
    g = torch.Generator().manual_seed(case.seed)
    hidden = torch.randn(*case.lead, case.seq_len, case.hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(case.vocab, case.hidden_size, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(case.vocab, generator=g, dtype=torch.float64) if case.bias else None
    labels = torch.randint(0, case.vocab, (*case.lead, case.seq_len), generator=g)
    if case.confident:  # a sharp head, and targets it predicts: p of many tokens rounds to 1 in float32
        weight = weight * 8
        logits = hidden @ weight.t() + (0 if bias is None else bias)
        predicted = logits.argmax(-1) if not case.options.get("shift", True) else logits[..., :-1, :].argmax(-1)
        chosen = torch.rand(predicted.shape, generator=g) < 0.5
        aligned = labels if not case.options.get("shift", True) else labels[..., 1:]
        aligned[chosen] = predicted[chosen]
    labels[torch.rand(labels.shape, generator=g) < case.ignore] = -100
    if case.weights == "mask" and labels.numel() > 0:
        labels[0] = -100  # a sequence with no target: skipped by normalize="sequence"
    token_weights = None
    if case.weights == "float":
        token_weights = torch.rand(labels.shape, generator=g, dtype=torch.float64) * 2
    elif case.weights == "mask":
        token_weights = torch.rand(labels.shape, generator=g) < 0.7
    trained = (True, not case.frozen_weight, True)
    tensors = tuple(
        None if t is None else t.to(case.dtype).requires_grad_(grad) for t, grad in zip((hidden, weight, bias), trained)
    )
    return (*tensors, labels, token_weights)


def upstream(case: Case, loss_shape: torch.Size) -> torch.Tensor:
    """A non-trivial upstream gradient: random per token, or a scalar that is not 1."""
    g = torch.Generator().manual_seed(case.seed + 1)
    up = torch.randn(loss_shape, generator=g, dtype=torch.float64)
    return up.abs() + 0.5 if len(loss_shape) == 0 else up


def class_weights_of(case: Case) -> torch.Tensor | None:
    """``[V]`` float64 class weights of ``case`` (deterministic), or None."""
    if case.classes is None:
        return None
    g = torch.Generator().manual_seed(case.seed + 2)
    weights = torch.rand(case.vocab, generator=g, dtype=torch.float64) * 2
    weights[torch.rand(case.vocab, generator=g) < 0.15] = 0.0
    if case.classes == "zero-targets":
        weights[inputs(case)[3].clamp(min=0).flatten()] = 0.0
    return weights


def options_of(case: Case, token_weights: torch.Tensor | None) -> dict:
    options = {**DEFAULTS, **case.options, "token_weights": token_weights}
    if case.classes is not None:
        options["class_weights"] = class_weights_of(case)
    return options


# --- the child process: runs the kernels under the interpreter ------------------------------


def call(case: Case, mode: str, hidden, weight, bias, labels, token_weights) -> torch.Tensor:
    """Through the public entry point, so that the backend names are wired too."""
    with lmloss.validation(not case.static):
        return lmloss.linear_cross_entropy(
            hidden, weight, labels, bias=bias, backend=mode, chunk_size=case.chunk_size,
            **options_of(case, token_weights),
        )  # fmt: skip


def run_case(case: Case, mode: str) -> dict:
    hidden, weight, bias, labels, token_weights = inputs(case)
    loss = call(case, mode, hidden, weight, bias, labels, token_weights)
    up = upstream(case, loss.shape).to(loss.dtype)
    leaves = (hidden, weight, bias)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad((loss * up).sum(), wanted))
    result = {"loss": loss.detach(), "attached": loss.grad_fn is not None}
    result["grads"] = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    with torch.no_grad():  # evaluation: no gradient buffers, same loss
        result["no_grad_loss"] = call(case, mode, hidden, weight, bias, labels, token_weights)
    return result


class LogitsProductRows(TorchDispatchMode):
    """Counts the rows of the logits products ``h @ W^T`` (left operand ``[rows, D]``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size, self.rows = hidden_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out) and args[0].shape[1] == self.hidden_size:
            self.rows += args[0].shape[0]
        return func(*args, **(kwargs or {}))


def behaviour() -> dict:
    """Rows that reach the products; what a second backward, or a weight changed before
    backward, does in each mode."""
    case = BY_NAME["plain-mean"]
    hidden, weight, bias, labels, _ = inputs(case)
    counter = LogitsProductRows(case.hidden_size)
    with counter:
        call(case, "triton", hidden, weight, bias, labels, None).backward()
    out: dict = {"product_rows": counter.rows}
    loss = call(case, "triton-lowmem", hidden, weight, bias, labels, None)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    out["lowmem_twice_equal"] = all(torch.equal(a, b) for a, b in zip(first, second))
    for name, tamper in (("speed_twice", False), ("speed_stale_weight", True)):
        loss = call(case, "triton", hidden, weight, bias, labels, None)
        if tamper:
            with torch.no_grad():
                weight.add_(1.0)  # e.g. optimizer.step() before loss.backward()
        else:
            torch.autograd.grad(loss, (hidden,), retain_graph=True)
        try:
            torch.autograd.grad(loss, (hidden,))
            out[name] = "no error"
        except RuntimeError as error:
            out[name] = str(error)
    out["static_nan"] = static_nan_hidden()
    return out


def static_nan_hidden() -> dict:
    """Under ``lmloss.validation(False)`` (every row computed), a NaN hidden state at an
    unscored position: each mode's loss and gradients, and the same with zeros there."""
    case = BY_NAME["static-rows"]
    results = {}
    for mode in MODES:
        for reduction in ("mean", "none"):
            runs = []
            for fill in (float("nan"), 0.0):
                hidden, weight, bias, labels, _ = inputs(case)
                labels[0, 3] = -100  # position 2 predicts it: unscored
                with torch.no_grad():
                    hidden[0, 2] = fill
                with lmloss.validation(False):
                    loss = lmloss.linear_cross_entropy(
                        hidden, weight, labels, bias=bias, backend=mode, token_loss="focal_attached",
                        **{**DEFAULTS, "reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2},
                    )  # fmt: skip
                    runs.append((loss.detach(), torch.autograd.grad(loss.sum(), (hidden, weight, bias))))
            results[mode, reduction] = runs
    return results


def child_main(out: str) -> None:
    if not interpreting():
        raise SystemExit("the child must run with TRITON_INTERPRET=1 set before triton is imported")
    results = {"behaviour": behaviour()}
    for case in CASES:
        for mode in MODES:
            try:
                results[case.name, mode] = run_case(case, mode)
            except Exception:  # noqa: BLE001  (recorded: the case's test fails with this traceback)
                results[case.name, mode] = {"error": traceback.format_exc()}
    torch.save(results, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case's result from one interpreter process (about 10-20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        pytest.fail(f"interpreter process failed:\n{done.stdout}\n{done.stderr}")
    return torch.load(out, weights_only=False)


# --- the truth, in this process ---------------------------------------------------------------


def truth(case: Case):
    """float64 loss and gradients of ``causal_lm_loss(hidden @ weight.T + bias)``."""
    hidden, weight, bias, labels, token_weights = inputs(case)
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.t() + (0 if b is None else b)
    loss = causal_lm_loss(logits, labels, **options_of(case, token_weights))
    up = upstream(case, loss.shape)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((loss * up).sum(), wanted))
    return loss.detach(), [None if t is None else next(grads) for t in leaves]


def got(interpreted, name: str, mode: str) -> dict:
    result = interpreted[name, mode]
    if "error" in result:
        pytest.fail(f"{mode} raised in the interpreter process:\n{result['error']}")
    return result


FLOAT32_CASES = [c.name for c in CASES if c.dtype == torch.float32]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_matches_reference(interpreted, name, mode):
    case = BY_NAME[name]
    result = got(interpreted, name, mode)
    want_loss, want_grads = truth(case)
    if case.frozen_weight:
        want_grads[1] = None
    loss = result["loss"]
    assert loss.dtype == torch.float32 and loss.shape == want_loss.shape and result["attached"]
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=case.atol)
    torch.testing.assert_close(result["no_grad_loss"], loss, rtol=0, atol=0)
    for label, g, w in zip(("hidden", "weight", "bias"), result["grads"], want_grads):
        assert (g is None) == (w is None), label
        if w is not None:
            assert g.dtype == torch.float32, label
            torch.testing.assert_close(
                g.double(), w, rtol=2e-5, atol=case.atol, msg=lambda m, label=label: f"d{label}: {m}"
            )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["all-ignored-mean", "all-ignored-none", "T1-nothing-scored", "attached-all-ignored-mean",
             "dft-all-ignored-none"]
)  # fmt: skip
def test_nothing_scored_gives_exact_zeros(interpreted, name, mode):
    """Exact zeros (not merely close): the loss is 0, finite, attached; every gradient is 0."""
    result = got(interpreted, name, mode)
    assert result["attached"] and bool((result["loss"] == 0).all())
    for g in result["grads"]:
        assert g is None or bool((g == 0).all())


def test_ignored_rows_cost_no_product(interpreted):
    """Speed mode: the logits products see only the scored positions (shifted targets)."""
    labels = inputs(BY_NAME["plain-mean"])[3]
    scored = int((labels[..., 1:] != -100).sum())
    assert 0 < scored < labels.numel()
    assert interpreted["behaviour"]["product_rows"] == scored


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_static_shapes_ignore_a_nan_hidden_state_at_an_unscored_row(interpreted, mode, reduction):
    """Every row computed (validation off): the unscored row's NaN reaches neither the loss
    nor any gradient, which equal those with zeros at that row (the dhidden row is 0)."""
    (nan_loss, nan_grads), (zero_loss, zero_grads) = interpreted["behaviour"]["static_nan"][mode, reduction]
    torch.testing.assert_close(nan_loss, zero_loss, rtol=0, atol=0)
    for label, got_grad, want in zip(("hidden", "weight", "bias"), nan_grads, zero_grads):
        assert torch.isfinite(got_grad).all(), label
        torch.testing.assert_close(got_grad, want, rtol=1e-6, atol=1e-7, msg=lambda m, label=label: f"d{label}: {m}")
    assert bool((nan_grads[0][0, 2] == 0).all())


def test_backward_twice_and_stale_weight(interpreted):
    """Memory mode recomputes in backward, so retain_graph works; speed mode made its
    gradients in forward, so it refuses a second backward and a weight changed since."""
    behaviour = interpreted["behaviour"]
    assert behaviour["lowmem_twice_equal"] is True
    assert "backward was called twice" in behaviour["speed_twice"]
    assert "modified in place" in behaviour["speed_stale_weight"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["bf16", "bf16-attached"])
def test_bf16_error_is_no_worse_than_naive(interpreted, name, mode):
    """DESIGN's tolerance rule: against the float64 truth, no worse than the naive bf16 path
    (bf16 logits, float32 loss) by more than a small margin."""
    case = BY_NAME[name]
    result = got(interpreted, name, mode)
    want_loss, want_grads = truth(case)
    hidden, weight, bias, labels, token_weights = inputs(case)
    naive = causal_lm_loss(hidden @ weight.t() + bias, labels, **options_of(case, token_weights))
    naive_grads = torch.autograd.grad(naive * upstream(case, naive.shape).to(naive.dtype), (hidden, weight, bias))

    def errors(loss, grads):
        rel = [abs(float(loss.detach()) - float(want_loss)) / abs(float(want_loss))]
        return rel + [float((g.double() - w).norm() / w.norm()) for g, w in zip(grads, want_grads)]

    eps = torch.finfo(torch.bfloat16).eps
    assert [g.dtype for g in result["grads"]] == [torch.bfloat16] * 3
    for label, n, o in zip(("loss", "hidden", "weight", "bias"), errors(naive, naive_grads),
                           errors(result["loss"], result["grads"])):  # fmt: skip
        assert o <= 1.25 * n + 4 * eps, f"{label}: {mode} error {o:.2e} vs naive {n:.2e}"


# --- in this process (no kernel runs) ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_this_process_is_untouched_by_the_interpreter(interpreted, mode):
    """The child's interpreter did not leak: this process's Triton still compiles, so a CPU
    call is refused with an error that says what to do."""
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] != "1"
    assert not interpreting()
    hidden, weight, bias, labels, _ = inputs(BY_NAME["plain-mean"])
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lmloss.linear_cross_entropy(hidden, weight, labels, bias=bias, backend=mode, **DEFAULTS)


@pytest.mark.parametrize("mode", MODES)
def test_float64_uses_the_chunked_math(mode):
    """float64 inputs keep float64 (the kernels would compute in float32), in chunks of ``chunk_size``."""
    case = Case("f64", dtype=torch.float64, options=dict(label_smoothing=0.1, softcap=3.0))
    hidden, weight, bias, labels, _ = inputs(case)
    loss = lmloss.linear_cross_entropy(
        hidden, weight, labels, bias=bias, backend=mode, chunk_size=4, **options_of(case, None)
    )
    want, _ = truth(case)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_options_the_kernels_do_not_compute_are_refused_unless_off(monkeypatch, mode):
    """A spec option missing from ``KERNEL_OPTIONS`` (as a new option is until the kernels
    learn it; here a float and a flag taken out) is refused at any value that does not turn
    it off (0, False, None), with the backends to use instead; off, the loss is the truth's."""
    taken_out = ("z_loss", "shift")
    kept = tuple(name for name in triton_backends.KERNEL_OPTIONS if name not in taken_out)
    monkeypatch.setattr(triton_backends, "KERNEL_OPTIONS", kept)
    case = Case("f64-unshifted", dtype=torch.float64, options=dict(shift=False))
    hidden, weight, bias, labels, _ = inputs(case)
    for option in (dict(z_loss=0.5), dict(shift=True)):
        name, value = next(iter(option.items()))
        message = f"{name}={value!r} is not supported by the triton backends yet; use backend='chunked'"
        with pytest.raises(ValueError, match=re.escape(message)):
            lmloss.linear_cross_entropy(
                hidden, weight, labels, bias=bias, backend=mode, **{**options_of(case, None), **option}
            )
    off = lmloss.linear_cross_entropy(hidden, weight, labels, bias=bias, backend=mode, **options_of(case, None))
    torch.testing.assert_close(off, truth(case)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_token_loss_reaches_the_backends(mode):
    """``token_loss``/``focal_gamma`` reach the spec (float64: the chunked math), and a
    gamma without a focal form is refused there, as everywhere."""
    case = Case("f64-focal", dtype=torch.float64, options=dict(token_loss="focal_attached", focal_gamma=1.5))
    hidden, weight, bias, labels, _ = inputs(case)
    loss = lmloss.linear_cross_entropy(
        hidden, weight, labels, bias=bias, backend=mode, chunk_size=4, **options_of(case, None)
    )
    torch.testing.assert_close(loss, truth(case)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=re.escape("focal_gamma=2.0 is only used with token_loss='focal'")):
        lmloss.linear_cross_entropy(
            hidden, weight, labels, bias=bias, backend=mode, chunk_size=4, **DEFAULTS, focal_gamma=2.0
        )


# Argument types of the kernels for a bf16 problem (pointers by name; scalars by kind).
POINTER_TYPES = dict(
    Z="*fp32", DZ="*bf16", BIAS="*bf16", CLASS_W="*fp32", Y="*i64", COEF="*fp32", STATS="*fp32", H="*bf16", W="*bf16", ROWS="*i64",
    PART_MAX="*fp32", PART_SUM="*fp32", PART_TARGET="*fp32", PART_TOTAL="*fp32", LSE="*fp32",
    DH="*fp32", DW="*fp32", DB="*fp32",
)  # fmt: skip
FLOAT_ARGS = {"softcap"}


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels as Python, which Triton's compiler is stricter than
    (types of loop-carried values, constexpr use, dot shapes). Compile each kernel for
    sm_90 (ptxas ships in the triton wheel) with every option on, bf16 inputs, and the
    block sizes the launcher uses on a GPU, down to a cubin (the row kernel in its three
    uses: both sweeps, statistics only, gradient only)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmloss.fused import _triton_kernels as kernels

    assert not interpreting()
    tiles = tiles_for(128_256, interpret=False)
    flags = math_constexprs(LossMath(label_smoothing=0.1, z_loss=1e-4, softcap=30.0), bias=True, classes=True)
    needs = dict(NEED_DH=True, NEED_DW=True, NEED_DB=True)
    row = [
        (
            kernels.row_loss_grad_kernel,
            dict(flags, STATS_PASS=stats, GRAD_PASS=grad, BLOCK_V=tiles.row_block_v),
            dict(num_warps=tiles.row_warps),
        )
        for stats, grad in ((True, True), (True, False), (False, True))
    ]
    plans = row + [
        (kernels.lowmem_forward_kernel, dict(flags, HAS_ROWS=True, **tiles.forward.constexprs(torch.bfloat16)),
         tiles.forward.launch()),
        (kernels.lowmem_backward_kernel, dict(flags, HAS_ROWS=True, **needs, **tiles.backward.constexprs(torch.bfloat16)),
         tiles.backward.launch()),
    ]  # fmt: skip
    for kernel, constexprs, launch in plans:
        signature = {
            name: "constexpr" if name in constexprs else
            POINTER_TYPES.get(name, "fp32" if name in FLOAT_ARGS else "i32")
            for name in kernel.arg_names
        }  # fmt: skip
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=launch)  # fmt: skip
        assert compiled.asm["cubin"], kernel.__name__


def test_benchmark_script_parses_arguments_without_a_gpu():
    script = REPO / "benchmarks" / "gpu_linear_cross_entropy.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--shapes" in done.stdout and "triton-lowmem" in done.stdout


if __name__ == "__main__":
    child_main(sys.argv[1])
