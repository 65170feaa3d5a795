"""Batching: pad samples into a rectangle, or pack several samples into each row.

A *sample* is a mapping with

- ``input_ids``: the token ids, a ``list[int]`` (or tuple, numpy array) or a 1-D
  integer tensor of length ``n >= 1``;
- ``labels`` (optional): ``n`` *unshifted* labels aligned with ``input_ids``, as
  ``lmloss.labels`` produces them and ``causal_lm_loss(..., shift=True)`` expects
  them; ``ignore_index`` where nothing is trained. Missing means "train on every
  token" (``labels = input_ids``);
- any other per-token key (e.g. ``token_weights``): ``n`` numbers, padded with 0.

Both collators follow one rule for labels: **the label at the first token of every
sample is set to** ``ignore_index``. With ``shift=True`` that label is the target of
the position *before* the sample, which is padding (left padding) or the last token
of the previous sample (packing); the model must learn neither "pad predicts the
first token" nor "the end of sample k predicts the start of sample k+1" (TRL masks
``labels[position_ids == 0]`` for the same reason). In a sample of its own, position
0 is never a target under ``shift=True``, so this masking never changes a sample's
target count: the count of a batch, ``(labels[..., 1:] != ignore_index).sum()``, is
exactly the sum over samples of ``(labels[1:] != ignore_index).sum()``, whatever
the padding side or packing. Nothing else subtracts boundaries, so they are never
removed twice.

Padding is *positional*: a slot is padding because it lies beyond the sample, never
because its id equals ``pad_token_id``. With ``pad_token_id == eos_token_id`` the
real EOS at the end of a sample stays a target, so the model still learns to stop.

Every run of padding gets ``position_ids`` ``0, 1, ..., k-1``, as if it were a dummy
sample of its own. Packed rows therefore read the same to every consumer:
``cu_seqlens`` lists the padding run as one more segment, and transformers'
packed-sequence detection (position ids that do not increase by 1 start a new
sequence) separates it from the real samples.

Outputs are CPU tensors (collators run in ``DataLoader`` workers); move them to
the device in the training loop.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from lmloss._validation import check_choice, check_int

__all__ = ["PaddingCollator", "PackingCollator"]

PaddingSide = Literal["right", "left"]
PackingStrategy = Literal["next_fit", "first_fit_decreasing"]

# Keys a collator builds itself; a sample that carries one would be ambiguous.
_BUILT_KEYS = ("position_ids", "cu_seqlens", "max_seqlen", "seq_idx")
# Keys that some samples of a batch may carry and others not.
_OPTIONAL_KEYS = frozenset({"labels", "attention_mask"})


@dataclass(frozen=True)
class _Sample:
    """One validated sample: ``[n]`` long ids and labels, ``[n]`` extra tensors."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    extras: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.input_ids.numel()


# --------------------------------------------------------------------------------------
# Public collators
# --------------------------------------------------------------------------------------


class _Collator:
    """What both collators share: the options that read samples and fill padding,
    checked alike, and the reading of a batch with them."""

    pad_token_id: int
    max_length: int | None
    pad_to_multiple_of: int | None
    truncation: bool
    ignore_index: int
    # The options ``repr`` shows, in the order of the constructor's arguments.
    _repr_options: ClassVar[tuple[str, ...]]

    def _set_shared_options(
        self,
        pad_token_id: object,
        max_length: object,
        pad_to_multiple_of: object,
        truncation: object,
        ignore_index: object,
    ) -> None:
        self.pad_token_id = _check_token_id("pad_token_id", pad_token_id)
        self.max_length = _check_optional_positive("max_length", max_length)
        self.pad_to_multiple_of = _check_optional_positive("pad_to_multiple_of", pad_to_multiple_of)
        _check_multiple(self.max_length, self.pad_to_multiple_of)
        self.truncation = _check_bool("truncation", truncation)
        self.ignore_index = check_int("ignore_index", ignore_index)

    def _read_batch(self, samples: object) -> list[_Sample]:
        return _normalize_batch(
            samples, ignore_index=self.ignore_index, max_length=self.max_length, truncation=self.truncation
        )

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_options)
        return f"{type(self).__name__}({options})"


class PaddingCollator(_Collator):
    """Pad a list of samples to one rectangle ``[batch, seq_len]``.

    Args:
        pad_token_id: id written into padded slots of ``input_ids``. It may equal
            the EOS id: padding is decided by position, never by id.
        padding_side: ``"right"`` (training) or ``"left"`` (generation-style).
            Both give the same ``position_ids`` for real tokens (0 at each sample's
            first token) and the same target count, so the same loss.
        pad_to_multiple_of: round ``seq_len`` up to a multiple of this (tensor-core
            friendly shapes; ``pad_to_multiple_of=max_length`` gives a static shape).
        max_length: longest allowed sample. Over-long samples raise a
            ``ValueError`` unless ``truncation=True``. ``None``: no limit.
        truncation: keep only the first ``max_length`` tokens of an over-long sample
            (every per-token key is cut the same way). Truncation can leave a sample
            with no target; ``causal_lm_loss`` then scores it as 0, not NaN.
        ignore_index: label of padding and of each sample's first token; sample
            labels must use the same value for "not trained".
        return_position_ids: also return ``position_ids``.

    Calling the collator on a list of ``B`` samples returns a dict of CPU tensors:

    - ``input_ids``: ``[B, L]`` long, ``pad_token_id`` in padding;
    - ``labels``: ``[B, L]`` long, ``ignore_index`` in padding and at each sample's
      first token;
    - ``attention_mask``: ``[B, L]`` long, 1 on real tokens, 0 on padding;
    - ``position_ids``: ``[B, L]`` long, ``0..n-1`` on the real tokens, ``0..k-1``
      on the padding run (if ``return_position_ids``);
    - every extra per-token key: ``[B, L]``, 0 in padding.
    """

    _repr_options = ("pad_token_id", "padding_side", "pad_to_multiple_of", "max_length", "truncation", "ignore_index")

    def __init__(
        self,
        pad_token_id: int,
        *,
        padding_side: PaddingSide = "right",
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        truncation: bool = False,
        ignore_index: int = -100,
        return_position_ids: bool = True,
    ) -> None:
        self._set_shared_options(pad_token_id, max_length, pad_to_multiple_of, truncation, ignore_index)
        check_choice("padding_side", padding_side, ("right", "left"))
        self.padding_side = padding_side
        if self.truncation and self.max_length is None:
            raise ValueError("truncation=True needs max_length: set the length to truncate to")
        self.return_position_ids = _check_bool("return_position_ids", return_position_ids)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad ``samples`` into ``[batch, seq_len]`` tensors (see the class docstring)."""
        batch = self._read_batch(samples)
        seq_len = _round_up(max(len(s) for s in batch), self.pad_to_multiple_of)
        out = _allocate(batch, (len(batch), seq_len), self.pad_token_id, self.ignore_index)
        for row, sample in enumerate(batch):
            start = 0 if self.padding_side == "right" else seq_len - len(sample)
            _write_sample(out, row, start, sample, self.ignore_index)
            # The padding run, on the other side of the sample, counts 0..k-1 like a sample.
            n_pad = seq_len - len(sample)
            pad_start = len(sample) if self.padding_side == "right" else 0
            out["position_ids"][row, pad_start : pad_start + n_pad] = torch.arange(n_pad)
        if not self.return_position_ids:
            del out["position_ids"]
        return out


class PackingCollator(_Collator):
    """Pack samples into rows of at most ``max_length`` tokens each.

    Attention must not cross samples inside a row. Give the model ``position_ids``
    (restarting at 0 for every sample) or ``cu_seqlens``/``max_seqlen`` (flash
    attention varlen), and see the caveat on ``attention_mask`` below.

    Args:
        max_length: most real tokens in one row.
        pad_token_id: id written into row padding.
        strategy: ``"next_fit"`` (default) keeps the sample order: a new row starts
            when the next sample does not fit in the current one.
            ``"first_fit_decreasing"`` places samples from the longest down, each in
            the first row with room: fewer rows (less padding), order not kept.
        truncation: a sample longer than ``max_length`` raises a ``ValueError``
            unless this is ``True``; then only its first ``max_length`` tokens are
            kept (and it fills a row of its own).
        pad_to_multiple_of: round the row length up to a multiple of this; it must
            divide ``max_length``. ``pad_to_multiple_of=max_length`` gives the static
            shape ``[R, max_length]`` (``torch.compile``, CUDA graphs).
        ignore_index: label of row padding and of each sample's first token.
        return_attention_mask: also return ``attention_mask`` ``[R, L]`` (1 on real
            tokens, 0 on padding). It is a *padding* mask only: it does not separate
            the samples of a row. transformers (5.x) detects packed rows from
            ``position_ids`` only when no ``attention_mask`` is passed (and no KV
            cache is used: call the model with ``use_cache=False``); give it this
            mask and attention silently crosses sample boundaries.
        return_seq_idx: also return ``seq_idx`` ``[R, L]`` int32: the index of each
            token's segment in ``cu_seqlens`` (padding runs are segments too), as
            Mamba-style kernels take it.

    Calling the collator on a list of samples returns a dict:

    - ``input_ids``: ``[R, L]`` long, ``pad_token_id`` in row padding;
    - ``labels``: ``[R, L]`` long, ``ignore_index`` in row padding and at the first
      token of every sample;
    - ``position_ids``: ``[R, L]`` long, ``0..n-1`` for every sample, ``0..k-1`` for
      a row's padding run;
    - ``cu_seqlens``: ``[S + 1]`` int32, the segment boundaries over the flattened
      ``[R * L]`` tokens, starting at 0 and ending at ``R * L``. Segments are the
      samples in row order and, where a row is padded, its padding run as one
      segment of its own, so that every flattened token belongs to one segment;
    - ``max_seqlen``: ``int``, the longest segment (padding runs included, as
      flash attention needs a bound on every segment);
    - ``attention_mask`` / ``seq_idx`` when asked for;
    - every extra per-token key: ``[R, L]``, 0 in row padding.

    Example: samples of lengths 3, 3, 4, 1 with ``max_length=6`` (next fit) give
    two rows with ``position_ids`` ``[0, 1, 2, 0, 1, 2]`` and ``[0, 1, 2, 3, 0, 0]``
    (the last slot is padding), ``cu_seqlens = [0, 3, 6, 10, 11, 12]`` and
    ``max_seqlen = 4``.
    """

    max_length: int  # never None here: the row capacity
    _repr_options = ("max_length", "pad_token_id", "strategy", "truncation", "pad_to_multiple_of", "ignore_index")

    def __init__(
        self,
        max_length: int,
        pad_token_id: int,
        *,
        strategy: PackingStrategy = "next_fit",
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        ignore_index: int = -100,
        return_attention_mask: bool = False,
        return_seq_idx: bool = False,
    ) -> None:
        # Required here (it is the row capacity); optional for padding.
        self.max_length = _check_positive("max_length", max_length)
        self._set_shared_options(pad_token_id, self.max_length, pad_to_multiple_of, truncation, ignore_index)
        check_choice("strategy", strategy, ("next_fit", "first_fit_decreasing"))
        self.strategy = strategy
        self.return_attention_mask = _check_bool("return_attention_mask", return_attention_mask)
        self.return_seq_idx = _check_bool("return_seq_idx", return_seq_idx)

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Which samples go into which row, in order: ``rows[r]`` lists sample indices.

        Args:
            lengths: the length of every sample, each in ``[1, max_length]``.
        """
        for i, n in enumerate(lengths):
            check_int(f"lengths[{i}]", n)
            if not 1 <= n <= self.max_length:
                raise ValueError(f"lengths[{i}] = {n} is outside [1, max_length={self.max_length}]")
        if self.strategy == "next_fit":
            return _next_fit(lengths, self.max_length)
        return _first_fit_decreasing(lengths, self.max_length)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor | int]:
        """Pack ``samples`` into ``[rows, row_len]`` tensors (see the class docstring)."""
        batch = self._read_batch(samples)
        rows = self.plan([len(s) for s in batch])
        row_len = _round_up(max(sum(len(batch[i]) for i in row) for row in rows), self.pad_to_multiple_of)
        out: dict[str, Any] = _allocate(batch, (len(rows), row_len), self.pad_token_id, self.ignore_index)

        segments: list[int] = []  # segment lengths over the flattened [R * L] tokens
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                _write_sample(out, r, start, batch[i], self.ignore_index)
                segments.append(len(batch[i]))
                start += len(batch[i])
            if start < row_len:
                # Row padding is one more segment, positions restarting at 0 like a sample.
                out["position_ids"][r, start:] = torch.arange(row_len - start)
                segments.append(row_len - start)

        lengths = torch.tensor(segments, dtype=torch.int32)
        out["cu_seqlens"] = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        out["max_seqlen"] = max(segments)
        if self.return_seq_idx:
            seq_idx = torch.repeat_interleave(torch.arange(len(segments), dtype=torch.int32), lengths)
            out["seq_idx"] = seq_idx.view(len(rows), row_len)
        if not self.return_attention_mask:
            del out["attention_mask"]
        return out


# --------------------------------------------------------------------------------------
# Packing plans
# --------------------------------------------------------------------------------------


def _next_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Keep the order; open a new row whenever the next sample does not fit."""
    rows: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        if n > room:
            rows.append([])
            room = capacity
        rows[-1].append(i)
        room -= n
    return rows


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Longest first, each into the first row with room (ties keep their order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable
    rows: list[list[int]] = []
    rooms: list[int] = []
    for i in order:
        n = lengths[i]
        r = next((r for r, room in enumerate(rooms) if room >= n), None)
        if r is None:
            rows.append([])
            rooms.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        rooms[r] -= n
    return rows


# --------------------------------------------------------------------------------------
# Writing samples into the batch
# --------------------------------------------------------------------------------------


def _allocate(
    batch: list[_Sample], shape: tuple[int, int], pad_token_id: int, ignore_index: int
) -> dict[str, torch.Tensor]:
    """Padding-filled outputs of ``shape``: ids ``pad_token_id``, labels ignored, extras 0."""
    out = {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "labels": torch.full(shape, ignore_index, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
    }
    for key in batch[0].extras:
        # One dtype for the key: e.g. int weights in one sample, float in another -> float.
        dtype = batch[0].extras[key].dtype
        for sample in batch[1:]:
            dtype = torch.promote_types(dtype, sample.extras[key].dtype)
        out[key] = torch.zeros(shape, dtype=dtype)
    return out


def _write_sample(out: dict[str, torch.Tensor], row: int, start: int, sample: _Sample, ignore_index: int) -> None:
    """Copy ``sample`` into ``out[..][row, start:start+n]`` and mask its first label."""
    end = start + len(sample)
    out["input_ids"][row, start:end] = sample.input_ids
    out["labels"][row, start:end] = sample.labels
    # The first token's label would be the target of whatever precedes the sample
    # (padding or another sample). Within the sample it is never a target, so
    # masking it leaves the sample's own count unchanged (see the module docstring).
    out["labels"][row, start] = ignore_index
    out["attention_mask"][row, start:end] = 1
    out["position_ids"][row, start:end] = torch.arange(len(sample))
    for key, value in sample.extras.items():
        out[key][row, start:end] = value


# --------------------------------------------------------------------------------------
# Validating and normalizing samples
# --------------------------------------------------------------------------------------


def _normalize_batch(samples: object, *, ignore_index: int, max_length: int | None, truncation: bool) -> list[_Sample]:
    """Check a list of sample mappings and turn each into a ``_Sample`` of tensors."""
    if isinstance(samples, Mapping) or not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)):
        raise TypeError(f"a collator takes a list of samples (mappings with 'input_ids'), got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError("cannot collate an empty batch: the list of samples is empty")
    keys = None
    batch: list[_Sample] = []
    emptied: list[int] = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise TypeError(f"sample {i} must be a mapping with 'input_ids', got {type(sample).__name__}")
        # labels may be missing from some samples (train on every token) and the
        # tokenizer's all-ones attention_mask is dropped; any other key must be in
        # every sample, since filling a missing key with padding would silently
        # change the loss (a missing token_weights would become weight 0).
        sample_keys = set(sample) - _OPTIONAL_KEYS
        if keys is None:
            keys = sample_keys
        elif sample_keys != keys:
            raise ValueError(
                f"sample {i} has keys {sorted(sample_keys)} but sample 0 has {sorted(keys)} "
                f"(not counting {sorted(_OPTIONAL_KEYS)}); every sample in a batch must carry the same keys"
            )
        normalized = _normalize_sample(sample, f"sample {i}", ignore_index)
        fitted = _fit_length(normalized, f"sample {i}", max_length, truncation)
        if fitted is not normalized and _has_target(normalized, ignore_index) and not _has_target(fitted, ignore_index):
            emptied.append(i)
        batch.append(fitted)
    if emptied:
        # Never train a sample as zero without saying so (TRL #3927).
        warnings.warn(
            f"truncation to max_length={max_length} left {len(emptied)} of {len(samples)} samples of this batch "
            f"with no target (samples {emptied[:10]}); they add nothing to the loss. Filter long samples out, "
            "or encode with lmloss.labels.encode_dataset(max_length=...), which reports or drops them",
            stacklevel=3,
        )
    return batch


def _has_target(sample: _Sample, ignore_index: int) -> bool:
    """Whether some label is a target (position 0 never is, with the shift)."""
    return bool((sample.labels[1:] != ignore_index).any())


def _normalize_sample(sample: Mapping[str, Any], where: str, ignore_index: int) -> _Sample:
    if "input_ids" not in sample:
        raise ValueError(f"{where} has no 'input_ids' (keys: {sorted(sample)})")
    input_ids = _as_int_tensor(sample["input_ids"], f"{where}: input_ids")
    if input_ids.numel() == 0:
        raise ValueError(f"{where} is empty (input_ids has no tokens); drop empty samples before collating")
    if bool((input_ids < 0).any()):
        lowest = int(input_ids.min())
        raise ValueError(f"{where}: input_ids holds a negative id ({lowest}); token ids are >= 0")
    if "labels" in sample:
        labels = _checked_labels(sample["labels"], where, ignore_index)
    else:
        labels = input_ids.clone()  # no labels: train on every token
    _check_same_length(labels, input_ids, f"{where}: labels")
    extras = {}
    for key, value in sample.items():
        if key in ("input_ids", "labels"):
            continue
        if key in _BUILT_KEYS:
            raise ValueError(f"{where} carries {key!r}, which the collator builds itself; remove it from the samples")
        tensor = _as_number_tensor(value, f"{where}: {key}")
        _check_same_length(tensor, input_ids, f"{where}: {key}")
        if key == "attention_mask":
            # Tokenizers emit an all-ones mask; anything else means the sample is already padded.
            if not bool((tensor == 1).all()):
                raise ValueError(f"{where}: attention_mask has zeros; pass unpadded samples (the collator pads)")
            continue
        extras[key] = tensor
    return _Sample(input_ids, labels, extras)


def _checked_labels(value: object, where: str, ignore_index: int) -> torch.Tensor:
    labels = _as_int_tensor(value, f"{where}: labels")
    bad = (labels < 0) & (labels != ignore_index)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}: labels[{position}] = {int(labels[position])} is negative but not "
            f"ignore_index={ignore_index}; use the collator's ignore_index to mark untrained tokens"
        )
    return labels


def _fit_length(sample: _Sample, where: str, max_length: int | None, truncation: bool) -> _Sample:
    if max_length is None or len(sample) <= max_length:
        return sample
    if not truncation:
        raise ValueError(
            f"{where} has {len(sample)} tokens, more than max_length={max_length}; filter long samples "
            "out or pass truncation=True to keep their first max_length tokens"
        )
    extras = {key: value[:max_length] for key, value in sample.extras.items()}
    return _Sample(sample.input_ids[:max_length], sample.labels[:max_length], extras)


def _as_int_tensor(value: object, name: str) -> torch.Tensor:
    """A 1-D ``torch.long`` tensor from a list/tuple of ints, an int array or tensor."""
    if isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(f"{name}[{j}] = {item!r} is not an int; token ids and labels are integers")
        tensor = torch.tensor(value, dtype=torch.long)
    else:
        tensor = _as_tensor(value, name)
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"{name} must hold integers, got dtype {tensor.dtype}")
    return _check_1d(tensor, name).to(torch.long)


def _as_number_tensor(value: object, name: str) -> torch.Tensor:
    """A 1-D real tensor (bool, int or float) for an extra per-token key."""
    if isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            if not isinstance(item, (numbers.Real, bool)):
                raise TypeError(f"{name}[{j}] = {item!r} is not a number; extra keys must be per-token numbers")
        tensor = torch.tensor(value) if value else torch.zeros(0)
    else:
        tensor = _as_tensor(value, name)
        if tensor.is_complex():
            raise TypeError(f"{name} must be real, got dtype {tensor.dtype}")
    return _check_1d(tensor, name)


def _as_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):  # numpy arrays
        return torch.as_tensor(value)
    raise TypeError(
        f"{name} must be a list of numbers or a 1-D tensor, got {type(value).__name__}; "
        "collators handle per-token keys only, so drop other keys before collating"
    )


def _check_1d(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per token), got shape {tuple(tensor.shape)}")
    return tensor


def _check_same_length(tensor: torch.Tensor, input_ids: torch.Tensor, name: str) -> None:
    if tensor.numel() != input_ids.numel():
        raise ValueError(
            f"{name} has {tensor.numel()} entries but input_ids has {input_ids.numel()}; "
            "per-token keys must be aligned with input_ids (unshifted)"
        )


# --------------------------------------------------------------------------------------
# Option checks
# --------------------------------------------------------------------------------------


def _check_token_id(name: str, value: object) -> int:
    token_id = check_int(name, value)
    if token_id < 0:
        raise ValueError(f"{name} must be a token id >= 0, got {token_id}")
    return token_id


def _check_positive(name: str, value: object) -> int:
    number = check_int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {number}")
    return number


def _check_optional_positive(name: str, value: object) -> int | None:
    return None if value is None else _check_positive(name, value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_multiple(max_length: int | None, multiple: int | None) -> None:
    # Otherwise rounding up could produce rows longer than max_length.
    if max_length is not None and multiple is not None and max_length % multiple:
        raise ValueError(
            f"max_length={max_length} is not a multiple of pad_to_multiple_of={multiple}; "
            "choose values where pad_to_multiple_of divides max_length"
        )


def _round_up(n: int, multiple: int | None) -> int:
    return n if multiple is None else -(-n // multiple) * multiple
