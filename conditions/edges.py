"""Edge maps for sketch experts: OpenCV-style Canny, computed with kornia."""
from __future__ import annotations

import kornia
import torch


def canny(image: torch.Tensor, low: float = 100.0, high: float = 200.0, l2_gradient: bool = True) -> torch.Tensor:
    """Binary Canny edges of a B x 3 x H x W image in [0, 1], as B x 1 x H x W in {0, 1}.

    ``low``/``high`` are hysteresis thresholds on the 0-255 scale with OpenCV's unnormalised 3x3
    Sobel, the convention of ``cv2.Canny(img, 100, 200, L2gradient=True)`` that the released sketch
    expert was trained with. kornia's Sobel is normalised by 8 and works on [0, 1] values, so the
    thresholds are divided by 255 * 8. OpenCV does not blur first; the smallest kornia blur is used.
    """
    gray = kornia.color.rgb_to_grayscale(image.float().clamp(0, 1))
    scale = 255.0 * 8.0
    if not l2_gradient:
        # OpenCV's L1 magnitude |gx| + |gy| is at most sqrt(2) times the L2 one.
        low, high = low / 2**0.5, high / 2**0.5
    _, edges = kornia.filters.canny(gray, low_threshold=low / scale, high_threshold=high / scale,
                                    kernel_size=(3, 3), sigma=(0.5, 0.5), hysteresis=True)
    return (edges > 0).float()


def edges_to_condition(edges: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W edges in [0, 1] to the 3-channel [-1, 1] image a sketch expert takes."""
    return (edges.expand(-1, 3, -1, -1) * 2 - 1).contiguous()
