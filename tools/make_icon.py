"""Draw docs/icon.png, the pack's icon for the Comfy Registry (pyproject.toml's [tool.comfy] Icon).

    .venv/bin/python tools/make_icon.py

Three experts as three soft discs whose colours multiply where they overlap: the product of experts,
brightest where all three agree. Deterministic, so a re-run writes the same file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZE, SCALE = 256, 4  # drawn at 4x and downsampled, for smooth edges


def icon(size: int = SIZE) -> Image.Image:
    n = size * SCALE
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    # Dark rounded-square background.
    bg = np.array([0.10, 0.11, 0.15], np.float32)
    img = np.ones((n, n, 3), np.float32) * bg
    r, c = 0.22, 0.5
    centres = [(c, c - 0.13), (c - 0.115, c + 0.07), (c + 0.115, c + 0.07)]
    colours = [(0.95, 0.35, 0.30), (0.30, 0.80, 0.45), (0.35, 0.55, 0.98)]
    inside = [((x - cx) ** 2 + (y - cy) ** 2) < r * r for cy, cx in centres]
    count = sum(m.astype(np.int32) for m in inside)
    # Each disc tints the background; the overlaps of two or three get lighter, the centre white-gold.
    for m, col in zip(inside, colours):
        img[m] = img[m] * 0.35 + np.array(col, np.float32) * 0.65
    img[count == 2] = img[count == 2] * 0.6 + 0.4
    img[count == 3] = np.array([1.0, 0.93, 0.70], np.float32)
    # Rounded-square alpha.
    rad, half = 0.18, 0.5
    dx = np.maximum(np.abs(x - half) - (half - rad), 0)
    dy = np.maximum(np.abs(y - half) - (half - rad), 0)
    alpha = (dx * dx + dy * dy < rad * rad).astype(np.float32)
    rgba = np.concatenate([img, alpha[..., None]], axis=-1)
    out = Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA")
    return out.resize((size, size), Image.LANCZOS)


def main() -> None:
    path = ROOT / "docs" / "icon.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    icon().save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
