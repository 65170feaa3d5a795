"""Independent truths for the loss tests: built on PyTorch's own cross_entropy in
float64 on the whole tensor (no chunking, no index tricks), and logits whose
per-token losses are known in closed form."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weights: torch.Tensor | None = None,
    normalize: str = "token",
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contract, written the slow and obvious way (float64, explicit shift).

    ``class_weights`` go to ``F.cross_entropy(weight=...)`` per token; the z-loss is
    weighted by the target's class weight and the mean divides by the targets'
    ``token weight * class weight`` (lmloss's choices, on top of torch's per-token loss).
    """
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w = torch.ones(labels.shape, dtype=torch.float64) if token_weights is None else token_weights.double()
    if shift:  # drop the last position and the first label
        z, y, w = z[..., :-1, :], labels[..., 1:], w[..., 1:]
    else:
        y = labels
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    u = None if class_weights is None else class_weights.double()
    ce = F.cross_entropy(
        z.reshape(-1, z.shape[-1]), safe_y.reshape(-1), weight=u, reduction="none", label_smoothing=label_smoothing
    ).view(y.shape)
    u_y = torch.ones(y.shape, dtype=torch.float64) if u is None else u[safe_y]
    ce = ce + z_loss * u_y * torch.logsumexp(z, dim=-1) ** 2
    w = w * valid
    per_token = torch.where(w > 0, ce * w, torch.zeros_like(ce))
    w = w * u_y  # what the mean counts
    if normalize == "sequence":
        rows = w.sum(-1, keepdim=True)
        per_token = torch.where(rows > 0, per_token / rows.clamp_min(1e-300), torch.zeros_like(per_token))
        items = (rows > 0).sum()
    else:
        items = w.sum()
    if reduction == "none":
        if not shift:
            return per_token
        out = torch.zeros(labels.shape, dtype=torch.float64)  # back to label alignment
        out[..., 1:] = per_token
        return out
    if reduction == "sum":
        return per_token.sum()
    divisor = float(items) if num_items_in_batch is None else float(num_items_in_batch)
    return per_token.sum() / divisor if divisor > 0 else per_token.sum() * 0.0


def logits_with_losses(targets: list[int], losses: list[float], vocab_size: int) -> torch.Tensor:
    """``[len(targets), V]`` logits whose cross-entropy at row i is exactly ``losses[i]``.

    Row i puts 0 on ``targets[i]`` and ``c`` on the other ``V-1`` classes, with
    ``(V-1) * e^c = e^L - 1``, so ``p[target] = 1 / (1 + (V-1) e^c) = e^-L``.
    """
    rows = []
    for target, loss in zip(targets, losses):
        row = torch.full((vocab_size,), math.log(math.expm1(loss) / (vocab_size - 1)), dtype=torch.float64)
        row[target] = 0.0
        rows.append(row)
    return torch.stack(rows)
