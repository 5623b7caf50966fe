"""Tier (b): what the newest upstream ComfyUI does differently from 0.3.75, simulated in process.

docs/comfyui_api.md lists each difference; these tests replay upstream's calls on 0.3.75 so that
the pack's overrides are known to accept them before anyone runs the newest ComfyUI.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import comfy.samplers

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import poe
from unite_and_conquer.samplers.comfy import sampling as comfy_sampling
from unite_and_conquer.samplers.comfy.correctors import with_corrector
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.intervals import IntervalKSampler
from unite_and_conquer.samplers.comfy.models import wrap_expert
from unite_and_conquer.samplers.correctors import CorrectorConfig
from support.analytic import gaussian, gaussian_expert

RES = 4


def product_guider():
    lin = wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "gauss-linear", RES))
    cos = wrap_expert(gaussian_expert(alphas_cumprod_for("cosine"), "gauss-cosine", RES))
    null = gaussian(0.0, 1.0)
    return ProductGuider([poe.Binding(lin, gaussian(1.0, 0.5), 1.0, 0.5, (null,)),
                         poe.Binding(cos, gaussian(-0.5, 0.8), 1.0, 0.5, (null,))])


def upstream_estimate_memory(patcher, noise_shape):
    """Upstream's sampler_helpers.estimate_memory, as far as the product is concerned: it calls the
    model's memory_required through comfy.model_patcher.call_model_memory_required with the
    keywords cond_shapes and memory_efficient_attention."""
    memory_efficient_attention = patcher.model_options.get("optimized_attention_memory_efficient")
    full = patcher.model.memory_required([noise_shape[0] * 2] + list(noise_shape[1:]), cond_shapes={},
                                         memory_efficient_attention=memory_efficient_attention)
    minimum = patcher.model.memory_required([noise_shape[0]] + list(noise_shape[1:]), cond_shapes={},
                                            memory_efficient_attention=memory_efficient_attention)
    return full, minimum


def test_memory_required_takes_upstreams_keywords_and_gives_the_same_estimate():
    guider = product_guider()
    shape = (2, 3, RES, RES)
    # 0.3.75's call: memory_required(shape, cond_shapes=...); upstream adds memory_efficient_attention.
    old = guider.model_patcher.model.memory_required([4, 3, RES, RES], cond_shapes={})
    full, minimum = upstream_estimate_memory(guider.model_patcher, shape)
    assert full == old == 2 * minimum
    # Two experts at 1 kB per pixel per image: 4 images x 16 pixels x 1024 bytes x 2 experts.
    assert full == 4 * RES * RES * 1024 * 2
    for model in [guider.model_patcher.model] + [h.model for h in guider.handles]:
        params = inspect.signature(model.memory_required).parameters
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), type(model).__name__
        assert model.memory_required([1, 3, RES, RES], cond_shapes={"c": [1]}, memory_efficient_attention=True,
                                     some_future_estimate=3) == model.memory_required([1, 3, RES, RES])
        # Another upstream branch passes the run's model_options instead.
        assert model.memory_required([1, 3, RES, RES], cond_shapes={}, model_options={"transformer_options": {}}) \
            == model.memory_required([1, 3, RES, RES])


class RecordingSampler(comfy.samplers.KSAMPLER):
    """Reads what upstream's KSAMPLER.sample reads from its model_wrap before the first step
    (model_wrap.model_patcher.model and model_wrap.cfg, for its log line), then samples as usual."""

    seen: list = []

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        RecordingSampler.seen.append((type(model_wrap.model_patcher.model).__name__, model_wrap.cfg))
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                              disable_pbar)


def test_the_guider_offers_what_upstreams_ksampler_reads():
    guider = product_guider()
    base = comfy.samplers.sampler_object("euler")
    sampler = RecordingSampler(base.sampler_function, base.extra_options, base.inpaint_options)
    RecordingSampler.seen.clear()
    sigmas = comfy_sampling.compute_sigmas(guider, "euler", "karras", 4, 1.0)
    out = comfy_sampling.sample(guider, torch.zeros(2, 3, RES, RES), 0, sampler, sigmas, preview=False)
    assert RecordingSampler.seen == [("ProductModel", 1.0)]
    ref = comfy_sampling.sample(guider, torch.zeros(2, 3, RES, RES), 0, "euler", sigmas, preview=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_interval_samplers_keep_the_ksampler_sample_signature():
    """IntervalKSampler re-implements KSAMPLER.sample up to the sampler call; upstream still calls
    sampler.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
    disable_pbar) positionally from CFGGuider.inner_sample."""
    upstream_order = ["model_wrap", "sigmas", "extra_args", "callback", "noise", "latent_image", "denoise_mask",
                      "disable_pbar"]
    for cls in (comfy.samplers.KSAMPLER, IntervalKSampler):
        assert list(inspect.signature(cls.sample).parameters)[1:] == upstream_order, cls


def test_the_product_patcher_carries_no_conds_and_no_multigpu_clones():
    """Upstream's CFGGuider.inner_set_conds calls model_patcher.is_dynamic() once per cond key, and
    outer_sample prepares multi-GPU clones of the patcher's "multigpu" additional models. The product
    sets no conds and no multigpu models, so neither path runs for it; the experts ride along as
    "poe_experts" additional models, which upstream loads as 0.3.75 does."""
    guider = product_guider()
    assert guider.original_conds == {}
    assert guider.model_patcher.get_additional_models_with_key("multigpu") == []
    assert [p.model for p in guider.model_patcher.get_additional_models_with_key("poe_experts")] == \
        [h.model for h in guider.handles]


def test_corrected_sampler_runs_through_the_guider_with_upstreams_reads():
    guider = product_guider()
    base = comfy.samplers.sampler_object("euler")
    sampler = with_corrector(base, CorrectorConfig(method="ula", steps=1, step_scale=0.1))
    sigmas = comfy_sampling.compute_sigmas(guider, "euler", "karras", 4, 1.0)
    out = comfy_sampling.sample(guider, torch.zeros(2, 3, RES, RES), 0, sampler, sigmas, preview=False)
    assert out.shape == (2, 3, RES, RES) and torch.isfinite(out).all()
    assert (type(guider.model_patcher.model).__name__, guider.cfg) == ("ProductModel", 1.0)


def test_nodes_use_a_numbered_comfy_api():
    import pathlib
    nodes_dir = pathlib.Path(poe.__file__).resolve().parents[1] / "nodes"
    imports = [line for f in sorted(nodes_dir.glob("*.py")) for line in f.read_text().splitlines()
               if line.startswith(("from comfy_api", "import comfy_api"))]
    assert imports and all(line.startswith("from comfy_api.v0_0_2 import ") for line in imports), imports


def test_the_running_comfyui_is_one_the_tiers_run_and_inside_the_declared_range():
    """The in-process tiers run on 0.3.75 and on 0.33.0 (tools/test.sh); both must be inside
    requires-comfyui (node-semver's and comfy-cli's readings are in tests/test_version_range.py)."""
    import pathlib
    import tomllib

    from packaging.specifiers import SpecifierSet
    import comfyui_version

    root = pathlib.Path(poe.__file__).resolve().parents[1]
    spec = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    assert spec == ">=0.3.75", spec
    assert comfyui_version.__version__ in ("0.3.75", "0.33.0")
    assert comfyui_version.__version__ in SpecifierSet(spec)
