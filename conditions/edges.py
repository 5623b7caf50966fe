"""Turning user images into the conditions the experts were trained on.

:func:`canny_edges` makes the face sketch expert's input. Unite and Conquer's sketches
(``utils/Get_sketches.ipynb``) are ``cv2.Canny(rgb_uint8, 100, 200, L2gradient=True)`` on the
256 px RGB image, saved as a grey image (edges 255 on 0) and read back as ``x / 127.5 - 1``. So
the sketch expert sees **edges at +1 and everything else at -1**, the same on its 3 channels.

Here kornia's Canny does the work, set up like OpenCV's: no Gaussian blur (``cv2.Canny`` has
none), the unnormalised 3 x 3 Sobel gradient with its L2 magnitude, thresholds on the 0-255
scale, OpenCV's tie rule in non-maximum suppression, and 8-connected hysteresis. One difference
is left: on a colour image OpenCV takes, per pixel, the gradient of the channel where it is
largest, while kornia takes the gradient of the grey image (``0.299 R + 0.587 G + 0.114 B``),
so an edge between two colours of equal brightness is found by OpenCV only. On grey images the
two are the same up to pixels whose gradient lies on a threshold or a 22.5 degree sector border.
"""
from __future__ import annotations

import torch
from einops import repeat


def canny_edges(image: torch.Tensor, low: float = 100.0, high: float = 200.0, l2: bool = True) -> torch.Tensor:
    """Canny edges of B x 3 x H x W images in [0, 1], as a B x 3 x H x W sketch in {-1, +1}.

    Args:
        image: RGB in [0, 1]; it is quantised to 8 bits first, as the reference's ``uint8`` input.
        low, high: hysteresis thresholds on the gradient magnitude of 0-255 images (OpenCV's
            ``threshold1`` / ``threshold2``): a pixel above ``high`` is an edge, one above ``low``
            is an edge when connected to one.
        l2: the L2 gradient magnitude (``L2gradient=True``, what the sketch expert was trained
            on); kornia has no L1 variant, so ``False`` is refused.
    """
    import kornia

    if not l2:
        raise ValueError("canny_edges: kornia's Canny uses the L2 gradient magnitude only (l2=True)")
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"canny_edges: expected a B x 3 x H x W image in [0, 1], got {shape}")
    if not 0 < low <= high:
        raise ValueError(f"canny_edges: thresholds must satisfy 0 < low <= high, got low={low}, high={high}")
    pixels = (image.detach().float().clamp(0, 1) * 255).round()
    _, edges = kornia.filters.canny(pixels, low_threshold=float(low), high_threshold=float(high), kernel_size=1)
    return repeat(edges * 2 - 1, "b 1 h w -> b c h w", c=3).to(image.dtype if image.is_floating_point() else torch.float32)
