"""Tier (b): the node classes themselves, with analytic experts: outputs, summaries and errors."""
from __future__ import annotations

import re

import pytest
import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.nodes import bindings as bindings_mod
from unite_and_conquer.nodes import sampling, utilities
from unite_and_conquer.samplers.poe import unwrap
from unite_and_conquer.samplers.comfy.models import wrap_expert
from support.analytic import gaussian, gaussian_expert


def analytic(schedule="linear", name="gauss", resolution=8, classes=None):
    e = gaussian_expert(alphas_cumprod_for(schedule), name, resolution)
    # A class-conditional analytic expert: class k is N(k - 1, 0.25); the null is N(0, 1).
    e.encoders["class"] = lambda k: gaussian(float(k) - 1.0, 0.25)
    e.encoders["segmentation"] = lambda m, slot=None: {"mu": (m * 2 - 1).expand(-1, 3, -1, -1), "var": torch.full((1, 3, 1, 1), 0.1)}
    e.class_names = classes or ["a", "b", "c"]
    return wrap_expert(e)


def picker(expert, k):
    """The picker's label of class k of an expert (its index when the expert has no class names)."""
    names = getattr(unwrap(expert), "class_names", None) or []
    return f"{k}: {names[k]}" if k < len(names) and names[k] != str(k) else str(k)


def bind_class(expert, k, weight=1.0, reliability=1.0, experts=None, **kw):
    out = bindings_mod.PoEBindClass.execute(expert=expert, weight=weight, reliability=reliability, null="trained",
                                            null_k=4, class_index=-1, experts=experts, **{"class": picker(expert, k)}, **kw)
    return out.args[0], out.ui["text"][0]


def ksample(experts, seed=0, steps=12, batch=4, sampler="dpmpp_2m", scheduler="simple", width=0, height=0, latent=None):
    out = sampling.PoEKSampler.execute(experts=experts, seed=seed, steps=steps, sampler_name=sampler,
                                       scheduler=scheduler, denoise=1.0, width=width, height=height,
                                       batch_size=batch, latent_image=latent)
    return out.args


def test_class_binding_summary_and_chain():
    e = analytic(name="Analytic-8")
    chain1, text = bind_class(e, 2, weight=2.0, reliability=0.5)
    assert text == "Analytic-8 · class 2: c · w=2 · a=0.5"
    chain2, _ = bind_class(e, 1, experts=chain1)
    assert len(chain1) == 1 and len(chain2) == 2 and chain2[0] is chain1[0]


def test_ksampler_outputs_latent_image_and_rule():
    e = analytic()
    chain, _ = bind_class(e, 2)
    latent, image, rule = ksample(chain, batch=3)
    assert latent["samples"].shape == (3, 3, 8, 8)
    assert image.shape == (3, 8, 8, 3) and image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(image, ((latent["samples"] + 1) / 2).clamp(0, 1).movedim(1, -1))
    assert rule.splitlines()[0].startswith("product of 1 binding(s) over 1 expert(s): eps = sum_i w_i")
    # class 2 is N(1, 0.25)
    assert latent["samples"].mean().item() == pytest.approx(1.0, abs=0.1)


def test_same_seed_same_image_and_no_state_leak_between_graphs():
    e1, e2 = analytic("linear", "A"), analytic("cosine", "B")
    graph1, _ = bind_class(e1, 0)
    graph2, _ = bind_class(e2, 2, experts=bind_class(e1, 1)[0])
    a1 = ksample(graph1, seed=5)[0]["samples"]
    ksample(graph2, seed=5)
    a2 = ksample(graph1, seed=5)[0]["samples"]
    assert torch.equal(a1, a2)


@pytest.mark.parametrize("case, message", [
    ("empty", "PoEKSampler: input 'experts' is empty: connect a PoEBind* node"),
    ("no_null", "PoEKSampler: input 'experts': the weights sum to 2, not 1, so the rule needs a pooled null, but "
                "every reliability is 0: give at least one binding with a null a reliability > 0"),
    ("size", "PoEKSampler: input 'width': binding 0 (gauss · class 1: b) makes 8 x 8 images, and the canvas is 8 x 64: "
             "an expert smaller than the canvas runs on its k x k pooled image, so the canvas must be the same integer "
             "multiple of its size on both sides; sample at 8 x 8, the largest expert's size"),
])
def test_sampler_errors_name_the_node_input_and_fix(case, message):
    e = analytic()
    chain = {"empty": [], "no_null": bind_class(e, 1, weight=2.0, reliability=0.0)[0],
             "size": bind_class(e, 1)[0]}[case]
    with pytest.raises(ValueError) as err:
        ksample(chain, width=64 if case == "size" else 0)
    assert str(err.value) == message


def test_mixed_resolutions_are_refused_when_chaining():
    small, big = analytic(name="Small", resolution=8), analytic(name="Big", resolution=12)
    chain, _ = bind_class(small, 1)
    with pytest.raises(ValueError, match=r"^PoEBindClass: input 'expert': binding 1 \(Big · class 1: b\) makes 12px "
                                         r"images and binding 0 \(Small · class 1: b\) 8px: a smaller expert runs on "
                                         r"the pooled canvas, so each expert's size must divide the larger ones"):
        bind_class(big, 1, experts=chain)
    assert len(bind_class(analytic(name="Double", resolution=16), 1, experts=chain)[0]) == 2


def test_unknown_modality_and_class_errors():
    plain = wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "Plain", 8))
    with pytest.raises(ValueError, match=r"^PoEBindClass: input 'expert': Plain does not take a 'class' "
                                         r"condition; it accepts: gaussian$"):
        bind_class(plain, 1)


def test_nan_image_input_is_refused():
    e = analytic()
    img = torch.zeros(1, 8, 8, 3)
    img[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^PoEBindSegmentation: input 'map_image' contains NaN or Inf values"):
        bindings_mod.PoEBindSegmentation.execute(expert=e, source="image red", slot="auto", weight=1.0,
                                                 reliability=1.0, map_image=img)


def test_segmentation_map_of_another_size_is_resized_with_a_warning():
    e = analytic()
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1
    out = bindings_mod.PoEBindSegmentation.execute(expert=e, source="mask", slot="auto", weight=1.0,
                                                   reliability=1.0, map_mask=mask)
    assert "map was 32x32; resized to the experts' 8x8" in out.ui["text"][0]
    mu = out.args[0][0].condition["mu"]
    row = mu[0, 0, 0]
    assert mu.shape == (1, 3, 8, 8)
    assert row[:3].tolist() == [1.0] * 3 and row[5:].tolist() == [-1.0] * 3   # antialiased edge in between
    assert row[3].item() == pytest.approx(-row[4].item(), abs=1e-5)


def test_spatial_product_follows_each_expert_in_its_half():
    """Two experts masked to the left and right halves: each half's statistics follow its own expert."""
    left_e, right_e = analytic("linear", "L"), analytic("cosine", "R")
    left = torch.zeros(1, 8, 8)
    left[:, :, :4] = 1
    chain, _ = bind_class(left_e, 0, mask=left)                         # N(-1, 0.25) on the left
    chain, _ = bind_class(right_e, 2, experts=chain, mask=left, mask_invert=True)   # N(1, 0.25) on the right
    samples = ksample(chain, batch=4096 // 32 * 2, steps=30)[0]["samples"]
    l, r = samples[..., :4], samples[..., 4:]
    assert l.mean().item() == pytest.approx(-1.0, abs=0.03) and l.var().item() == pytest.approx(0.25, abs=0.03)
    assert r.mean().item() == pytest.approx(1.0, abs=0.03) and r.var().item() == pytest.approx(0.25, abs=0.03)


def test_all_ones_masks_equal_the_global_rule():
    e1, e2 = analytic("linear", "A"), analytic("cosine", "B")
    ones = torch.ones(1, 8, 8)
    glob, _ = bind_class(e2, 2, weight=2.0, experts=bind_class(e1, 0, reliability=0.3)[0])
    spat, _ = bind_class(e2, 2, weight=2.0, experts=bind_class(e1, 0, reliability=0.3, mask=ones)[0], mask=ones)
    a = ksample(glob, seed=3)[0]["samples"]
    b = ksample(spat, seed=3)[0]["samples"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_empty_set_samples_the_pooled_prior():
    e = analytic()
    chain, _ = bind_class(e, 2, weight=0.0, reliability=1.0)
    samples = ksample(chain, batch=64, steps=30)[0]["samples"]
    assert samples.mean().item() == pytest.approx(0.0, abs=0.03)
    assert samples.var().item() == pytest.approx(1.0, abs=0.05)


def test_reliability_sweep_renders_one_grid_row_per_value():
    e = analytic()
    chain, _ = bind_class(e, 2, weight=2.0, reliability=1.0)
    chain, _ = bind_class(e, 0, weight=0.0, reliability=1.0, experts=chain)
    variants = utilities.PoEReliabilitySweep.execute(experts=chain, index=-1, field="reliability",
                                                     values="0, 1").args[0]
    assert [v[-1].reliability for v in variants] == [0.0, 1.0]
    shares = utilities.PoEReliabilitySweep.execute(experts=chain, index=-1, field="reliability share",
                                                   values="0.25").args[0]
    assert [b.reliability for b in shares[0]] == [0.75, 0.25]
    images = [ksample(v, batch=2)[1] for v in variants]
    grid = utilities.PoEImageGrid.execute(images=images, columns=[0], padding=[2]).args[0]
    assert grid.shape == (1, 2 * 8 + 2, 2 * 8 + 2, 3)
    torch.testing.assert_close(grid[0, 10:18, 10:18], images[1][1])


def test_noise_mask_keeps_known_pixels_bit_exact():
    e = analytic()
    chain, _ = bind_class(e, 2)   # N(1, 0.25)
    known = torch.rand(64, 3, 8, 8) * 2 - 1
    mask = torch.zeros(64, 1, 8, 8)
    mask[:, :, 4:] = 1             # 1 = generate (ComfyUI's SetLatentNoiseMask convention)
    out = sampling.PoEKSampler.execute(experts=chain, seed=1, steps=20, sampler_name="euler", scheduler="karras",
                                       denoise=1.0, width=0, height=0, batch_size=1,
                                       latent_image={"samples": known, "noise_mask": mask}).args[0]
    samples = out["samples"]
    assert torch.equal(samples[:, :, :4], known[:, :, :4])
    assert samples[:, :, 4:].mean().item() == pytest.approx(1.0, abs=0.05)


def test_img2img_with_denoise_below_one_stays_near_the_input():
    e = analytic()
    chain, _ = bind_class(e, 2)
    start = torch.full((16, 3, 8, 8), -0.5)
    out = sampling.PoEKSampler.execute(experts=chain, seed=1, steps=20, sampler_name="euler", scheduler="karras",
                                       denoise=0.2, width=0, height=0, batch_size=1,
                                       latent_image={"samples": start}).args[0]["samples"]
    full = sampling.PoEKSampler.execute(experts=chain, seed=1, steps=20, sampler_name="euler", scheduler="karras",
                                        denoise=1.0, width=0, height=0, batch_size=1,
                                        latent_image={"samples": start}).args[0]["samples"]
    assert (out.mean() - (-0.5)).abs() < (full.mean() - (-0.5)).abs()
    assert full.mean().item() == pytest.approx(1.0, abs=0.1)


def test_corrector_option_runs_and_reports_its_cost_and_what_it_did():
    e1, e2 = analytic("linear", "A"), analytic("cosine", "B")
    chain, _ = bind_class(e2, 2, experts=bind_class(e1, 0)[0])
    config, = sampling.PoECorrector.execute(method="uhmc", steps=2, step_scale=0.5, sigma_min=0.05, sigma_max=1e5,
                                            leapfrog_steps=1, momentum_refresh=0.5, step_rule="sigma2").args
    calls = e1.expert.network
    before = calls.calls
    out = sampling.PoEKSampler.execute(experts=chain, seed=0, steps=6, sampler_name="euler", scheduler="karras",
                                       denoise=1.0, width=0, height=0, batch_size=2, corrector=config)
    rule = out.args[2]
    levels = rule.count("\n")  # the summary's own lines are checked below
    assert "\ncorrector: uhmc, 2 steps of 0.5 sigma^2 per level for sigma in [0.05, inf] " \
           "(+2 product evaluation(s) per level)\ncorrector did: corrected " in rule, rule
    done = int(rule.split("corrector did: corrected ")[1].split(" ")[0])
    assert rule.endswith(f"corrected {done} level(s), {2 * done} step(s); epsilon / sigma^2 mean 0.5 (min 0.5, max 0.5)")
    assert out.ui["text"] == (rule,) and levels >= 2
    assert calls.calls - before == 6 + 2 * done   # predictor steps plus corrector evaluations
    with pytest.raises(ValueError, match=r"^PoEKSampler: input 'sampler_name': dpm_adaptive chooses its own steps"):
        sampling.PoEKSampler.execute(experts=chain, seed=0, steps=6, sampler_name="dpm_adaptive", scheduler="karras",
                                     denoise=1.0, width=0, height=0, batch_size=2, corrector=config)


def test_corrector_defaults_are_the_librarys_and_report_adaptive_steps():
    """PoECorrector's defaults are CorrectorConfig()'s; with SNR steps the summary shows the steps taken,
    and MALA's shows its acceptance."""
    schema = sampling.PoECorrector.define_schema()
    defaults = {i.id: i.default for i in schema.inputs}
    d = sampling.correctors.CorrectorConfig()
    assert (defaults["method"], defaults["steps"], defaults["step_scale"], defaults["sigma_min"], defaults["step_rule"],
            defaults["snr"], defaults["leapfrog_steps"], defaults["momentum_refresh"]) == (
        d.method, d.steps, d.step_scale, d.sigma_window[0], d.step_rule, d.snr, d.leapfrog_steps, d.refresh)
    config, = sampling.PoECorrector.execute(**{k: v for k, v in defaults.items()}).args
    assert config == d
    e1, e2 = analytic("linear", "A"), analytic("cosine", "B")
    chain, _ = bind_class(e2, 2, experts=bind_class(e1, 0)[0])
    rule = sampling.PoEKSampler.execute(experts=chain, seed=0, steps=6, sampler_name="euler", scheduler="karras",
                                        denoise=1.0, width=0, height=0, batch_size=2, corrector=config).args[2]
    did = rule.split("corrector did: ")[1]
    mean, lo, hi = map(float, re.search(r"mean (\S+) \(min (\S+), max (\S+)\)$", did).groups())
    assert 0 < lo < mean < hi   # the steps follow the product, not one constant
    mala, = sampling.PoECorrector.execute(**{**defaults, "method": "mala"}).args
    rule = sampling.PoEKSampler.execute(experts=chain, seed=0, steps=6, sampler_name="euler", scheduler="karras",
                                        denoise=1.0, width=0, height=0, batch_size=2, corrector=mala).args[2]
    acceptance = float(rule.rsplit("; mean acceptance ", 1)[1])
    assert 0 < acceptance <= 1


def test_the_mcmc_workflow_ships_the_default_corrector():
    """tiny_mcmc's corrector node is titled as the default, so its widget values must be the node's defaults."""
    from support.comfy_harness import api_workflow
    node, = [n for n in api_workflow("tiny_mcmc.json").values() if n["class_type"] == "PoECorrector"]
    assert "(the default)" in node["_meta"]["title"]
    defaults = {i.id: i.default for i in sampling.PoECorrector.define_schema().inputs}
    assert node["inputs"] == defaults


def test_resampling_option_keeps_known_pixels_and_reports_itself():
    e = analytic()
    chain, _ = bind_class(e, 2)
    known = torch.rand(4, 3, 8, 8) * 2 - 1
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, 4:] = 1
    calls = e.expert.network
    before = calls.calls
    latent, _, rule = sampling.PoEKSampler.execute(
        experts=chain, seed=1, steps=6, sampler_name="euler", scheduler="karras", denoise=1.0, width=0, height=0,
        batch_size=1, latent_image={"samples": known, "noise_mask": mask}, resample_count=3, resample_jump=2).args
    assert torch.equal(latent["samples"][:, :, :4], known[:, :, :4])
    assert rule.endswith("resampling: blocks of 2 step(s), each run 3 times")
    assert calls.calls - before > 6


def test_negation_pushes_the_samples_away_from_the_negated_expert():
    """Composable Diffusion's NOT in the analytic case: class 1 is N(0, 0.25); NOT class 2 (N(1, 0.25))."""
    e = analytic()
    plain, _ = bind_class(e, 1, weight=1.0, reliability=1.0)
    negated, _ = bind_class(e, 2, weight=-0.5, reliability=0.0, experts=plain)
    base = ksample(plain, batch=64, steps=20)[0]["samples"]
    pushed = ksample(negated, batch=64, steps=20)[0]["samples"]
    assert base.mean().item() == pytest.approx(0.0, abs=0.05)
    assert pushed.mean().item() < base.mean().item() - 0.2
