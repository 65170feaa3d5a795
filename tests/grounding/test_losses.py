"""lmloss.grounding.losses: expected coordinates and box losses from hidden states.

Truths: hand-computed expectations of small distributions, torch.autograd.gradcheck
in float64, and the box loss written out on fully materialized float64 logits with
plain Python loops.
"""

from __future__ import annotations

import pytest
import torch
from _grounding_cases import DIGITS, END, START, digit_row, python_giou

from lmloss.grounding import (
    BoxTokenIds,
    box_loss,
    box_loss_from_logits,
    expected_bin_coordinate,
    expected_boxes,
    expected_number,
    find_box_targets,
    grounding_loss,
)

# ------------------------------------------------------- expected coordinates


def test_expected_bin_coordinate_equals_hand_computed_values():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    # Centres of 4 bins: 0.125, 0.375, 0.625, 0.875.
    # E = 0.0125 + 0.075 + 0.1875 + 0.35 = 0.625.
    assert expected_bin_coordinate(probs.log()).item() == pytest.approx(0.625, abs=1e-12)
    # T = 0.5 squares the probabilities: [.01, .04, .09, .16] / 0.30
    # E = (.00125 + .015 + .05625 + .14) / .3 = 0.2125 / 0.3.
    hot = expected_bin_coordinate(probs.log(), temperature=0.5)
    assert hot.item() == pytest.approx(0.2125 / 0.3, abs=1e-12)
    # Straight-through: the forward value is the argmax bin's centre, 0.875.
    assert expected_bin_coordinate(probs.log(), straight_through=True).item() == pytest.approx(0.875, abs=1e-12)


def test_expected_bin_coordinate_reads_only_the_bin_tokens_of_full_logits():
    bin_ids = [5, 2, 6, 0]  # bin k is token bin_ids[k]
    logits = torch.full((2, 7), 50.0, dtype=torch.float64)  # huge non-bin logits must not matter
    logits[0, bin_ids] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log()
    logits[1, bin_ids] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64).log()
    out = expected_bin_coordinate(logits, bin_ids)
    torch.testing.assert_close(out, torch.tensor([0.625, 0.125], dtype=torch.float64))
    assert expected_bin_coordinate(logits.to(torch.bfloat16), bin_ids).dtype == torch.float32


def test_straight_through_has_the_soft_gradient():
    z = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    (soft_grad,) = torch.autograd.grad(expected_bin_coordinate(z), z)
    (st_grad,) = torch.autograd.grad(expected_bin_coordinate(z, straight_through=True), z)
    torch.testing.assert_close(st_grad, soft_grad)
    assert soft_grad.abs().sum() > 0


def test_expected_number_equals_hand_computed_value():
    # "5?" digits: p1 = one-hot 5 -> 5; p2 = half 0, half 2 -> 1; p3 uniform -> 4.5.
    # Value = 5 * 100 + 1 * 10 + 4.5 = 514.5.
    probs = torch.zeros(3, 10, dtype=torch.float64)
    probs[0, 5] = 1.0
    probs[1, 0] = probs[1, 2] = 0.5
    probs[2] = 0.1
    logits = probs.clamp_min(1e-300).log()
    assert expected_number(logits).item() == pytest.approx(514.5, abs=1e-9)
    # Through full-vocabulary logits and the digit ids (digit d is token 20 + d).
    full = torch.zeros(3, 40, dtype=torch.float64)
    full[:, 20:30] = logits
    full[:, :20] = 30.0  # other tokens, large, ignored
    assert expected_number(full, list(range(20, 30))).item() == pytest.approx(514.5, abs=1e-9)


def test_gradcheck_expected_coordinates():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    ids = [7, 1, 4, 9, 0]
    assert torch.autograd.gradcheck(lambda x: expected_bin_coordinate(x, ids, temperature=0.7), (z,))
    digits = torch.randn(3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: expected_number(x, list(range(1, 11))), (digits,))


def test_expected_coordinates_reject_bad_input():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        expected_bin_coordinate(torch.zeros(2, 4), temperature=0.0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 4\)"):
        expected_bin_coordinate(torch.zeros(2, 4), [1, 4])
    with pytest.raises(ValueError, match=r"\[\.\.\., L, 10\]"):
        expected_number(torch.zeros(3, 9))


# ---------------------------------------------------------------- box loss


def _materialized_box_loss(logits: torch.Tensor, labels: torch.Tensor, tokens: BoxTokenIds) -> dict[str, float]:
    """The box terms from full float64 logits, written out with loops over the labels."""
    b_size, width, _ = logits.shape
    preds, targets = [], []
    for b in range(b_size):
        row = labels[b].tolist()
        col = 0
        while col < width:
            if tokens.kind == "bins" and row[col] in tokens.value_ids:
                ids = torch.tensor(tokens.value_ids)
                n = len(ids)
                centres = [(k + 0.5) / n for k in range(n)]
                p, q = [], []
                for j in range(4):  # position col + j - 1 predicts the token at col + j
                    probs = torch.softmax(logits[b, col + j - 1, ids].double(), -1)
                    p.append(sum(float(probs[k]) * centres[k] for k in range(n)))
                    q.append(centres[tokens.value_ids.index(row[col + j])])
                preds.append(p)
                targets.append(q)
                col += 4
                continue
            if tokens.kind == "digits" and row[col] == tokens.box_start_id:
                end = row.index(tokens.box_end_id, col)
                p, q, number = [], [], []
                for c in range(col + 1, end + 1):
                    if c < end and row[c] in tokens.value_ids:
                        number.append(c)
                    elif number:
                        ids = torch.tensor(tokens.value_ids)
                        value, truth = 0.0, 0
                        for j, c2 in enumerate(number):
                            probs = torch.softmax(logits[b, c2 - 1, ids].double(), -1)
                            mean_digit = sum(float(probs[d]) * d for d in range(10))
                            value += 10 ** (len(number) - 1 - j) * mean_digit
                            truth = truth * 10 + tokens.value_ids.index(row[c2])
                        p.append(value / 1000)
                        q.append(truth / 1000)
                        number = []
                preds.append(p)
                targets.append(q)
                col = end + 1
                continue
            col += 1
    m = len(preds)
    l1 = sum(sum(abs(a - c) for a, c in zip(p, q)) for p, q in zip(preds, targets)) / m
    g = sum(1 - python_giou(p, q) for p, q in zip(preds, targets)) / m
    return {"l1": l1, "giou": g}


def _digit_batch() -> tuple[torch.Tensor, BoxTokenIds]:
    row0 = [1, 2] + digit_row(12, 503, 600, 1000) + [3]
    row1 = [4] + digit_row(7, 0, 45, 99) + digit_row(100, 200, 300, 400) + [5]
    width = max(len(row0), len(row1))
    labels = torch.tensor([row0 + [-100] * (width - len(row0)), row1 + [-100] * (width - len(row1))])
    labels[0, :2] = -100  # prompt
    return labels, BoxTokenIds.digits(DIGITS, START, END)


def _bin_batch() -> tuple[torch.Tensor, BoxTokenIds]:
    bins = [30 + k for k in range(12)]
    labels = torch.tensor(
        [[-100, 1, 33, 35, 38, 40, 2, 31, 30, 41, 39, 3], [-100, 4, 32, 36, 34, 37, 5, -100, -100, -100, -100, -100]]
    )
    return labels, BoxTokenIds.bins(bins)


@pytest.mark.parametrize("batch", [_digit_batch, _bin_batch])
def test_box_loss_from_hidden_equals_the_materialized_computation(batch):
    labels, tokens = batch()
    g = torch.Generator().manual_seed(3)
    vocab, dim = 48, 6
    hidden = torch.randn(*labels.shape, dim, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=g, requires_grad=True)
    targets = find_box_targets(labels, tokens)
    assert targets.num_boxes == 3
    # eps=0: the plain formula (these boxes are far from degenerate).
    terms = box_loss(hidden, weight, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)
    logits = hidden @ weight.T
    truth = _materialized_box_loss(logits.detach(), labels, tokens)
    # rel 1e-7: BoxTargets stores the target boxes in float32 (503/1000 is not exact).
    assert terms["l1"].item() == pytest.approx(truth["l1"], rel=1e-7)
    assert terms["giou"].item() == pytest.approx(truth["giou"], rel=1e-7)
    assert terms["loss"].item() == pytest.approx(2.0 * truth["l1"] + 0.5 * truth["giou"], rel=1e-7)
    # The logits form agrees, value and gradient.
    from_logits = box_loss_from_logits(logits, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)
    grads = torch.autograd.grad(terms["loss"], (hidden, weight))
    ref_grads = torch.autograd.grad(from_logits["loss"], (hidden, weight))
    assert from_logits["loss"].item() == pytest.approx(terms["loss"].item(), rel=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_box_loss_touches_only_the_coordinate_rows_and_value_tokens():
    labels, tokens = _digit_batch()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*labels.shape, 4, generator=g)
    weight = torch.randn(48, 4, generator=g)
    targets = find_box_targets(labels, tokens)
    # NaN everywhere the loss must not read: other vocabulary rows, other positions.
    poisoned_w = torch.full_like(weight, float("nan"))
    poisoned_w[list(tokens.value_ids)] = weight[list(tokens.value_ids)]
    poisoned_h = torch.full_like(hidden, float("nan")).view(-1, 4)
    poisoned_h[targets.positions] = hidden.view(-1, 4)[targets.positions]
    poisoned_h = poisoned_h.view_as(hidden).requires_grad_()
    poisoned_w.requires_grad_()
    terms = box_loss(poisoned_h, poisoned_w, targets)
    clean = box_loss(hidden, weight, targets)
    assert terms["loss"].item() == pytest.approx(clean["loss"].item(), rel=1e-6)
    terms["loss"].backward()
    assert torch.isfinite(poisoned_w.grad).all() and torch.isfinite(poisoned_h.grad).all()
    others = torch.ones(48, dtype=torch.bool)
    others[list(tokens.value_ids)] = False
    assert (poisoned_w.grad[others] == 0).all()


def test_gradcheck_box_loss():
    labels, tokens = _bin_batch()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(*labels.shape, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(48, 3, dtype=torch.float64, generator=g, requires_grad=True)
    targets = find_box_targets(labels, tokens)
    assert torch.autograd.gradcheck(lambda h, w: box_loss(h, w, targets, temperature=0.8)["loss"], (hidden, weight))
    digit_labels, digit_tokens = _digit_batch()
    digit_targets = find_box_targets(digit_labels, digit_tokens)
    hidden = torch.randn(*digit_labels.shape, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: box_loss(h, w, digit_targets)["loss"], (hidden, weight))


def test_box_loss_is_float32_and_an_attached_zero_without_boxes():
    labels, tokens = _bin_batch()
    hidden = torch.randn(*labels.shape, 4, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(48, 4, dtype=torch.bfloat16, requires_grad=True)
    targets = find_box_targets(labels, tokens)
    assert all(v.dtype == torch.float32 for v in box_loss(hidden, weight, targets).values())
    assert expected_boxes(hidden, weight, targets).shape == (3, 4)
    empty = find_box_targets(torch.full_like(labels, -100), tokens)
    terms = box_loss(hidden, weight, empty)
    assert terms["loss"].item() == 0.0 and terms["loss"].requires_grad
    terms["loss"].backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_grounding_loss_adds_the_terms_to_the_token_cross_entropy():
    labels, tokens = _digit_batch()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(*labels.shape, 8, generator=g)
    weight = torch.randn(48, 8, generator=g)
    targets = find_box_targets(labels, tokens)
    out = grounding_loss(hidden, weight, labels, targets, l1_weight=2.0, giou_weight=0.2)
    ce = torch.nn.functional.cross_entropy(  # PyTorch's own CE on the shifted targets
        (hidden[:, :-1] @ weight.T).reshape(-1, 48), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    box = box_loss(hidden, weight, targets)
    assert out["l1"].item() == pytest.approx(box["l1"].item()) and out["giou"].item() == pytest.approx(
        box["giou"].item()
    )
    assert out["loss"].item() == pytest.approx(ce.item() + 2.0 * box["l1"].item() + 0.2 * box["giou"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="shift=False but the box targets were found with shift=True"):
        grounding_loss(hidden, weight, labels, targets, shift=False)
    with pytest.raises(ValueError, match="positions"):
        box_loss(hidden[:1], weight, targets)
