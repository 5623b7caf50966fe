"""Tier (b): OR / AND groups through the pack's SDE sampler, and the composition nodes (PoEParticles,
PoEParticleSampler, PoESDESampler, PoEOrGroup, PoEAndGroup, PoEKSampler's particles): outputs,
summaries and errors that name the node, the input and the fix."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.samplers

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.nodes import composition, sampling
from unite_and_conquer.samplers import poe, superposition
from unite_and_conquer.samplers.comfy import sde
from unite_and_conquer.samplers.comfy.correctors import with_corrector
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.models import wrap_expert
from unite_and_conquer.samplers.comfy.sampling import compute_sigmas
from unite_and_conquer.samplers.correctors import CorrectorConfig
from unite_and_conquer.samplers.particles import ParticleConfig
from support.analytic import gaussian, gaussian_expert

A, B = (-1.0, 0.1), (1.0, 0.4)   # two Gaussians with different variances


def expert(resolution=2, name="gauss"):
    return wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), name, resolution))


def members(handle, weights=(1.0, 1.0)):
    return [poe.Binding(handle, gaussian(*A), weights[0], 0.0, label="A"),
            poe.Binding(handle, gaussian(*B), weights[1], 0.0, label="B")]


def run(bindings, sampler, n=1024, steps=100, seed=0, resolution=2):
    guider = ProductGuider(bindings)
    sigmas = compute_sigmas(guider, "euler", "karras", steps, 1.0)
    latent = torch.zeros(n, 3, resolution, resolution)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=seed)


def log_q(x, m, v):
    return (-(x.double() - m) ** 2 / (2 * v) - 0.5 * math.log(2 * math.pi * v)).flatten(1).sum(1)


@pytest.mark.parametrize("pi", [0.5, 0.8])
def test_or_splits_the_images_between_the_members_by_their_priors(pi):
    """OR of N(-1, 0.1) and N(1, 0.4) over 3 x 2 x 2: each image follows one member, in the proportion
    pi, with that member's own variance (BENCHMARKS.md has 4096 samples at 200 steps)."""
    grouped = superposition.make_group(members(expert()), [0, 1], "or", 1.0, [pi, 1 - pi])
    chosen = sde.SDEKSampler()
    out = run(grouped, chosen)
    in_a = log_q(out, *A) > log_q(out, *B)
    assert float(in_a.double().mean()) == pytest.approx(pi, abs=0.05)
    assert float(out[in_a].double().var(0).mean()) == pytest.approx(A[1], rel=0.2)
    assert float(out[~in_a].double().var(0).mean()) == pytest.approx(B[1], rel=0.2)
    report = chosen.last_report.groups[0]
    assert report.final_share[0] == pytest.approx(float(in_a.double().mean()), abs=0.03)


def test_and_keeps_the_members_equally_likely_where_averaging_does_not():
    """AND of N(-0.5, 0.5) and N(0.5, 1.0): the tracked log-densities stay equal (the solve), and the true
    gap at the end is far below that of fixed 0.5 averaging (measured 0.9 and 2.2 nats at 100 steps)."""
    handle = expert()
    pair = [poe.Binding(handle, gaussian(-0.5, 0.5), 1.0, 0.0, label="A"),
            poe.Binding(handle, gaussian(0.5, 1.0), 1.0, 0.0, label="B")]
    chosen = sde.SDEKSampler()
    out = run(superposition.make_group(pair, [0, 1], "and", 1.0, clip=(-1e6, 1e6)), chosen, n=512)
    averaged = run([poe.Binding(handle, b.condition, 0.5, 0.0) for b in pair], sde.SDEKSampler(), n=512)
    gap = float((log_q(out, -0.5, 0.5) - log_q(out, 0.5, 1.0)).abs().mean())
    gap_avg = float((log_q(averaged, -0.5, 0.5) - log_q(averaged, 0.5, 1.0)).abs().mean())
    report = chosen.last_report.groups[0]
    tracked = report.final_log_q
    assert float((tracked[0] - tracked[1]).abs().max()) < 1e-4
    assert gap < 0.6 * gap_avg, (gap, gap_avg)
    assert report.clipped == 0 and "coefficients in [" in report.summary()


def test_a_group_refuses_other_samplers_and_the_corrector():
    grouped = superposition.make_group(members(expert()), [0, 1], "or")
    with pytest.raises(ValueError, match="sample it with the pack's SDE step"):
        run(grouped, comfy.samplers.sampler_object("euler"), n=4, steps=3)
    with pytest.raises(ValueError, match="the MCMC corrector, RePaint resampling and particles split or move that path"):
        run(grouped, with_corrector(sde.SDEKSampler(), CorrectorConfig()), n=4, steps=3)


def test_the_sde_sampler_without_groups_matches_its_own_seed():
    bindings = [poe.Binding(expert(), gaussian(1.0, 0.5))]
    a = run(bindings, sde.SDEKSampler(), n=8, steps=10, seed=3)
    b = run(bindings, sde.SDEKSampler(), n=8, steps=10, seed=3)
    c = run(bindings, sde.SDEKSampler(), n=8, steps=10, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- the nodes -------------------------------------------------------------------------------------

def test_the_group_nodes_make_the_last_bindings_a_group_and_describe_it():
    chain = members(expert()) + [poe.Binding(expert(name="other"), gaussian(0.0, 1.0), 1.5, 1.0,
                                             (gaussian(0.0, 2.0),), label="class")]
    out = composition.PoEOrGroup.execute(experts=chain[:2], members=2, priors="3, 1", weight=2.0)
    grouped = out.args[0]
    assert [b.weight for b in grouped] == [1.5, 0.5] and grouped[0].group.priors == (0.75, 0.25)
    assert "OR(1, 2): mixture of 1. gauss · A (pi=0.75), 2. gauss · B (pi=0.25), weight 2" in out.ui["text"][0]
    out = composition.PoEAndGroup.execute(experts=chain, members=2, weight=1.0, clip_min=-10.0, clip_max=11.0)
    grouped = out.args[0]
    assert grouped[0].group is None and grouped[1].group is grouped[2].group and grouped[2].group.kind == "and"
    assert "AND(2, 3): AND of 2. gauss · B, 3. other · class, weight 1" in out.ui["text"][0]


@pytest.mark.parametrize("call, message", [
    (lambda c: composition.PoEOrGroup.execute(experts=c, members=3, priors="", weight=1.0),
     "PoEOrGroup: input 'members' is 3 but the chain has 2 binding(s); bind the members first, or lower 'members'"),
    (lambda c: composition.PoEOrGroup.execute(experts=c, members=2, priors="0.5, x", weight=1.0),
     "PoEOrGroup: input 'priors' is '0.5, x'; give numbers separated by commas, such as '0.8, 0.2', or leave it empty"),
    (lambda c: composition.PoEOrGroup.execute(experts=c, members=2, priors="1, 2, 3", weight=1.0),
     "PoEOrGroup: input 'priors': 3 prior weight(s) for 2 members: give one per member, in chain order"),
    (lambda c: composition.PoEAndGroup.execute(experts=c, members=2, weight=1.0, clip_min=0.7, clip_max=2.0),
     "PoEAndGroup: input 'clip_min': the AND clip range (0.7, 2) must be finite and contain the even share 1/2"),
    (lambda c: composition.PoEOrGroup.execute(experts=[], members=2, priors="", weight=1.0),
     "PoEOrGroup: input 'experts' is empty: connect a PoEBind* chain"),
])
def test_group_node_errors_name_the_node_input_and_fix(call, message):
    with pytest.raises(ValueError) as err:
        call(members(expert()))
    assert str(err.value) == message


def ksample(experts, sampler="poe_euler_maruyama", batch=2, steps=6, **kw):
    out = sampling.PoEKSampler.execute(experts=experts, seed=1, steps=steps, sampler_name=sampler, scheduler="karras",
                                       denoise=1.0, width=0, height=0, batch_size=batch, **kw)
    return out.args


def test_ksampler_runs_an_or_group_and_reports_it():
    grouped = composition.PoEOrGroup.execute(experts=members(expert()), members=2, priors="", weight=1.0).args[0]
    latent, image, rule = ksample(grouped, batch=3)
    assert latent["samples"].shape == (3, 3, 2, 2) and image.shape == (3, 2, 2, 3)
    assert "OR(1, 2): mixture of 1. gauss · A (pi=0.5), 2. gauss · B (pi=0.5)" in rule
    assert "groups did: OR(1, 2): images by the member that leads at the end: 1. gauss · A " in rule


@pytest.mark.parametrize("kw, message", [
    (dict(sampler="euler"), "PoEKSampler: input 'sampler_name' is 'euler', but the chain has an OR / AND group, whose "
                            "members' log-densities only the pack's SDE step tracks: choose poe_euler_maruyama"),
    (dict(corrector=CorrectorConfig()), "PoEKSampler: input 'corrector' cannot be used with an OR / AND group"),
    (dict(particles=ParticleConfig(particles=2)), "PoEKSampler: input 'particles': binding 1 (A) is in an OR / AND "
                                                  "group, whose coefficients change per image at every step; particles "
                                                  "need fixed exponents"),
])
def test_ksampler_refuses_what_a_group_cannot_run_with(kw, message):
    grouped = superposition.make_group(members(expert()), [0, 1], "and")
    with pytest.raises(ValueError) as err:
        ksample(grouped, **kw)
    assert str(err.value).startswith(message)


def test_ksampler_refuses_a_member_given_a_noise_window_after_grouping():
    import dataclasses

    with_nulls = [dataclasses.replace(b, reliability=0.5, null=(gaussian(0.0, 1.0),)) for b in members(expert())]
    grouped = list(superposition.make_group(with_nulls, [0, 1], "or"))
    grouped[1] = dataclasses.replace(grouped[1], sigma_window=(0.5, math.inf))
    with pytest.raises(ValueError) as err:
        ksample(grouped)
    assert str(err.value).startswith("PoEKSampler: input 'experts': binding 2 (B) in OR(1, 2) has a noise window")


@pytest.mark.parametrize("output, rows", [("all", 6), ("draw", 2), ("best", 2)])
def test_ksampler_with_particles_runs_k_per_image_and_reports_ess(output, rows):
    handle = expert()
    chain = [poe.Binding(handle, gaussian(1.0, 0.5), 2.0, 1.0, (gaussian(0.0, 1.0),), label="cat")]
    config = composition.PoEParticles.execute(particles_per_image=3, temperature=1.0, ess_threshold=0.5,
                                              output=output).args[0]
    latent, image, rule = ksample(chain, sampler="euler_ancestral", particles=config)
    assert latent["samples"].shape == (rows, 3, 2, 2) and image.shape[0] == rows
    assert f"particles: 3 particle(s) per image, lambda = 1 (exact), resample when ESS < 0.5 x 3, output: {output}" in rule
    assert "particles did: 3 particle(s) per image x 2 image(s), lambda = 1: resampled at" in rule
    assert "ESS / K per step:" in rule


def test_ksampler_particles_repeat_each_images_conditions_for_its_group():
    """A per-image condition (batch 2) is shared by the 3 particles of that image's group."""
    handle = expert()
    per_image = {"mu": torch.tensor([-2.0, 2.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1).contiguous(),
                 "var": torch.full((2, 3, 1, 1), 0.05)}
    chain = [poe.Binding(handle, per_image, 1.0, 0.0, label="per image")]
    config = ParticleConfig(particles=3)
    latent, _, _ = ksample(chain, sampler="euler_ancestral", particles=config, steps=20)
    means = latent["samples"].flatten(1).mean(1)
    assert means[:3].max() < -1.5 and means[3:].min() > 1.5


def test_ksampler_particle_errors_name_the_input():
    handle = expert()
    chain = [poe.Binding(handle, gaussian(1.0, 0.5), 2.0, 1.0, (gaussian(0.0, 1.0),), label="cat")]
    with pytest.raises(ValueError) as err:
        ksample(chain, sampler="dpmpp_2m", particles=ParticleConfig(particles=2))
    assert str(err.value).startswith("PoEKSampler: input 'sampler_name': dpmpp_2m is deterministic")
    masked = [poe.Binding(handle, gaussian(1.0, 0.5), torch.full((1, 1, 2, 2), 2.0), 1.0, (gaussian(0.0, 1.0),),
                          label="cat")]
    with pytest.raises(ValueError) as err:
        ksample(masked, particles=ParticleConfig(particles=2))
    assert str(err.value).startswith("PoEKSampler: input 'particles': binding 1 (cat) has a mask")
    with pytest.raises(ValueError) as err:
        composition.PoEParticles.execute(particles_per_image=2, temperature=float("nan"), ess_threshold=0.5,
                                         output="all")
    assert str(err.value) == "PoEParticles: input 'temperature' is nan; use a finite number"
    with pytest.raises(ValueError) as err:
        composition.PoEParticles.execute(particles_per_image=2, temperature=1.0, ess_threshold=0.5, output="mean")
    assert str(err.value).startswith("PoEParticles: input 'output': unknown output 'mean'")


def test_the_particle_sampler_node_wraps_samplers_for_samplercustomadvanced():
    config = ParticleConfig(particles=2, corrector=CorrectorConfig(steps=1))
    sampler = composition.PoEParticleSampler.execute(particles=config).args[0]
    assert sampler.config.corrector == CorrectorConfig(steps=1)
    assert composition.PoESDESampler.execute().args[0].sampler_function is sde.sample_poe_euler_maruyama
    with pytest.raises(ValueError) as err:
        composition.PoEParticleSampler.execute(particles=config, sampler=comfy.samplers.sampler_object("heun"))
    assert str(err.value).startswith("PoEParticleSampler: input 'sampler': heun is deterministic")
    wrapped = composition.PoEParticleSampler.execute(
        particles=ParticleConfig(particles=2), sampler=with_corrector(comfy.samplers.sampler_object("euler_ancestral"),
                                                                      CorrectorConfig(steps=1))).args[0]
    assert wrapped.corrector == CorrectorConfig(steps=1)
    out = run([poe.Binding(expert(), gaussian(1.0, 0.5), 2.0, 1.0, (gaussian(0.0, 1.0),))], wrapped, n=4, steps=6)
    assert out.shape == (4, 3, 2, 2) and "2 particle(s) per image x 2 image(s)" in wrapped.summary()


@pytest.mark.parametrize("node", [composition.PoEParticles, composition.PoEParticleSampler, composition.PoESDESampler,
                                  composition.PoEOrGroup, composition.PoEAndGroup])
def test_every_composition_node_describes_itself_and_each_input(node):
    schema = node.define_schema()
    assert len(schema.description) > 80 and schema.category.startswith("unite_and_conquer/")
    for inp in schema.inputs:
        assert inp.tooltip and len(inp.tooltip) > 20, (schema.node_id, inp.id)


def test_the_particle_node_defaults_are_the_librarys():
    d = ParticleConfig()
    inputs = {i.id: i for i in composition.PoEParticles.define_schema().inputs}
    assert (inputs["particles_per_image"].default, inputs["temperature"].default, inputs["ess_threshold"].default,
            inputs["output"].default, inputs["move"].default) == (d.particles, d.temperature, d.ess_threshold,
                                                                  d.output, d.move)
    clip = {i.id: getattr(i, "default", None) for i in composition.PoEAndGroup.define_schema().inputs}
    assert (clip["clip_min"], clip["clip_max"]) == superposition.AND_CLIP
