"""Throughput of a run: tokens per second, achieved TFLOP/s and MFU, per flush window.

Names as torchtitan and OLMo-core log them: ``throughput/tokens_per_s`` (target
tokens of the global batch per second), ``throughput/tflops`` (achieved TFLOP/s per
device, torchtitan's ``tflops``) and ``throughput/mfu`` (model FLOPs utilisation in
percent of the device's peak, torchtitan's ``mfu(%)``, OLMo-core's MFU)::

    mfu = 100 * tokens_per_s_per_device * flops_per_token / peak_flops

``flops_per_token`` is the model's training FLOPs per token (forward and backward,
about ``6 * parameters`` plus attention; e.g. ``trl.trainer.utils.compute_flops_per_token``)
and ``peak_flops`` the device's dense peak (H100/H200 bf16: ``989e12``; B200: ``2.25e15``).
The FLOPs are counted on the tokens the model *processes*: ``input_tokens`` when a step
gives them, else its target ``tokens`` (the same up to one per row in pre-training;
fewer in SFT, where prompts are not targets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Throughput", "check_flops"]


def check_flops(flops_per_token: object, peak_flops: object) -> None:
    """Both ``None`` or positive finite numbers; ``peak_flops`` needs ``flops_per_token``."""
    for name, value in (("flops_per_token", flops_per_token), ("peak_flops", peak_flops)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be None or a number of FLOPs, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if peak_flops is not None and flops_per_token is None:
        raise ValueError("peak_flops (for MFU) needs flops_per_token, the model's training FLOPs per token")


class Throughput:
    """Rates over the train steps of one flush (one value for the whole window).

    Host time between two ``update`` calls says little about one step when the
    accelerator runs ahead of the host; over a whole flush window it is the real
    rate. Step k's work lies between the ``update`` calls of steps k-1 and k.
    """

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None) -> None:
        check_flops(flops_per_token, peak_flops)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.last_time: float | None = None

    def window(
        self, splits: Sequence[str], times: Sequence[float], rows: Sequence[dict[str, float]], devices: int
    ) -> dict[str, float]:
        """``{"tokens_per_s": .., "tflops": .., "mfu": ..}`` of one flush (the keys that are known).

        Args:
            splits, times, rows: per pending step, its split, ``update`` time and global values.
            devices: the processes the global counts are summed over (per-device FLOP/s).
        """
        train = [(t, row) for s, t, row in zip(splits, times, rows) if s == "train"]
        start = self.last_time
        # An evaluation always ends its flush; the next interval starts after it,
        # so the time spent evaluating is not counted as training time.
        self.last_time = times[-1]
        if start is None and train:  # the very first step only marks the start
            start, train = train[0][0], train[1:]
        if not train or start is None:
            return {}
        elapsed = train[-1][0] - start
        if not elapsed > 0:
            return {}
        out: dict[str, float] = {}
        tokens = [row.get("tokens") for _, row in train]
        if all(t is not None for t in tokens):
            out["tokens_per_s"] = math.fsum(tokens) / elapsed  # type: ignore[arg-type]  # none is None (checked)
        processed = [row.get("input_tokens", row.get("tokens")) for _, row in train]
        if self.flops_per_token is not None and all(t is not None for t in processed):
            per_device = math.fsum(processed) / elapsed / devices  # type: ignore[arg-type]  # none is None (checked)
            achieved = per_device * self.flops_per_token
            out["tflops"] = achieved / 1e12
            if self.peak_flops is not None:
                out["mfu"] = 100.0 * achieved / self.peak_flops
        return out
