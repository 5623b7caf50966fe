"""Tier (b): GLIDE's inpainting variant bound from ComfyUI's IMAGE and MASK (PoEBindInpaint)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unite_and_conquer import model_loaders
from unite_and_conquer.nodes import bindings, sampling
from unite_and_conquer.samplers.comfy.models import wrap_expert


@pytest.fixture(scope="module")
def inpaint_expert(fixtures_dir, tmp_path_factory):
    """GLIDE's base fixture with the 7-channel first conv of base_inpaint.pt."""
    path = fixtures_dir / "glide_base_small.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    sd = {k[len("model."):]: v for k, v in load_file(str(path)).items() if k.startswith("model.")}
    w = sd["input_blocks.0.0.weight"]
    g = torch.Generator().manual_seed(2)
    sd["input_blocks.0.0.weight"] = torch.cat([w, (torch.randn(32, 4, 3, 3, generator=g) * 0.1).to(w)], dim=1)
    out = tmp_path_factory.mktemp("inpaint") / "base_inpaint.safetensors"
    save_file(sd, str(out), metadata={**meta, "inpaint": "True"})
    return wrap_expert(model_loaders.load_expert(str(out)))


def test_inpaint_binding_uses_comfy_mask_convention_and_keeps_known_pixels(inpaint_expert):
    image = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 32:] = 1                       # ComfyUI: 1 = repaint
    out = bindings.PoEBindInpaint.execute(expert=inpaint_expert, image=image, mask=mask, weight=2.0,
                                          reliability=1.0, text="a red ball")
    b = out.args[0][0]
    keep = b.condition["inpaint_mask"]
    assert keep.shape == (1, 1, 64, 64) and keep[..., :32, :].eq(1).all() and keep[..., 32:, :].eq(0).all()
    torch.testing.assert_close(b.condition["inpaint_image"], image.movedim(-1, 1) * 2 - 1)
    null = b.null[0]
    assert torch.equal(null["inpaint_mask"], keep) and not null["mask"].any()
    assert out.ui["text"][0].startswith("GLIDE-inpaint-64 · inpaint 50% of the image + \"a red ball\" · w=2 · a=1")
    latent = {"samples": image.movedim(-1, 1) * 2 - 1, "noise_mask": mask[:, None]}
    samples = sampling.PoEKSampler.execute(experts=out.args[0], seed=0, steps=3, sampler_name="euler",
                                           scheduler="karras", denoise=1.0, width=0, height=0, batch_size=1,
                                           latent_image=latent).args[0]["samples"]
    assert torch.equal(samples[..., :32, :], latent["samples"][..., :32, :])
    assert torch.isfinite(samples).all()
