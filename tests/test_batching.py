"""Padding and packing collators: worked examples with exact tensors, the packed
loss against the same samples unpacked (random logits and a real tiny transformers
model), left vs right padding through a real model, pad == eos, properties over
random batches, and the errors bad input raises.

Truths here are independent of the collators: per-sample losses come from
``torch.nn.functional.cross_entropy`` on each sample alone, and target counts are
``(labels[1:] != -100).sum()`` on each sample alone.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmloss import causal_lm_loss
from lmloss.batching import PackingCollator, PaddingCollator

IGNORE = -100
VOCAB = 64


# --- helpers (independent truths) -------------------------------------------------------


def sample_count(labels) -> int:
    """Targets of one unpadded sample under shift=True: every label but the first."""
    labels = torch.as_tensor(labels)
    return int((labels[1:] != IGNORE).sum())


def batch_count(labels: torch.Tensor) -> int:
    """Targets of a batch under shift=True (what causal_lm_loss divides by)."""
    return int((labels[..., 1:] != IGNORE).sum())


def sample_loss_sum(logits: torch.Tensor, labels) -> torch.Tensor:
    """Summed next-token loss of one sample alone: logits [n, V], labels [n]."""
    labels = torch.as_tensor(labels)
    return F.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=IGNORE, reduction="sum")


def random_samples(lengths, seed=0, ignore_frac=0.3, first_label_trained=False):
    """Samples with random ids and labels = ids with some positions masked."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[torch.rand(n, generator=g) < ignore_frac] = IGNORE
        if first_label_trained:
            labels[0] = ids[0]
        samples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return samples


def segments(out: dict, row: int) -> list[tuple[int, int]]:
    """(start, length) of the real samples in a packed row, read from the masks."""
    real = out["attention_mask"][row].bool()
    starts = [j for j in range(real.numel()) if real[j] and out["position_ids"][row, j] == 0]
    ends = starts[1:] + [int(real.sum())]
    return [(s, e - s) for s, e in zip(starts, ends)]


def tiny_model(kind: str = "llama", attn: str = "sdpa", dtype=torch.float32):
    """A 2-layer model from a config (no download), deterministic weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[kind]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).to(dtype).eval()


def logits_of(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


# --- the worked packing example ---------------------------------------------------------


def test_packing_worked_example_exact():
    samples = [
        {"input_ids": [11, 12, 13]},
        {"input_ids": [21, 22, 23], "labels": [IGNORE, IGNORE, 23]},
        {"input_ids": [31, 32, 33, 34]},
        {"input_ids": [41]},
    ]
    collator = PackingCollator(6, pad_token_id=0, return_attention_mask=True, return_seq_idx=True)
    out = collator(samples)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0]]
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22, 23], [31, 32, 33, 34, 41, 0]]
    # First label of every sample masked; padding masked.
    assert out["labels"].tolist() == [
        [IGNORE, 12, 13, IGNORE, IGNORE, 23],
        [IGNORE, 32, 33, 34, IGNORE, IGNORE],
    ]
    assert out["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 1, 0]]
    # Segments over the flattened [2 * 6] tokens: 3, 3 | 4, 1, padding 1.
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, 3, 6, 10, 11, 12]
    assert out["max_seqlen"] == 4 and isinstance(out["max_seqlen"], int)
    assert out["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 4]]
    assert out["input_ids"].dtype == out["labels"].dtype == out["position_ids"].dtype == torch.long
    # 2 + 1 + 3 + 0 targets, the same as the samples alone.
    own_counts = [sample_count(s.get("labels", s["input_ids"])) for s in samples]
    assert own_counts == [2, 1, 3, 0] and batch_count(out["labels"]) == 6


def test_packing_plans():
    assert PackingCollator(6, 0).plan([3, 3, 4, 1]) == [[0, 1], [2, 3]]
    assert PackingCollator(6, 0, strategy="first_fit_decreasing").plan([3, 3, 4, 1]) == [[2, 3], [0, 1]]
    # First-fit decreasing needs fewer rows where next fit wastes room.
    assert PackingCollator(6, 0).plan([4, 3, 2, 2, 1]) == [[0], [1, 2], [3, 4]]
    assert PackingCollator(6, 0, strategy="first_fit_decreasing").plan([4, 3, 2, 2, 1]) == [[0, 2], [1, 3, 4]]


def test_packing_optional_outputs_absent_by_default():
    out = PackingCollator(8, 0)([{"input_ids": [1, 2]}])
    assert set(out) == {"input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen"}


def test_packing_static_shape_with_pad_to_multiple_of():
    out = PackingCollator(8, 0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert out["input_ids"].shape == (1, 8)
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 8]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert out["max_seqlen"] == 3


# --- packed loss == token-weighted loss of the samples unpacked ------------------------


@pytest.mark.parametrize("strategy", ["next_fit", "first_fit_decreasing"])
def test_packed_loss_equals_unpacked_with_random_logits(strategy):
    lengths = [5, 2, 7, 1, 4, 6, 3]
    samples = random_samples(lengths, seed=1, first_label_trained=True)
    collator = PackingCollator(9, pad_token_id=0, strategy=strategy, return_attention_mask=True)
    out = collator(samples)
    g = torch.Generator().manual_seed(2)
    per_sample = [torch.randn(n, VOCAB, generator=g, dtype=torch.float64) for n in lengths]

    # Garbage in the padding: it must not matter.
    packed = torch.randn(*out["input_ids"].shape, VOCAB, generator=g, dtype=torch.float64) * 50
    for r, row in enumerate(collator.plan(lengths)):
        start = 0
        for i in row:
            n = lengths[i]
            assert out["input_ids"][r, start : start + n].tolist() == samples[i]["input_ids"]
            packed[r, start : start + n] = per_sample[i]
            start += n

    total = sum(sample_count(s["labels"]) for s in samples)
    truth = sum(sample_loss_sum(z, s["labels"]) for z, s in zip(per_sample, samples)) / total
    assert batch_count(out["labels"]) == total
    torch.testing.assert_close(causal_lm_loss(packed, out["labels"]).double(), truth, rtol=1e-6, atol=1e-6)
    # The reference loss per sample agrees with cross_entropy per sample.
    ref = sum(causal_lm_loss(z, torch.tensor(s["labels"]), reduction="sum") for z, s in zip(per_sample, samples))
    torch.testing.assert_close((ref / total).double(), truth, rtol=1e-6, atol=1e-6)

    # Without masking each sample's first label, every sample that does not open a
    # row adds a cross-boundary target (last token of k -> first token of k+1).
    unmasked = out["labels"].clone()
    starts = (out["position_ids"] == 0) & out["attention_mask"].bool()
    unmasked[starts] = out["input_ids"][starts]  # first labels are trained in these samples
    n_boundaries = len(lengths) - out["input_ids"].shape[0]
    assert n_boundaries > 0
    assert batch_count(unmasked) == total + n_boundaries
    assert not torch.allclose(causal_lm_loss(packed, unmasked).double(), truth, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_forward_of_real_model_equals_separate_forwards(kind, attn):
    # transformers 5.x finds packed rows from position_ids (a position that does not
    # follow its predecessor by 1 starts a sequence) when no attention_mask and no
    # KV cache are given; the padding run's own 0.. positions keep it apart too.
    model = tiny_model(kind, attn, dtype=torch.float64)
    lengths = [5, 3, 6, 2, 4]
    samples = random_samples(lengths, seed=3)
    out = PackingCollator(10, pad_token_id=0)(samples)
    assert out["input_ids"].shape[0] >= 2  # several rows, some padded

    packed_logits = logits_of(model, input_ids=out["input_ids"], position_ids=out["position_ids"])
    loss = causal_lm_loss(packed_logits, out["labels"])

    separate = [logits_of(model, input_ids=torch.tensor([s["input_ids"]]))[0] for s in samples]
    total = sum(sample_count(s["labels"]) for s in samples)
    truth = sum(sample_loss_sum(z, s["labels"]) for z, s in zip(separate, samples)) / total
    torch.testing.assert_close(loss.double(), truth, rtol=1e-9, atol=1e-9)

    # Stronger: the logits of every packed sample are those of its separate forward.
    for r, row in enumerate(PackingCollator(10, 0).plan(lengths)):
        start = 0
        for i in row:
            torch.testing.assert_close(packed_logits[r, start : start + lengths[i]], separate[i])
            start += lengths[i]


# --- padding ----------------------------------------------------------------------------


def test_padding_right_and_left_exact():
    samples = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8]}]
    right = PaddingCollator(pad_token_id=0)(samples)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]

    left = PaddingCollator(pad_token_id=0, padding_side="left")(samples)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]


def test_left_padding_masks_first_label():
    # With left padding the first real label would be the target of the pad slot
    # before it: a target that the sample alone does not have.
    out = PaddingCollator(0, padding_side="left")([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5, 6]}])
    assert out["labels"][0].tolist() == [IGNORE, IGNORE, IGNORE, 2]
    assert batch_count(out["labels"]) == 1 + 3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_and_right_padding_give_the_same_loss_with_a_real_model(attn):
    model = tiny_model("llama", attn, dtype=torch.float32)
    samples = random_samples([7, 3, 5, 1, 6], seed=4)
    losses = {}
    for side in ("right", "left"):
        out = PaddingCollator(pad_token_id=0, padding_side=side, pad_to_multiple_of=4)(samples)
        logits = logits_of(
            model,
            input_ids=out["input_ids"],
            attention_mask=out["attention_mask"],
            position_ids=out["position_ids"],
        )
        assert torch.isfinite(logits[out["attention_mask"].bool()]).all()
        losses[side] = causal_lm_loss(logits, out["labels"])
        assert batch_count(out["labels"]) == sum(sample_count(s["labels"]) for s in samples)

    separate = [logits_of(model, input_ids=torch.tensor([s["input_ids"]]))[0] for s in samples]
    total = sum(sample_count(s["labels"]) for s in samples)
    truth = sum(sample_loss_sum(z, s["labels"]) for z, s in zip(separate, samples)) / total
    torch.testing.assert_close(losses["left"], losses["right"], rtol=0, atol=1e-5)
    torch.testing.assert_close(losses["right"].double(), truth, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_token_weights_match_unpadded(side):
    g = torch.Generator().manual_seed(5)
    samples = random_samples([4, 2, 6], seed=5)
    for s in samples:
        s["token_weights"] = torch.rand(len(s["input_ids"]), generator=g, dtype=torch.float64)
    out = PaddingCollator(0, padding_side=side)(samples)
    assert out["token_weights"].dtype == torch.float64
    pad = out["attention_mask"] == 0
    assert (out["token_weights"][pad] == 0).all()

    logits = torch.randn(*out["input_ids"].shape, VOCAB, generator=g, dtype=torch.float64)
    loss = causal_lm_loss(logits, out["labels"], token_weights=out["token_weights"], reduction="sum")
    truth = 0.0
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        cols = slice(0, n) if side == "right" else slice(logits.shape[1] - n, None)
        truth += causal_lm_loss(
            logits[b, cols], torch.tensor(s["labels"]), token_weights=s["token_weights"], reduction="sum"
        )
    torch.testing.assert_close(loss, truth)


@pytest.mark.parametrize(
    "collator",
    [
        PaddingCollator(2),
        PaddingCollator(2, padding_side="left"),
        PackingCollator(8, 2, pad_to_multiple_of=8, return_attention_mask=True),
    ],
)
def test_pad_equal_to_eos_keeps_the_eos_target(collator):
    eos = 2
    samples = [
        {"input_ids": [9, 5, 6, eos], "labels": [IGNORE, IGNORE, 6, eos]},
        {"input_ids": [7, eos]},
        {"input_ids": [3, 4, 5, 6, 7, eos]},
    ]
    out = collator(samples)
    real = out["attention_mask"].bool()
    assert ((out["input_ids"] == eos) & ~real).any()  # padding does use the EOS id
    # Every real EOS is still a target; no padding slot is.
    eos_slots = (out["input_ids"] == eos) & real
    assert int(eos_slots.sum()) == 3 and (out["labels"][eos_slots] == eos).all()
    assert (out["labels"][~real] == IGNORE).all()
    assert batch_count(out["labels"]) == 2 + 1 + 5


# --- properties over random batches -----------------------------------------------------


@st.composite
def packing_cases(draw):
    max_length = draw(st.integers(1, 12))
    n_samples = draw(st.integers(1, 8))
    samples = []
    for _ in range(n_samples):
        n = draw(st.integers(1, max_length))
        ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
        labels = [draw(st.sampled_from([i, IGNORE])) for i in ids]
        samples.append({"input_ids": ids, "labels": labels})
    strategy = draw(st.sampled_from(["next_fit", "first_fit_decreasing"]))
    multiple = draw(st.sampled_from([None, 1, max_length]))
    return max_length, samples, strategy, multiple


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packing_cases())
def test_packing_properties(case):
    max_length, samples, strategy, multiple = case
    pad = 63
    out = PackingCollator(
        max_length,
        pad,
        strategy=strategy,
        pad_to_multiple_of=multiple,
        return_attention_mask=True,
        return_seq_idx=True,
    )(samples)
    rows, row_len = out["input_ids"].shape
    assert row_len <= max_length

    # The count is that of the samples alone: boundaries removed once, not twice.
    assert batch_count(out["labels"]) == sum(sample_count(s["labels"]) for s in samples)

    found = []
    for r in range(rows):
        segs = segments(out, r)
        assert 1 <= sum(n for _, n in segs) <= max_length
        for start, n in segs:
            # Positions restart at every sample start and count up inside it.
            assert out["position_ids"][r, start : start + n].tolist() == list(range(n))
            labels = out["labels"][r, start : start + n].tolist()
            assert labels[0] == IGNORE
            found.append((out["input_ids"][r, start : start + n].tolist(), labels[1:]))
        padding = ~out["attention_mask"][r].bool()
        assert (out["labels"][r][padding] == IGNORE).all() and (out["input_ids"][r][padding] == pad).all()
        assert out["position_ids"][r][padding].tolist() == list(range(int(padding.sum())))

    # Every sample appears, in order, in exactly one row (next fit: in input order).
    expected = [(s["input_ids"], s["labels"][1:]) for s in samples]
    if strategy == "next_fit":
        assert found == expected
    else:
        assert sorted(found) == sorted(expected)

    # cu_seqlens: boundaries of samples and padding runs over the flattened tokens.
    cu = out["cu_seqlens"].tolist()
    flat_pos = out["position_ids"].flatten()
    assert cu[0] == 0 and cu[-1] == rows * row_len
    assert cu[:-1] == (flat_pos == 0).nonzero().flatten().tolist()
    assert out["max_seqlen"] == max(b - a for a, b in itertools.pairwise(cu))
    expected_seq_idx = [k for k in range(len(cu) - 1) for _ in range(cu[k + 1] - cu[k])]
    assert out["seq_idx"].flatten().tolist() == expected_seq_idx


@settings(max_examples=100, deadline=None)
@given(packing_cases())
def test_padding_properties(case):
    _, samples, _, multiple = case
    right = PaddingCollator(63, pad_to_multiple_of=multiple)(samples)
    left = PaddingCollator(63, padding_side="left", pad_to_multiple_of=multiple)(samples)
    total = sum(sample_count(s["labels"]) for s in samples)
    assert batch_count(right["labels"]) == batch_count(left["labels"]) == total
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        r_real, l_real = right["attention_mask"][b].bool(), left["attention_mask"][b].bool()
        for key, expected in (("input_ids", s["input_ids"]), ("position_ids", list(range(n)))):
            assert right[key][b][r_real].tolist() == left[key][b][l_real].tolist() == expected
        assert right["labels"][b][r_real].tolist()[1:] == s["labels"][1:]
        assert right["labels"][b][r_real].tolist() == left["labels"][b][l_real].tolist()


# --- inputs accepted --------------------------------------------------------------------


def test_tensor_and_list_inputs_collate_the_same():
    as_lists = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5]}]
    as_tensors = [{k: torch.tensor(v, dtype=torch.int32) for k, v in s.items()} for s in as_lists]
    for collator in (PaddingCollator(0, padding_side="left"), PackingCollator(4, 0)):
        a, b = collator(as_lists), collator(as_tensors)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_truncation_keeps_the_first_tokens():
    samples = [
        {"input_ids": [1, 2, 3, 4, 5], "token_weights": [1.0, 2.0, 3.0, 4.0, 5.0]},
        {"input_ids": [6], "token_weights": [6.0]},
    ]
    out = PaddingCollator(0, max_length=3, truncation=True)(samples)
    assert out["input_ids"].tolist() == [[1, 2, 3], [6, 0, 0]]
    assert out["token_weights"].tolist() == [[1.0, 2.0, 3.0], [6.0, 0.0, 0.0]]
    packed = PackingCollator(4, 0, truncation=True)(samples)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4], [6, 0, 0, 0]]


def test_all_ones_attention_mask_from_a_tokenizer_is_accepted():
    samples = [{"input_ids": [1, 2], "attention_mask": [1, 1]}, {"input_ids": [3]}]
    out = PaddingCollator(0)(samples)
    assert out["attention_mask"].tolist() == [[1, 1], [1, 0]]


# --- bad input --------------------------------------------------------------------------

BAD_SAMPLES = [
    ([], ValueError, "empty batch"),
    ({"input_ids": [1]}, TypeError, "list of samples"),
    ([[1, 2]], TypeError, "mapping"),
    ([{"labels": [1]}], ValueError, "no 'input_ids'"),
    ([{"input_ids": []}], ValueError, "empty"),
    ([{"input_ids": [1, 2], "labels": [1]}], ValueError, "labels has 1 entries but input_ids has 2"),
    ([{"input_ids": [1.0, 2.0]}], TypeError, "not an int"),
    ([{"input_ids": [True, 2]}], TypeError, "not an int"),
    ([{"input_ids": "hello"}], TypeError, "list of numbers or a 1-D tensor"),
    ([{"input_ids": torch.tensor([1.0, 2.0])}], TypeError, "integers"),
    ([{"input_ids": torch.tensor([[1, 2]])}], ValueError, "1-D"),
    ([{"input_ids": [1, -2]}], ValueError, "negative id"),
    ([{"input_ids": [1, 2], "labels": [-1, 2]}], ValueError, r"labels\[0\] = -1"),
    ([{"input_ids": [1]}, {"input_ids": [2], "token_weights": [1.0]}], ValueError, "same keys"),
    ([{"input_ids": [1, 2], "token_weights": [1.0]}], ValueError, "token_weights has 1 entries"),
    ([{"input_ids": [1, 2], "text": "hi"}], TypeError, "per-token keys only"),
    ([{"input_ids": [1, 2], "position_ids": [0, 1]}], ValueError, "builds itself"),
    ([{"input_ids": [1, 2], "attention_mask": [0, 1]}], ValueError, "unpadded"),
    ([{"input_ids": list(range(9))}], ValueError, "more than max_length=8"),
]


@pytest.mark.parametrize("samples, error, match", BAD_SAMPLES)
@pytest.mark.parametrize("make", [lambda: PaddingCollator(0, max_length=8), lambda: PackingCollator(8, 0)])
def test_bad_samples_raise(make, samples, error, match):
    with pytest.raises(error, match=match):
        make()(samples)


BAD_OPTIONS = [
    (lambda: PaddingCollator(-1), ValueError, "pad_token_id"),
    (lambda: PaddingCollator(True), TypeError, "pad_token_id"),
    (lambda: PaddingCollator(0, padding_side="middle"), ValueError, "padding_side"),
    (lambda: PaddingCollator(0, max_length=0), ValueError, "max_length"),
    (lambda: PaddingCollator(0, truncation=True), ValueError, "needs max_length"),
    (lambda: PaddingCollator(0, max_length=10, pad_to_multiple_of=4), ValueError, "multiple"),
    (lambda: PaddingCollator(0, ignore_index=None), TypeError, "ignore_index"),
    (lambda: PackingCollator(None, 0), TypeError, "max_length"),
    (lambda: PackingCollator(8, 0, strategy="best_fit"), ValueError, "strategy"),
    (lambda: PackingCollator(8, 0, return_attention_mask="yes"), TypeError, "return_attention_mask"),
    (lambda: PackingCollator(8, 0).plan([3, 9]), ValueError, r"lengths\[1\] = 9"),
]


@pytest.mark.parametrize("build, error, match", BAD_OPTIONS)
def test_bad_options_raise(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "make", [lambda: PaddingCollator(0, max_length=4, truncation=True), lambda: PackingCollator(4, 0, truncation=True)]
)
def test_truncation_that_empties_a_sample_is_reported(make):
    collate = make()
    prompt_only_at_start = {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, -100, 5, 6]}
    fine = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    with pytest.warns(UserWarning, match=r"left 1 of 2 samples of this batch with no target \(samples \[0\]\)"):
        batch = collate([prompt_only_at_start, fine])
    assert int((batch["labels"][..., 1:] != -100).sum()) == 2  # only the second sample's targets
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # truncation that keeps a target says nothing
        collate([{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [1, 2, 3, 4, 5, 6]}])


# --- fuzz: losses of padded and packed batches against each sample alone -----------------


def _context_free_logits(input_ids: torch.Tensor, position_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Logits that depend only on a token and its position inside its own sample: what a
    model with perfect sample separation computes, so packing and padding must not matter."""
    return table[input_ids] + 0.25 * position_ids.unsqueeze(-1).to(table.dtype)


@settings(max_examples=40, deadline=None)
@given(packing_cases(), st.sampled_from(["sum", "mean"]))
def test_fuzz_padded_and_packed_losses_equal_the_samples_alone(case, reduction):
    max_length, samples, strategy, multiple = case
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(len(samples)), dtype=torch.float64)
    alone = [
        sample_loss_sum(
            _context_free_logits(torch.tensor(s["input_ids"]), torch.arange(len(s["input_ids"])), table), s["labels"]
        )
        for s in samples
    ]
    count = sum(sample_count(s["labels"]) for s in samples)
    truth = sum(alone, torch.zeros((), dtype=torch.float64))
    if reduction == "mean":
        truth = truth / count if count else truth  # no target: 0, never NaN
    batches = [
        PaddingCollator(63, padding_side="right", pad_to_multiple_of=multiple)(samples),
        PaddingCollator(63, padding_side="left", pad_to_multiple_of=multiple)(samples),
        PackingCollator(max_length, 63, strategy=strategy, pad_to_multiple_of=multiple)(samples),
    ]
    for batch in batches:
        logits = _context_free_logits(batch["input_ids"], batch["position_ids"], table)
        loss = causal_lm_loss(logits, batch["labels"], reduction=reduction)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-5)


def test_reprs_name_the_options_in_argument_order():
    assert repr(PaddingCollator(3, padding_side="left", pad_to_multiple_of=8, max_length=64, truncation=True)) == (
        "PaddingCollator(pad_token_id=3, padding_side='left', pad_to_multiple_of=8, max_length=64, "
        "truncation=True, ignore_index=-100)"
    )
    assert repr(PackingCollator(16, 2, strategy="first_fit_decreasing", ignore_index=-7)) == (
        "PackingCollator(max_length=16, pad_token_id=2, strategy='first_fit_decreasing', truncation=False, "
        "pad_to_multiple_of=None, ignore_index=-7)"
    )


@pytest.mark.parametrize(
    "make", [lambda **kw: PaddingCollator(0, max_length=8, **kw), lambda **kw: PackingCollator(8, 0, **kw)]
)
def test_shared_options_are_checked_alike(make):
    with pytest.raises(ValueError, match="max_length=8 is not a multiple of pad_to_multiple_of=3"):
        make(pad_to_multiple_of=3)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        make(pad_to_multiple_of=0)
    with pytest.raises(TypeError, match="truncation must be a bool"):
        make(truncation=1)
