"""lmloss.grounding.coords: boxes between normalized, grid, pixel and bin coordinates.

Truths: hand-computed conversions.
"""

from __future__ import annotations

import pytest
import torch

from lmloss.grounding import (
    convert_boxes,
)


def test_convert_boxes_between_grids():
    # 0-1000 grid -> pixels of a 640x480 image: x * 0.64, y * 0.48.
    assert convert_boxes([(250, 500, 1000, 1000)], src="grid", dst="pixels", image_size=(640, 480)) == [
        (160.0, 240.0, 640.0, 480.0)
    ]
    assert convert_boxes([(160, 240, 640, 480)], src="pixels", dst="normalized", image_size=(640, 480)) == [
        (0.25, 0.5, 1.0, 1.0)
    ]
    # normalized -> 10 bins: floor(x * 10), 1.0 clamps into the last bin; back: centres.
    assert convert_boxes([(0.0, 0.05, 0.55, 1.0)], src="normalized", dst="bins", num_bins=10) == [(0.0, 0.0, 5.0, 9.0)]
    assert convert_boxes([(0, 0, 5, 9)], src="bins", dst="normalized", num_bins=10) == [(0.05, 0.05, 0.55, 0.95)]
    tensor = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    out = convert_boxes(tensor, src="normalized", dst="grid")
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 4)
    torch.testing.assert_close(out, torch.tensor([[[100.0, 200.0, 300.0, 400.0]]]))
    with pytest.raises(ValueError, match=r"image_size=\(width, height\)"):
        convert_boxes([(0, 0, 1, 1)], src="pixels", dst="grid")
