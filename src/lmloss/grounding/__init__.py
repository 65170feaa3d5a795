"""Boxes as tokens: grounding answers written as text, and box losses on them.

Vision-language models write a bounding box as text and learn it with plain
next-token cross-entropy. Qwen2-VL writes ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
on a 0-1000 grid, so predicting 503 when the answer is 502 costs as much as
predicting 999: cross-entropy knows nothing of distance. This package gives the box
text a geometry, in four parts that follow the pipeline (one module each):

1. *Text* (:mod:`.formats`, :mod:`.coords`): :func:`parse_grounding`, :func:`parse_boxes`, :func:`format_boxes` and
   :func:`format_grounding` read and write the common conventions ("qwen2-vl",
   "qwen2.5-vl" JSON in pixels, "bins" location tokens); :func:`convert_boxes` moves
   boxes between normalized ``[0, 1]``, grid (0-1000), pixel and bin coordinates.
   The parsers run in linear time; malformed box text is never dropped silently:
   it raises :class:`BoxFormatError` (a ``ValueError``) that quotes it with its
   character offset, or is listed in ``GroundingParse.issues``.
2. *Geometry* (:mod:`.geometry`): :func:`box_iou`, :func:`giou`, :func:`l1_box_loss` and
   :func:`giou_loss`, elementwise over ``[..., 4]`` xyxy boxes, finite (and with
   finite gradients) for degenerate boxes.
3. *Positions* (:mod:`.positions`): :func:`find_box_targets` finds the positions of a ``[B, T]`` batch
   whose next-token targets are box coordinates (digit tokens inside
   ``<|box_start|>...<|box_end|>``, digit tokens of the pixel integers in a
   Qwen2.5-VL ``"bbox_2d": [...]`` list, or bin tokens), with the same shift as
   :func:`lmloss.causal_lm_loss`.
4. *Losses* (:mod:`.losses`): the expected value of each coordinate under the model's distribution
   over the digit or bin tokens (:func:`expected_bin_coordinate`,
   :func:`expected_number`) makes a box that L1 and GIoU can score. :func:`box_loss`
   computes logits only at the coordinate positions and only for the digit or bin
   tokens (a gather and a ``[K, D] @ [D, n_values]`` product), and
   :func:`grounding_loss` adds the terms to :func:`lmloss.linear_cross_entropy`.

All box losses work in normalized ``[0, 1]`` coordinates (Qwen2.5-VL pixels are
divided by the image size given to :func:`find_box_targets`), in float32 (float64
stays float64), whatever the input dtype.
"""

from __future__ import annotations

# Public before the package became one, though never in __all__: still importable from here.
from lmloss.grounding._common import (  # noqa: F401  (re-exported: see the comment above)
    BOX_END,
    BOX_START,
    DEFAULT_BIN_PATTERN,
    FORMATS,
    QWEN2_VL_GRID,
    REF_END,
    REF_START,
    SPACES,
    Box,
    BoxFormatError,
    BoxIssue,
    Format,
    GroundedPhrase,
    GroundingParse,
    Reduction,
    Space,
)
from lmloss.grounding.coords import convert_boxes
from lmloss.grounding.formats import (
    format_boxes,
    format_grounding,
    parse_boxes,
    parse_grounding,
)
from lmloss.grounding.geometry import DEFAULT_EPS as DEFAULT_EPS
from lmloss.grounding.geometry import box_iou, giou, giou_loss, l1_box_loss
from lmloss.grounding.losses import (
    box_loss,
    box_loss_from_logits,
    expected_bin_coordinate,
    expected_boxes,
    expected_number,
    grounding_loss,
)
from lmloss.grounding.positions import BoxTargets, BoxTokenIds, find_box_targets

__all__ = [
    "Box",
    "BoxFormatError",
    "BoxIssue",
    "BoxTargets",
    "BoxTokenIds",
    "FORMATS",
    "GroundedPhrase",
    "GroundingParse",
    "box_iou",
    "box_loss",
    "box_loss_from_logits",
    "convert_boxes",
    "expected_bin_coordinate",
    "expected_boxes",
    "expected_number",
    "find_box_targets",
    "format_boxes",
    "format_grounding",
    "giou",
    "giou_loss",
    "grounding_loss",
    "l1_box_loss",
    "parse_boxes",
    "parse_grounding",
]
