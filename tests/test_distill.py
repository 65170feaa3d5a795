"""Knowledge distillation against F.kl_div on materialized float64 logits, hand-computed
values, and the logits version (for the version from hidden states)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lmloss
from lmloss.distill import distillation_loss, linear_distillation_loss

REDUCTIONS = ["mean", "sum", "none"]


def direct_kd(
    student,
    teacher,
    labels,
    *,
    temperature=1.0,
    alpha=1.0,
    shift=True,
    reduction="mean",
    token_weights=None,
    num_items_in_batch=None,
):
    """alpha * tau^2 * KL(p_teacher || p_student) + (1 - alpha) * CE, written out on float64 logits:
    F.kl_div(log_softmax(s / tau), log_softmax(t / tau), log_target=True) summed over the vocabulary."""
    s, t = student.double(), teacher.double()
    w = torch.ones(labels.shape, dtype=torch.float64) if token_weights is None else token_weights.double()
    y = labels
    if shift:
        s, t, y, w = s[..., :-1, :], t[..., :-1, :], labels[..., 1:], w[..., 1:]
    valid = y != -100
    kl = (
        F.kl_div(
            F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="none", log_target=True
        ).sum(-1)
        * temperature**2
    )
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), torch.where(valid, y, 0).reshape(-1), reduction="none").view(
        y.shape
    )
    w = w * valid
    per = torch.where(w > 0, (alpha * kl + (1 - alpha) * ce) * w, torch.zeros_like(kl))
    if reduction == "none":
        return F.pad(per, (1, 0)) if shift else per
    if reduction == "sum":
        return per.sum()
    return per.sum() / (w.sum() if num_items_in_batch is None else num_items_in_batch)


def batch(shape=(2, 6), vocab=13, seed=0, ignore=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    teacher = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore] = -100
    return student.requires_grad_(True), teacher.requires_grad_(True), labels


# --- on logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 1.0), (0.5, 0.3), (3.0, 0.0), (1.0, 0.6)])
@pytest.mark.parametrize("shift", [True, False])
def test_matches_kl_div_with_gradients(reduction, temperature, alpha, shift):
    student, teacher, labels = batch()
    ours = distillation_loss(
        student, teacher, labels, temperature=temperature, alpha=alpha, shift=shift, reduction=reduction
    )
    truth = direct_kd(student, teacher, labels, temperature=temperature, alpha=alpha, shift=shift, reduction=reduction)
    assert ours.shape == truth.shape
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)
    upstream = torch.rand(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), student)
    (g_truth,) = torch.autograd.grad((truth * upstream).sum(), student)
    torch.testing.assert_close(g_ours, g_truth, rtol=1e-10, atol=1e-12)


def test_token_weights_and_num_items():
    student, teacher, labels = batch(seed=2)
    weights = torch.rand(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for kwargs in ({"token_weights": weights}, {"num_items_in_batch": 17}, {"token_weights": weights > 0.5}):
        torch.testing.assert_close(
            distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.5, **kwargs),
            direct_kd(student, teacher, labels, temperature=2.0, alpha=0.5, **kwargs),
        )


def test_hand_computed_two_token_vocabulary():
    """Teacher (1/2, 1/2), student (1/4, 3/4) at tau = 1: KL = 1/2 ln(2) + 1/2 ln(2/3)."""
    student = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    teacher = torch.zeros(1, 1, 2, dtype=torch.float64)
    labels = torch.tensor([[1]])
    loss = distillation_loss(student, teacher, labels, shift=False)
    assert math.isclose(float(loss), 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0), rel_tol=1e-12)
    # alpha = 0.5 adds half of the hard-label CE, -ln(3/4).
    mixed = distillation_loss(student, teacher, labels, shift=False, alpha=0.5)
    assert math.isclose(float(mixed), 0.5 * float(loss) - 0.5 * math.log(0.75), rel_tol=1e-12)


def test_identical_models_give_zero_and_the_gradient_scales_with_tau():
    student, _, labels = batch(seed=4)
    teacher = student.detach().clone()
    loss = distillation_loss(student, teacher, labels, temperature=3.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(float(loss.detach())) < 1e-12 and float(grad.abs().max()) < 1e-12
    # d(tau^2 KL)/ds = tau * (softmax(s/tau) - softmax(t/tau)) / n, by hand.
    student, teacher, labels = batch(seed=5, ignore=0.0)
    tau = 2.0
    (grad,) = torch.autograd.grad(distillation_loss(student, teacher, labels, temperature=tau, shift=False), student)
    expected = tau * (torch.softmax(student.detach() / tau, -1) - torch.softmax(teacher.detach() / tau, -1))
    torch.testing.assert_close(grad, expected / labels.numel())


def test_teacher_gets_no_gradient():
    student, teacher, labels = batch(seed=6)
    distillation_loss(student, teacher, labels, alpha=0.5).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_is_attached_zero(reduction):
    student, teacher, labels = batch(seed=7, ignore=1.0)
    loss = distillation_loss(student, teacher, labels, reduction=reduction, alpha=0.5)
    assert loss.grad_fn is not None and bool((loss == 0).all())
    loss.sum().backward()
    assert bool((student.grad == 0).all())


def test_chunked_rows_and_low_precision(monkeypatch):
    import lmloss.reference as reference
    from lmloss import distill

    student, teacher, labels = batch((4, 16), vocab=32, seed=8, dtype=torch.bfloat16)
    whole = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.7)
    (g_whole,) = torch.autograd.grad(whole, student)
    assert whole.dtype == torch.float32
    truth = direct_kd(student, teacher, labels, temperature=2.0, alpha=0.7)
    torch.testing.assert_close(whole.double(), truth, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(distill, "LOGITS_CHUNK_BYTES", 8 * 2 * 32 * 4)  # 8 rows per chunk, recomputed in backward
    assert distill.LOGITS_CHUNK_BYTES != reference.LOGITS_CHUNK_BYTES
    chunked = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.7)
    (g_chunked,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_chunked, g_whole)


# --- from hidden states ---------------------------------------------------------------------


def heads(lead=(2,), seq_len=7, dim=5, teacher_dim=9, vocab=23, seed=0, ignore=0.3, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    student = (rand(*lead, seq_len, dim), rand(vocab, dim), rand(vocab) if bias else None)
    teacher = (
        rand(*lead, seq_len, teacher_dim, grad=False),
        rand(vocab, teacher_dim, grad=False),
        rand(vocab, grad=False) if bias else None,
    )
    labels = torch.randint(0, vocab, (*lead, seq_len), generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignore] = -100
    return student, teacher, labels


def linear_and_logits(student, teacher, labels, upstream_seed=1, **options):
    (h, w, b), (th, tw, tb) = student, teacher
    ours = linear_distillation_loss(h, w, th, tw, labels, student_bias=b, teacher_bias=tb, **options)
    options.pop("chunk_size", None)
    logits = F.linear(h, w, b)
    theirs = distillation_loss(logits, F.linear(th, tw, tb), labels, **options)
    upstream = torch.rand(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(upstream_seed))
    params = [t for t in student if t is not None]
    got = torch.autograd.grad((ours * (upstream + 0.5)).sum(), params)
    want = torch.autograd.grad((theirs * (upstream + 0.5)).sum(), params)
    return ours, theirs, got, want


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.5, 1.0), (1.0, 0.4), (0.7, 0.25), (2.0, 0.0)])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_linear_equals_logits_version(reduction, temperature, alpha, chunk_size):
    student, teacher, labels = heads()
    ours, theirs, got, want = linear_and_logits(
        student, teacher, labels, reduction=reduction, temperature=temperature, alpha=alpha, chunk_size=chunk_size
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for g_ours, g_theirs in zip(got, want):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {"shift": False, "normalize": "sequence"},
        {"num_items_in_batch": 40},
        {"token_weights": torch.rand(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9))},
    ],
    ids=["unshifted-sequence", "num-items", "token-weights"],
)
def test_linear_options_and_no_bias(options):
    student, teacher, labels = heads(seed=3, bias=False)
    ours, theirs, got, want = linear_and_logits(
        student, teacher, labels, temperature=2.0, alpha=0.5, chunk_size=3, **options
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for g_ours, g_theirs in zip(got, want):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_linear_static_shapes_when_value_checks_are_off():
    student, teacher, labels = heads(seed=4, ignore=0.5)
    with lmloss.validation(False):
        for reduction in ("mean", "none"):
            ours, theirs, got, want = linear_and_logits(
                student, teacher, labels, reduction=reduction, temperature=1.5, alpha=0.5, chunk_size=4
            )
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
            for g_ours, g_theirs in zip(got, want):
                torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_linear_all_masked_and_teacher_without_gradient():
    (h, w, b), (th, tw, tb), labels = heads(seed=5, ignore=1.0)
    tw.requires_grad_(True)
    loss = linear_distillation_loss(h, w, th, tw, labels, student_bias=b, teacher_bias=tb, alpha=0.5)
    assert float(loss.detach()) == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert all(bool((t.grad == 0).all()) for t in (h, w, b))
    assert tw.grad is None


def test_linear_low_precision_is_close_to_float64():
    student, teacher, labels = heads(lead=(4,), seq_len=32, dim=32, teacher_dim=48, vocab=300, seed=6)
    low = [
        tuple(None if t is None else t.detach().bfloat16().requires_grad_(t.requires_grad) for t in group)
        for group in (student, teacher)
    ]
    ours = linear_distillation_loss(
        low[0][0],
        low[0][1],
        low[1][0],
        low[1][1],
        labels,
        student_bias=low[0][2],
        teacher_bias=low[1][2],
        temperature=2.0,
        alpha=0.5,
        chunk_size=16,
    )
    assert ours.dtype == torch.float32
    ours.backward()
    assert low[0][1].grad.dtype == torch.bfloat16
    # Truth: the same (rounded) inputs in float64.
    rounded = [tuple(None if t is None else t.detach().double().requires_grad_(True) for t in g) for g in low]
    (h, w, b), (th, tw, tb) = rounded
    truth = direct_kd(F.linear(h, w, b), F.linear(th, tw, tb), labels, temperature=2.0, alpha=0.5)
    truth.backward()
    assert abs(float(ours.detach()) - float(truth.detach())) < 1e-2 * float(truth.detach())
    rel = float((low[0][1].grad.double() - w.grad).norm() / w.grad.norm())
    assert rel < 2e-2, rel


class RecordShapes(TorchDispatchMode):
    """Shapes of every tensor an ATen op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out


def test_linear_never_holds_tokens_times_vocab():
    student, teacher, labels = heads(lead=(1,), seq_len=96, dim=6, teacher_dim=8, vocab=500, seed=7, ignore=0.0)
    n_by_v = 96 * 500
    for reduction, alpha, temperature in (("mean", 0.5, 2.0), ("none", 1.0, 1.0)):
        recorder = RecordShapes()
        with recorder:
            (h, w, b), (th, tw, tb) = student, teacher
            loss = linear_distillation_loss(
                h,
                w,
                th,
                tw,
                labels,
                student_bias=b,
                teacher_bias=tb,
                chunk_size=16,
                reduction=reduction,
                alpha=alpha,
                temperature=temperature,
            )
            loss.sum().backward()
        assert max(numel for _, numel in recorder.numels) <= 16 * 500, max(recorder.numels, key=lambda x: x[1])
    # The recorder does see full logits when they exist, so the bound above can fail.
    recorder = RecordShapes()
    with recorder:
        distillation_loss(F.linear(h, w, b), F.linear(th, tw, tb), labels).backward()
    assert max(numel for _, numel in recorder.numels) >= n_by_v


def test_linear_second_backward_and_stale_weight_are_refused():
    (h, w, b), (th, tw, _tb), labels = heads(seed=8)
    loss = linear_distillation_loss(h, w, th, tw, labels, student_bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        loss.backward()
    loss = linear_distillation_loss(h, w, th, tw, labels)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"alpha": 1.5}, ValueError, r"alpha \(the weight of the distillation term\) must be in \[0, 1\]"),
        ({"alpha": "half"}, TypeError, "alpha must be a number"),
        ({"reduction": "avg"}, ValueError, "reduction='avg'"),
    ],
)
def test_bad_options(kwargs, error, message):
    student, teacher, labels = batch()
    with pytest.raises(error, match=message):
        distillation_loss(student, teacher, labels, **kwargs)
    (h, w, _b), (th, tw, _tb), labels = heads()
    with pytest.raises(error, match=message):
        linear_distillation_loss(h, w, th, tw, labels, **kwargs)


def test_bad_shapes_name_the_argument():
    student, teacher, labels = batch()
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        distillation_loss(student, teacher[..., :-1], labels)
    labels[0, 1] = 13
    with pytest.raises(ValueError, match=r"labels\[0, 1\] = 13 is outside the vocabulary"):
        distillation_loss(student, teacher, labels)
    (h, w, b), (th, tw, _tb), labels = heads()
    with pytest.raises(ValueError, match="teacher_weight has a vocabulary of 22 but student_weight of 23"):
        linear_distillation_loss(h, w, th, tw[:-1], labels)
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        linear_distillation_loss(h, w, th[:, :-1], tw, labels)
    with pytest.raises(ValueError, match="teacher_weight must have shape"):
        linear_distillation_loss(h, w, th, tw[:, :-1], labels)
    with pytest.raises(ValueError, match="student_bias must have shape"):
        linear_distillation_loss(h, w, th, tw, labels, student_bias=b[:-1])


def test_teacher_with_masked_tokens():
    """Teacher logits of -inf (p = 0) add nothing: the KL over the teacher's support, by hand."""
    student, teacher, labels = batch(seed=10, ignore=0.0)
    teacher = teacher.detach().clone()
    teacher[..., :4] = float("-inf")
    loss = distillation_loss(student, teacher, labels, shift=False, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    p = torch.softmax(teacher, -1)[..., 4:]
    log_q = torch.log_softmax(student.detach(), -1)[..., 4:]
    torch.testing.assert_close(loss.detach(), (p * (p.log() - log_q)).sum(-1))
    assert bool(torch.isfinite(grad).all())


def test_linear_teacher_with_a_masked_token_is_finite_and_equals_the_logits_version():
    """A teacher bias of -inf (a banned token, p = 0) adds 0 to the KL, not NaN."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    tb = torch.zeros(9, dtype=torch.float64)
    tb[-1] = float("-inf")
    labels = torch.randint(0, 8, (2, 5), generator=g)
    want = distillation_loss(h @ w.T, th @ tw.T + tb, labels, temperature=2.0)
    got = linear_distillation_loss(h, w, th, tw, labels, teacher_bias=tb, temperature=2.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
