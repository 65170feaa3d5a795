"""causal_lm_loss against PyTorch's cross_entropy, transformers' loss, worked
examples with exact answers, and a float64 oracle over random options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lmloss
from _truth import logits_with_losses, naive_loss
from lmloss import causal_lm_loss

REDUCTIONS = ["mean", "sum", "none"]


def random_batch(shape=(3, 7), vocab=11, ignore_frac=0.3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return logits, labels


# --- against torch.nn.functional.cross_entropy (unshifted) -------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(3, 7), (13,), (2, 3, 5)])
def test_matches_torch_cross_entropy_unshifted(reduction, label_smoothing, shape):
    logits, labels = random_batch(shape, dtype=torch.float64)
    logits.requires_grad_(True)
    ours = causal_lm_loss(logits, labels, shift=False, reduction=reduction, label_smoothing=label_smoothing)
    theirs = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "none":
        theirs = theirs.view(labels.shape)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    torch.testing.assert_close(g_ours, g_theirs)


# --- against transformers' ForCausalLMLoss -----------------------------------------


@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_causal_lm_loss(num_items, dtype):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = random_batch((4, 9), vocab=23, seed=1, dtype=dtype)
    logits.requires_grad_(True)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    theirs = ForCausalLMLoss(logits, labels, vocab_size=23, **kwargs)
    ours = causal_lm_loss(logits, labels, **kwargs)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs)


# --- worked examples with exact answers ------------------------------------------


def worked_micro_batches(vocab=10):
    """A: labels [-100,5,6,7], losses 1,1,1.  B: labels [-100,-100,-100,8], loss 3."""
    labels_a = torch.tensor([[-100, 5, 6, 7]])
    labels_b = torch.tensor([[-100, -100, -100, 8]])
    # Position t predicts labels[t+1]; the last position predicts nothing (any row).
    logits_a = logits_with_losses([5, 6, 7, 0], [1.0, 1.0, 1.0, 1.0], vocab)[None]
    logits_b = logits_with_losses([0, 0, 8, 0], [2.0, 2.0, 3.0, 2.0], vocab)[None]
    return (logits_a, labels_a), (logits_b, labels_b)


def test_worked_example_logits_have_the_losses_they_claim():
    logits = logits_with_losses([3, 1], [0.25, 4.0], 7)
    ce = F.cross_entropy(logits, torch.tensor([3, 1]), reduction="none")
    torch.testing.assert_close(ce, torch.tensor([0.25, 4.0], dtype=torch.float64))


def test_gradient_accumulation_worked_example_gives_one_point_five():
    (logits_a, labels_a), (logits_b, labels_b) = worked_micro_batches()
    n = lmloss.count_targets(labels_a) + lmloss.count_targets(labels_b)
    assert int(n) == 4
    step = causal_lm_loss(logits_a, labels_a, num_items_in_batch=n) + causal_lm_loss(
        logits_b, labels_b, num_items_in_batch=n
    )
    assert math.isclose(float(step), 1.5, rel_tol=1e-12)
    # The bug this replaces: a mean of micro-batch means.
    mean_of_means = (causal_lm_loss(logits_a, labels_a) + causal_lm_loss(logits_b, labels_b)) / 2
    assert math.isclose(float(mean_of_means), 2.0, rel_tol=1e-12)


def test_sequence_normalization_worked_example_gives_two():
    (logits_a, labels_a), (logits_b, labels_b) = worked_micro_batches()
    logits, labels = torch.cat([logits_a, logits_b]), torch.cat([labels_a, labels_b])
    assert math.isclose(float(causal_lm_loss(logits, labels, normalize="sequence")), 2.0, rel_tol=1e-12)
    assert math.isclose(float(causal_lm_loss(logits, labels)), 1.5, rel_tol=1e-12)
    assert math.isclose(float(causal_lm_loss(logits, labels, normalize="sequence", reduction="sum")), 4.0)


def test_count_is_shift_aware():
    assert int(lmloss.count_targets(torch.tensor([5, 6, 7, 8]))) == 3
    assert int(lmloss.count_targets(torch.tensor([5, 6, 7, 8]), shift=False)) == 4


def test_reduction_none_is_aligned_with_labels():
    (logits_a, labels_a), _ = worked_micro_batches()
    per_token = causal_lm_loss(logits_a, labels_a, reduction="none")
    assert per_token.shape == labels_a.shape
    torch.testing.assert_close(per_token, torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=torch.float64))


def test_mask_built_beside_labels_works_on_reduction_none():
    """MiniMind #51: a mask applied to per-token losses must use reduction='none'."""
    logits, labels = random_batch((2, 8), ignore_frac=0.0, seed=3)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, 4:] = True
    per_token = causal_lm_loss(logits, labels, reduction="none")
    by_hand = (per_token * mask).sum() / mask.sum()
    masked_labels = torch.where(mask, labels, torch.full_like(labels, -100))
    torch.testing.assert_close(by_hand, causal_lm_loss(logits, masked_labels))
    torch.testing.assert_close(by_hand, causal_lm_loss(logits, labels, token_weights=mask))


# --- options against hand formulas -------------------------------------------------


def test_z_loss_adds_c_times_lse_squared():
    logits, labels = random_batch((2, 6), ignore_frac=0.0, seed=4, dtype=torch.float64)
    lse = torch.logsumexp(logits[:, :-1], dim=-1)
    expected = causal_lm_loss(logits, labels) + 1e-2 * (lse**2).mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels, z_loss=1e-2), expected)


def test_softcap_is_tanh_capping():
    logits, labels = random_batch((2, 6), seed=5, dtype=torch.float64)
    logits = logits * 40
    expected = causal_lm_loss(30.0 * torch.tanh(logits / 30.0), labels)
    torch.testing.assert_close(causal_lm_loss(logits, labels, softcap=30.0), expected)


def test_token_weights_are_shifted_with_labels_and_normalize_by_weight_sum():
    logits, labels = random_batch((2, 6), ignore_frac=0.2, seed=6, dtype=torch.float64)
    weights = torch.rand(2, 6, dtype=torch.float64)
    per_target = causal_lm_loss(logits, labels, reduction="none")
    scored = (labels != -100) & (torch.arange(6) > 0)
    expected = (per_target * weights).sum() / (weights * scored).sum()
    torch.testing.assert_close(causal_lm_loss(logits, labels, token_weights=weights), expected)


def test_float64_stays_float64_and_half_precision_computes_in_float32():
    logits, labels = random_batch(seed=7, dtype=torch.float64)
    assert causal_lm_loss(logits, labels).dtype == torch.float64
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        got = causal_lm_loss(low, labels)
        assert got.dtype == torch.float32
        # The float32 math on the rounded inputs is exact up to float32 rounding.
        torch.testing.assert_close(got.double(), naive_loss(low, labels), rtol=1e-6, atol=1e-6)


# --- nothing to score ----------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize(
    "case", ["all_ignored", "single_position", "zero_weights", "num_items_zero", "nan_logits_masked"]
)
def test_nothing_to_score_gives_finite_zero_and_zero_gradients(reduction, normalize, case):
    logits, labels = random_batch((2, 5), seed=8)
    kwargs = {}
    if case == "all_ignored":
        labels = torch.full_like(labels, -100)
    elif case == "single_position":  # T=1 with shift: the only position has no next token
        logits, labels = logits[:, :1], labels[:, :1]
    elif case == "zero_weights":
        kwargs["token_weights"] = torch.zeros(labels.shape)
    elif case == "num_items_zero":
        labels = torch.full_like(labels, -100)
        kwargs["num_items_in_batch"] = torch.tensor(0)
    elif case == "nan_logits_masked":  # garbage logits where nothing is trained stay out
        labels = torch.full_like(labels, -100)
        logits = torch.full_like(logits, float("nan"))
    logits.requires_grad_(True)
    loss = causal_lm_loss(logits, labels, reduction=reduction, normalize=normalize, **kwargs)
    assert loss.requires_grad and loss.grad_fn is not None
    assert torch.isfinite(loss).all() and bool((loss == 0).all())
    loss.sum().backward()
    assert logits.grad is not None and bool((logits.grad == 0).all())


# --- memory: chunked upcast and recompute -----------------------------------------


def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn`` runs (tensors de-duplicated by storage)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_chunked_path_matches_and_saves_no_float32_copy(monkeypatch):
    import lmloss.reference as reference

    logits, labels = random_batch((4, 32), vocab=64, ignore_frac=0.0, seed=9, dtype=torch.bfloat16)
    logits.requires_grad_(True)
    whole, whole_bytes = saved_bytes(lambda: causal_lm_loss(logits, labels, label_smoothing=0.1, z_loss=1e-3))
    (g_whole,) = torch.autograd.grad(whole, logits)

    monkeypatch.setattr(reference, "LOGITS_CHUNK_BYTES", 16 * 64 * 4)  # 16 rows per chunk: 8 chunks
    chunked, chunked_bytes = saved_bytes(lambda: causal_lm_loss(logits, labels, label_smoothing=0.1, z_loss=1e-3))
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_whole, rtol=0, atol=0)
    float32_copy = logits.numel() * 4
    assert whole_bytes >= float32_copy  # one chunk: autograd keeps the float32 upcast
    # Several chunks: the bf16 input itself plus [tokens]-sized vectors, no [tokens, vocab] float32.
    assert chunked_bytes - logits.numel() * logits.element_size() < float32_copy / 8


# --- bad input --------------------------------------------------------------


def test_out_of_range_label_names_value_and_position():
    logits, labels = random_batch((2, 5), vocab=11)
    labels[1, 3] = 11
    with pytest.raises(ValueError, match=r"labels\[1, 3\] = 11 is outside the vocabulary \[0, 11\)"):
        causal_lm_loss(logits, labels)
    labels[1, 3] = -5
    with pytest.raises(ValueError, match=r"labels\[1, 3\] = -5"):
        causal_lm_loss(logits, labels)


def test_value_checks_can_be_switched_off_for_graph_capture():
    logits, labels = random_batch((2, 5))
    with lmloss.validation(False):  # no check reads tensor values, so none raises
        loss = causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(-4.0))
    assert loss.shape == ()  # undefined value, but no error and no synchronisation
    with pytest.raises(ValueError, match="num_items_in_batch must be finite and >= 0"):
        causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(-4.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "avg"}, "reduction='avg' is not supported"),
        ({"normalize": "row"}, "normalize='row' is not supported"),
        ({"label_smoothing": 1.5}, "label_smoothing must be in"),
        ({"z_loss": -1.0}, "z_loss must be"),
        ({"softcap": 0.0}, "softcap must be"),
        ({"num_items_in_batch": float("nan")}, "num_items_in_batch must be finite"),
        ({"num_items_in_batch": torch.tensor(float("inf"))}, "num_items_in_batch must be finite"),
        ({"num_items_in_batch": -3}, "num_items_in_batch must be finite and >= 0"),
        ({"num_items_in_batch": torch.tensor([1, 2])}, "must hold one number"),
        ({"num_items_in_batch": 0}, "num_items_in_batch is 0 but this batch has"),
        ({"token_weights": torch.ones(2, 4)}, "token_weights has shape"),
        ({"token_weights": -torch.ones(2, 5)}, "finite and non-negative"),
    ],
)
def test_bad_options_raise_value_error_naming_the_problem(kwargs, message):
    logits, labels = random_batch((2, 5))
    with pytest.raises(ValueError, match=message):
        causal_lm_loss(logits, labels, **kwargs)


@pytest.mark.parametrize(
    "logits, labels, error, message",
    [
        (torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long), ValueError, "labels has shape"),
        (torch.randn(2, 5, 7), torch.zeros(2, 5), ValueError, "labels must be an integer tensor"),
        (torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.bool), ValueError, "labels must be an integer"),
        (torch.zeros(2, 5, 7, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), ValueError, "floating"),
        (torch.randn(7), torch.zeros((), dtype=torch.long), ValueError, "at least 2-D"),
        ([[0.0]], torch.zeros(1, dtype=torch.long), TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_bad_tensors_raise(logits, labels, error, message):
    with pytest.raises(error, match=message):
        causal_lm_loss(logits, labels)


def test_unknown_keyword_is_a_type_error():
    logits, labels = random_batch()
    with pytest.raises(TypeError):
        causal_lm_loss(logits, labels, smoothing=0.1)  # type: ignore[call-arg]  # an unknown keyword on purpose


# --- property tests against the float64 oracle -----------------------------------------


@st.composite
def problems(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    seq_len = draw(st.integers(1, 9))
    vocab = draw(st.sampled_from([2, 3, 7, 33, 100]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, seq_len)
    logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 8.0]))
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))] = -100
    options = {
        "shift": draw(st.booleans()),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
        "label_smoothing": draw(st.sampled_from([0.0, 0.05, 0.3])),
        "z_loss": draw(st.sampled_from([0.0, 1e-4, 0.1])),
        "softcap": draw(st.sampled_from([None, 5.0])),
        "normalize": draw(st.sampled_from(["token", "sequence"])),
    }
    if draw(st.booleans()):
        weights = torch.rand(shape, generator=g, dtype=torch.float64)
        options["token_weights"] = weights if draw(st.booleans()) else weights > 0.5
    if options["reduction"] == "mean" and draw(st.booleans()):
        options["num_items_in_batch"] = draw(st.sampled_from([1, 7, 1000]))
    return logits.to(dtype), labels, options


@settings(max_examples=150, deadline=None)
@given(problems())
def test_property_matches_float64_oracle(problem):
    logits, labels, options = problem
    ours = causal_lm_loss(logits, labels, **options)
    truth = naive_loss(logits, labels, **options)
    assert ours.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert ours.shape == truth.shape
    # Same (rounded) inputs, float32 math: float32 rounding is the only difference.
    tol = 1e-10 if logits.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours.double(), truth, rtol=tol, atol=tol)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_property_gradient_matches_float64_oracle(problem):
    logits, labels, options = problem
    logits64 = logits.double().requires_grad_(True)
    ours = causal_lm_loss(logits64, labels, **options)
    truth = naive_loss(logits64, labels, **options)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits64, allow_unused=True)
    (g_truth,) = torch.autograd.grad(truth.sum(), logits64, allow_unused=True)
    g_truth = torch.zeros_like(logits64) if g_truth is None else g_truth
    torch.testing.assert_close(g_ours, g_truth, rtol=1e-9, atol=1e-12)


# --- review fixes: graph capture, constants, odd dtypes and shapes ----------------------


def aten_ops(fn):
    """Names of the ATen ops ``fn`` runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Log() as log:
        fn()
    return log.names


def test_no_value_dependent_op_when_value_checks_are_off():
    logits, labels = random_batch((2, 6), seed=11)
    logits.requires_grad_(True)

    def step():
        causal_lm_loss(logits, labels, label_smoothing=0.1).backward()

    assert "nonzero.default" in aten_ops(step)  # the default path drops unscored rows
    with lmloss.validation(False):
        ops = aten_ops(step)
        assert not any(name.startswith(("nonzero", "item", "_local_scalar_dense")) for name in ops), ops
        torch.testing.assert_close(
            causal_lm_loss(logits, labels, label_smoothing=0.1), naive_loss(logits, labels, label_smoothing=0.1).float()
        )


def test_token_weights_are_constants():
    logits, labels = random_batch((2, 6), seed=12)
    weights = torch.rand(2, 6, requires_grad=True)
    logits.requires_grad_(True)
    causal_lm_loss(logits, labels, token_weights=weights).backward()
    assert weights.grad is None and logits.grad is not None


def test_empty_sequences_and_small_integer_labels():
    logits = torch.randn(2, 0, 5, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long)
    assert causal_lm_loss(logits, labels, reduction="none").shape == (2, 0)
    loss = causal_lm_loss(logits, labels)
    assert float(loss.detach()) == 0.0 and loss.grad_fn is not None
    logits, labels = random_batch((2, 5), ignore_frac=0.0, seed=13)
    torch.testing.assert_close(causal_lm_loss(logits, labels.to(torch.uint8)), causal_lm_loss(logits, labels))
    torch.testing.assert_close(causal_lm_loss(logits, labels.to(torch.int16)), causal_lm_loss(logits, labels))


def test_numpy_counts_and_strict_shift():
    import numpy as np

    logits, labels = random_batch((2, 5), seed=14)
    torch.testing.assert_close(
        causal_lm_loss(logits, labels, num_items_in_batch=np.int64(7)),
        causal_lm_loss(logits, labels, num_items_in_batch=7),
    )
    with pytest.raises(TypeError, match="shift must be True or False"):
        causal_lm_loss(logits, labels, shift="no")  # type: ignore[arg-type]  # a wrong type on purpose


# --- DFT and focal token losses against their formulas written out ------------------------


def direct_token_loss(
    logits,
    labels,
    token_loss,
    gamma=2.0,
    *,
    shift=True,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    token_weights=None,
    normalize="token",
    num_items_in_batch=None,
):
    """DFT / focal on materialized float64 logits, the formulas of the papers written out:
    ce = cross_entropy(z, y) (smoothed as PyTorch smooths), p = softmax(z)[y];
    DFT: ce * p.detach() (Wu et al. 2025, TRL dft_loss); focal: ce * (1 - p)**gamma,
    detached or not (Lin et al. 2017); + z_loss * logsumexp(z)**2 unweighted."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w_tok = torch.ones(labels.shape, dtype=torch.float64) if token_weights is None else token_weights.double()
    y = labels
    if shift:
        z, y, w_tok = z[..., :-1, :], labels[..., 1:], w_tok[..., 1:]
    valid = y != -100
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    ce = F.cross_entropy(
        z.reshape(-1, z.shape[-1]), safe_y.reshape(-1), reduction="none", label_smoothing=label_smoothing
    ).view(y.shape)
    p = torch.softmax(z, dim=-1).gather(-1, safe_y.unsqueeze(-1)).squeeze(-1)
    weight = {
        "dft": lambda: p.detach(),
        "focal": lambda: (1 - p).detach() ** gamma,
        "focal_attached": lambda: (1 - p) ** gamma,
    }[token_loss]()
    per = weight * ce + z_loss * torch.logsumexp(z, dim=-1) ** 2
    w_tok = w_tok * valid
    per = torch.where(w_tok > 0, per * w_tok, torch.zeros_like(per))
    items = w_tok.sum()
    if normalize == "sequence":
        rows = w_tok.sum(-1, keepdim=True)
        per = torch.where(rows > 0, per / rows.clamp_min(1e-300), torch.zeros_like(per))
        items = (rows > 0).sum()
    if reduction == "none":
        return F.pad(per, (1, 0)) if shift else per  # back to label alignment
    if reduction == "sum":
        return per.sum()
    divisor = items if num_items_in_batch is None else num_items_in_batch
    return per.sum() / divisor if float(divisor) > 0 else per.sum() * 0.0


TOKEN_LOSSES = [("dft", None), ("focal", 2.0), ("focal", 0.5), ("focal_attached", 2.0), ("focal_attached", 0.5)]
TOKEN_LOSS_OPTIONS = [
    {},
    {"shift": False},
    {"label_smoothing": 0.1},
    {"softcap": 3.0},
    {"z_loss": 1e-2},
    {"token_weights": "random"},
    {"normalize": "sequence", "token_weights": "mask"},
    {"num_items_in_batch": 40},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 2.0, "token_weights": "random", "normalize": "sequence"},
]


def _materialize_weights(options, shape):
    options = dict(options)
    kind = options.get("token_weights")
    if kind is not None:
        weights = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
        options["token_weights"] = weights if kind == "random" else weights > 0.4
    return options


# num_items_in_batch only changes the mean, so it is not paired with the other reductions.
TOKEN_LOSS_GRID = [
    (r, o) for r in REDUCTIONS for o in TOKEN_LOSS_OPTIONS if r == "mean" or "num_items_in_batch" not in o
]


@pytest.mark.parametrize("token_loss, gamma", TOKEN_LOSSES, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "reduction, options", TOKEN_LOSS_GRID, ids=lambda v: v if isinstance(v, str) else ",".join(v) or "plain"
)
def test_token_loss_matches_direct_formula_with_gradients(token_loss, gamma, reduction, options):
    logits, labels = random_batch((3, 7), vocab=11, seed=20, dtype=torch.float64)
    logits = (logits * 2.0).requires_grad_(True)  # spread the probabilities (weights far from 1)
    options = _materialize_weights(options, labels.shape)
    ours = causal_lm_loss(logits, labels, reduction=reduction, token_loss=token_loss, focal_gamma=gamma, **options)
    truth = direct_token_loss(
        logits, labels, token_loss, 2.0 if gamma is None else gamma, reduction=reduction, **options
    )
    assert ours.shape == truth.shape
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)
    upstream = torch.rand(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), logits)
    (g_truth,) = torch.autograd.grad((truth * upstream).sum(), logits)
    torch.testing.assert_close(g_ours, g_truth, rtol=1e-10, atol=1e-12)


def test_dft_worked_example_divides_by_target_count():
    """Targets with CE 1, 2, 3: DFT = (1 e^-1 + 2 e^-2 + 3 e^-3) / 3 (TRL and LLaMA-Factory
    divide by the number of targets, not by the sum of the probabilities)."""
    labels = torch.tensor([[-100, 5, 6, 7]])
    logits = logits_with_losses([5, 6, 7, 0], [1.0, 2.0, 3.0, 9.0], 10)[None].requires_grad_(True)
    loss = causal_lm_loss(logits, labels, token_loss="dft")
    by_hand = (1 * math.exp(-1) + 2 * math.exp(-2) + 3 * math.exp(-3)) / 3
    assert math.isclose(float(loss.detach()), by_hand, rel_tol=1e-12)
    # The detached probability only rescales the CE gradient: p_t * (softmax - onehot) / 3 per row.
    (grad,) = torch.autograd.grad(loss, logits)
    z = logits.detach()[0, :3]
    onehot = F.one_hot(torch.tensor([5, 6, 7]), 10).double()
    p = torch.tensor([math.exp(-1), math.exp(-2), math.exp(-3)], dtype=torch.float64)
    torch.testing.assert_close(grad[0, :3], p[:, None] * (torch.softmax(z, -1) - onehot) / 3)
    assert bool((grad[0, 3] == 0).all())
    # Focal with gamma = 1: sum of (1 - e^-L) * L over the three targets, by hand.
    focal = causal_lm_loss(logits, labels, token_loss="focal", focal_gamma=1.0, reduction="sum")
    assert math.isclose(float(focal.detach()), sum((1 - math.exp(-x)) * x for x in (1.0, 2.0, 3.0)), rel_tol=1e-12)


def test_focal_gamma_zero_is_cross_entropy():
    logits, labels = random_batch((2, 6), seed=22, dtype=torch.float64)
    for token_loss in ("focal", "focal_attached"):
        torch.testing.assert_close(
            causal_lm_loss(logits, labels, token_loss=token_loss, focal_gamma=0.0, label_smoothing=0.1),
            causal_lm_loss(logits, labels, label_smoothing=0.1),
        )


def test_focal_attached_is_finite_when_the_target_is_certain():
    """p_t rounds to 1: (1 - p)^gamma has an infinite derivative at 0 for gamma < 1."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [200.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 0]])
    for gamma in (0.5, 1.0, 2.0):
        loss = causal_lm_loss(
            logits, labels, shift=False, token_loss="focal_attached", focal_gamma=gamma, label_smoothing=0.1
        )
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
        assert float(loss.detach()) == 0.0  # the weight (1 - 1)^gamma is exactly 0


@pytest.mark.parametrize("token_loss", ["dft", "focal", "focal_attached"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_loss_all_masked_is_attached_zero(token_loss, reduction):
    logits, labels = random_batch((2, 5), seed=23)
    logits.requires_grad_(True)
    loss = causal_lm_loss(logits, torch.full_like(labels, -100), token_loss=token_loss, reduction=reduction)
    assert loss.grad_fn is not None and bool((loss == 0).all()) and bool(torch.isfinite(loss).all())
    loss.sum().backward()
    assert bool((logits.grad == 0).all())


def test_token_loss_in_low_precision_computes_in_float32():
    logits, labels = random_batch((2, 6), seed=24, dtype=torch.bfloat16)
    got = causal_lm_loss(logits, labels, token_loss="dft")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), direct_token_loss(logits, labels, "dft"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"token_loss": "poly"}, ValueError, "token_loss='poly' is not supported"),
        ({"focal_gamma": 2.0}, ValueError, "focal_gamma=2.0 is only used with token_loss='focal'"),
        ({"token_loss": "dft", "focal_gamma": 1.0}, ValueError, "only used with"),
        ({"token_loss": "focal", "focal_gamma": -1.0}, ValueError, "focal_gamma must be a finite number >= 0"),
        ({"token_loss": "focal", "focal_gamma": float("inf")}, ValueError, "finite"),
        ({"token_loss": "focal", "focal_gamma": True}, TypeError, "focal_gamma must be a number"),
    ],
)
def test_bad_token_loss_options(kwargs, error, message):
    logits, labels = random_batch()
    with pytest.raises(error, match=message):
        causal_lm_loss(logits, labels, **kwargs)
