"""Small builders shared by the grounding tests (token rows, float64 boxes)."""

from __future__ import annotations

import torch

DIGITS = list(range(20, 30))  # digit d is token 20 + d
START, END, COMMA = 40, 41, 42


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def digit_row(*numbers: int) -> list[int]:
    """``<box_start> digits , digits , ... <box_end>`` with the ids above."""
    row = [START]
    for n in numbers:
        row += [20 + int(d) for d in str(n)] + [COMMA]
    return row[:-1] + [END]


def python_giou(p: list[float], q: list[float]) -> float:
    """GIoU in plain Python for valid boxes (the formula of Rezatofighi et al.)."""
    area = lambda b: max(b[2] - b[0], 0) * max(b[3] - b[1], 0)  # noqa: E731  (a one-line formula, read beside its uses)
    iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
    ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
    inter = iw * ih
    union = area(p) + area(q) - inter
    enclosing = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return inter / union - (enclosing - union) / enclosing
