"""The chunked backend's promises beyond equality: no [N, V] tensor ever exists, the
chunk size follows a memory budget, and ignored rows cost no matrix product."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lmloss
from lmloss import linear_cross_entropy
from lmloss.fused import chunked
from lmloss.fused.chunked import default_chunk_rows


class RecordOutputs(TorchDispatchMode):
    """Records the shape of every tensor an ATen op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.products: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
            self.products.append(tuple(args[0].shape))
        return out


def inputs(n_tokens=96, hidden_size=6, vocab=500, ignored=0):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n_tokens, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n_tokens), generator=g)
    labels[0, :ignored] = -100
    return hidden, weight, labels


def record(backend, reduction="mean", **kwargs):
    hidden, weight, labels = inputs(**{k: kwargs.pop(k) for k in ("ignored",) if k in kwargs})
    recorder = RecordOutputs()
    with recorder:
        loss = linear_cross_entropy(hidden, weight, labels, backend=backend, reduction=reduction, **kwargs)
        loss.sum().backward()
    return recorder, hidden.shape[1] * weight.shape[0]


def test_no_tensor_of_tokens_times_vocab():
    cases = [
        ("mean", {}),
        ("none", {}),
        ("mean", {"token_loss": "dft"}),
        ("none", {"token_loss": "focal_attached", "label_smoothing": 0.1}),
    ]
    for reduction, extra in cases:
        recorder, n_by_v = record("chunked", reduction, chunk_size=16, **extra)
        largest = max(recorder.shapes, key=lambda item: torch.Size(item[1]).numel())
        assert torch.Size(largest[1]).numel() <= 16 * 500, largest
    # The recorder sees the full logits of the reference path, so the bound above can fail.
    recorder, n_by_v = record("reference")
    assert max(torch.Size(shape).numel() for _, shape in recorder.shapes) >= n_by_v


def test_ignored_rows_cost_no_product():
    """Labels 0..79 ignored: with the shift, 16 positions (79..94) have a target."""
    recorder, _ = record("chunked", chunk_size=8, ignored=80)
    # The logits product of each chunk is the one whose left operand is [rows, D].
    rows = sum(shape[0] for shape in recorder.products if shape[1] == 6)
    assert rows == 16
    recorder, _ = record("chunked", chunk_size=8, ignored=0)
    assert sum(shape[0] for shape in recorder.products if shape[1] == 6) == 95


def test_chunk_rows_follow_the_memory_budget():
    # Qwen2-0.5B head, 4096 tokens, float32: the float32 [rows, V] buffer fits the budget.
    rows = default_chunk_rows(4096, 151_936, 896, 4)
    assert rows * 151_936 * 4 <= chunked.DEFAULT_CHUNK_BYTES < (rows + 1) * 151_936 * 4
    # Large hidden states: the buffer may grow to their size (bounded by it).
    big = default_chunk_rows(65_536, 32_000, 4096, 4)
    assert big * 32_000 * 4 <= 65_536 * 4096 * 4 < (big + 1) * 32_000 * 4
    # Never below MIN_CHUNK_ROWS (GEMM efficiency), never above the token count.
    assert default_chunk_rows(4096, 10**7, 64, 2) == chunked.MIN_CHUNK_ROWS
    assert default_chunk_rows(10, 1000, 64, 4) == 10


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_under_torch_compile(reduction):
    """torch.compile (dynamo + AOT autograd; graph breaks allowed) around the static, sync-free
    path gives the reference's loss and gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 300, (2, 24))
    labels[0, :5] = -100

    def loss_fn(h, w, y):
        with lmloss.validation(False):
            return lmloss.linear_cross_entropy(h, w, y, backend="chunked", chunk_size=8, reduction=reduction)

    got = torch.compile(loss_fn, backend="aot_eager")(hidden, weight, labels)
    up = torch.rand_like(got) + 0.5
    got_grads = torch.autograd.grad((got * up).sum(), (hidden, weight))
    want = lmloss.causal_lm_loss(hidden @ weight.T, labels, reduction=reduction)
    want_grads = torch.autograd.grad((want * up).sum(), (hidden, weight))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
