"""Small random checkpoints in the published layouts, for graph tests that load real files."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from unite_and_conquer.model_loaders import adm


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random non-zero weights everywhere, zero-initialised output layers included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def small_adm(path: Path, resolution: int = 64, num_classes: int | None = 1000, schedule: str = "cosine",
              seed: int = 0) -> Path:
    """An ADM model at reduced width (new attention order, learned sigma), with attention only where
    the feature map is at most 32 x 32, so CPU tests stay fast at 256 px."""
    levels = 2 if resolution <= 64 else 4
    mult = (1, 2) if levels == 2 else (1, 1, 2, 2)
    ds = tuple(2 ** i for i in range(levels) if resolution // 2 ** i <= 32) or (2 ** (levels - 1),)
    config = adm.ADMConfig(resolution=resolution, in_channels=3, model_channels=32, out_channels=6,
                           num_res_blocks=1, channel_mult=mult, attention_ds=ds, num_classes=num_classes,
                           num_head_channels=16, attention_order="new")
    net = adm.ADMUNet(config)
    randomise(net, seed)
    meta = {"resolution": str(resolution), "attention_order": "new", "schedule": schedule, "num_head_channels": "16"}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def from_fixture(fixture: Path, path: Path) -> Path:
    """A parity fixture's weights (``model.*``) with its metadata, as a loadable checkpoint."""
    with safe_open(str(fixture), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(fixture))
    save_file({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, str(path), metadata=meta)
    return path
