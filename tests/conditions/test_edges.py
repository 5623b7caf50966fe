"""Canny sketches for the face sketch expert: where the edges fall and the value convention."""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.conditions.edges import canny_edges


def _square(level: int, background: int = 0) -> torch.Tensor:
    """A 64 x 64 grey image (0-255 levels, given in [0, 1]) with a filled square at rows 20..43,
    columns 16..39."""
    image = torch.full((1, 3, 64, 64), background / 255)
    image[:, :, 20:44, 16:40] = level / 255
    return image


# What ``cv2.Canny(square, 100, 200, L2gradient=True)`` marks for :func:`_square` (checked with
# OpenCV 5.0), rows 19..43 and columns 15..39: the outline one pixel thick, with cut corners. Of
# two equal magnitudes across a step the upper/left pixel is kept, so the top and left sides lie
# just outside the square and the bottom and right sides just inside.
OUTLINE = [
    "..######################.",
    ".#......................#",
    *["#.......................#"] * 22,
    ".########################",
]


def _ring() -> torch.Tensor:
    ring = torch.zeros(64, 64, dtype=torch.bool)
    ring[19:44, 15:40] = torch.tensor([[ch == "#" for ch in row] for row in OUTLINE])
    return ring


def test_a_filled_square_gives_its_outline_and_nothing_else():
    sketch = canny_edges(_square(200))
    assert sketch.shape == (1, 3, 64, 64) and sketch.dtype == torch.float32
    assert torch.equal(sketch[:, 0], sketch[:, 1]) and torch.equal(sketch[:, 0], sketch[:, 2])
    # The convention the sketch expert was trained on: edges +1 (white), the rest -1 (black).
    assert set(sketch.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(sketch[0, 0] > 0, _ring())
    assert int(_ring().sum()) == 92


def test_thresholds_are_on_the_0_255_scale():
    """A step of s grey levels has an unnormalised Sobel magnitude of 4 s: 120 for s = 30 lies
    between the thresholds (weak, never connected to a strong pixel), 240 for s = 60 above both."""
    assert (canny_edges(_square(30)) == -1).all()
    assert torch.equal(canny_edges(_square(60))[0, 0] > 0, _ring())
    # A dark square on a bright background has the same outline.
    assert torch.equal(canny_edges(_square(0, background=200))[0, 0] > 0, _ring())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"uses the L2 gradient magnitude only"):
        canny_edges(_square(200), l2=False)
    with pytest.raises(ValueError, match=r"expected a B x 3 x H x W image in \[0, 1\], got \(1, 1, 64, 64\)"):
        canny_edges(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"0 < low <= high, got low=200, high=100"):
        canny_edges(_square(200), low=200, high=100)
