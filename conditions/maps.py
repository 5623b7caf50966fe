"""Segmentation and spatial maps: from MASK or IMAGE to B x 1 x H x W in [0, 1], at the experts' size."""
from __future__ import annotations

import kornia
import torch

MAP_SOURCES = ("mask", "image luminance", "image red", "image green", "image blue", "image colour label")


def parse_hex_colour(text: str) -> torch.Tensor:
    """'#RRGGBB' (or 'RRGGBB', or 'r,g,b' in 0..255) as a 3-vector in [0, 1]."""
    t = text.strip()
    if "," in t:
        parts = [float(p) for p in t.split(",")]
        if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
            raise ValueError(f"colour {text!r} must be three values in 0..255, like '255,0,0'")
        return torch.tensor(parts) / 255
    t = t.lstrip("#")
    if len(t) != 6:
        raise ValueError(f"colour {text!r} must look like '#ff0000'")
    try:
        return torch.tensor([int(t[i:i + 2], 16) for i in (0, 2, 4)], dtype=torch.float32) / 255
    except ValueError:
        raise ValueError(f"colour {text!r} must look like '#ff0000'") from None


def map_from_image(image: torch.Tensor, source: str, label_colour: str = "#ffffff", tolerance: float = 0.1) -> torch.Tensor:
    """A ComfyUI IMAGE (B x H x W x C in [0, 1]) to a B x 1 x H x W map.

    ``image colour label`` selects the pixels of a colour-coded parsing map within ``tolerance``
    (max channel difference, in [0, 1]) of ``label_colour``.
    """
    rgb = image[..., :3].movedim(-1, 1).float()
    if source == "image luminance":
        return kornia.color.rgb_to_grayscale(rgb)
    channel = {"image red": 0, "image green": 1, "image blue": 2}.get(source)
    if channel is not None:
        return rgb[:, channel:channel + 1]
    if source == "image colour label":
        target = parse_hex_colour(label_colour).view(1, 3, 1, 1).to(rgb)
        return ((rgb - target).abs().amax(dim=1, keepdim=True) <= tolerance).float()
    raise ValueError(f"unknown map source {source!r}; expected one of {MAP_SOURCES}")


def map_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK (B x H x W or H x W) to B x 1 x H x W."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"a MASK must be B x H x W, got shape {tuple(mask.shape)}")
    return mask[:, None].float()


def fit_to(map_: torch.Tensor, size: int, what: str = "map") -> tuple[torch.Tensor, str | None]:
    """Resize a B x C x h x w map to size x size (antialiased bilinear), with a warning when it had to."""
    h, w = map_.shape[-2:]
    if (h, w) == (size, size):
        return map_, None
    out = kornia.geometry.transform.resize(map_, (size, size), interpolation="bilinear", antialias=True)
    note = f"{what} was {w}x{h}; resized to the experts' {size}x{size}"
    if h != w:
        note += " (the aspect ratio changed)"
    return out.clamp(0, 1), note


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Soften a B x 1 x H x W mask's edges with a Gaussian of ``radius`` pixels (kornia)."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return kornia.filters.gaussian_blur2d(mask, (k, k), (radius / 2, radius / 2), border_type="replicate").clamp(0, 1)


def spatial_scale(mask: torch.Tensor | None, size: int, feather_px: int = 0, invert: bool = False,
                  outside: float = 0.0) -> tuple[torch.Tensor | None, str | None]:
    """Per-pixel multiplier of a binding's weight and reliability: 1 inside the mask, ``outside``
    outside, feathered in between. ``None`` (no mask) means the global rule."""
    if mask is None:
        return None, None
    m, note = fit_to(map_from_mask(mask), size, "mask")
    if invert:
        m = 1 - m
    m = feather(m, feather_px)
    return outside + (1 - outside) * m, note
