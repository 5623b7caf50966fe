"""Tier (b) graph fuzz: seeded chains of 1-4 bindings from every binding node, in random orders, with weights,
masks, bands and windows, on latents of the native size, a multiple, a non-multiple and a smaller size
(``support/graph_fuzz.py`` says how each graph is drawn, built, run and judged).

Every graph runs through PoEKSampler, PoEGuider + PoEScheduler + SamplerCustomAdvanced, and the stock KSampler
on PoEEncodeCondition's output (one binding of it, against PoEKSampler on that binding alone). Each outcome
must be a prediction that equals the documented rule (an independent reference: closed forms for the Gaussian
MODELs, the tiny networks at their own timesteps, scipy's DCT) at a few sigmas, or a refusal that names its
node and input. Paths must agree: refused by one, refused by all, with the same words; and the refusals must
be the ones an independent oracle expects. A subset also samples whole schedules through both product paths.

``UAC_FUZZ_EXAMPLES`` changes the number of graphs (500 by default); ``UAC_FUZZ_REPORT`` names a JSON file for
the figures (BENCHMARKS.md, 'Graph fuzz').
"""
from __future__ import annotations

import collections
import json
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

from support import graph_fuzz as gf
from support.small_models import one_thread  # noqa: F401  (tiny networks: one thread is faster on a shared CPU)

EXAMPLES = int(os.environ.get("UAC_FUZZ_EXAMPLES", "500"))
FULL_EVERY = 8                 # every 8th accepted graph also samples a whole schedule through both product paths
# |D - reference| <= TOL (1 + max |reference|) + F32 max |x|: the rule to 1e-3, plus float32 rounding, which
# grows with the input (x = L + sigma n reaches 6e4 at the top of the cosine schedule).
TOL, F32 = 1e-3, 1e-6

TALLY: dict = {"graphs": 0, "paths": collections.Counter(), "refusals": collections.Counter(),
               "latents": collections.Counter(), "kinds": collections.Counter(), "max_error_sigma_below_100": 0.0,
               "max_error_over_tolerance": 0.0, "predictions": 0, "full": 0, "seconds": 0.0}


def fail(spec, what: str):
    pytest.fail(f"{what}\ngraph:\n{spec.describe()}", pytrace=False)


def check_named(spec, outcome: gf.Outcome):
    """A refusal names a PoE node and an input, then says what is wrong."""
    m = gf.NAMED.match(outcome.refusal)
    if not m:
        fail(spec, f"{outcome.path}: a refusal that does not name its node and input: {outcome.refusal!r}")
    return m


def check_predictions(spec, outcome: gf.Outcome, reference_spec=None):
    for x, s, d in outcome.predictions:
        ref = gf.reference_denoised(reference_spec or spec, x, s)
        check_close(reference_spec or spec, f"{outcome.path} at sigma={s:.4g}", d, ref, x, s)


def check_close(spec, what: str, got, want, x, s: float):
    err = float((got.double() - want).abs().max())
    allowed = TOL * (1 + float(want.abs().max())) + F32 * float(x.abs().max())
    TALLY["max_error_over_tolerance"] = max(TALLY["max_error_over_tolerance"], err / allowed)
    if s <= 100:
        TALLY["max_error_sigma_below_100"] = max(TALLY["max_error_sigma_below_100"],
                                                 err / (1 + float(want.abs().max())))
    TALLY["predictions"] += 1
    if not err <= allowed:
        fail(spec, f"{what}: silent mismatch: |D - rule| = {err:.3g}, above {allowed:.3g}")


def sigmas_for(product_range, spec) -> list[float]:
    """A few sigmas inside the product's range: near its top and bottom, the middle, and both sides of each
    window edge, so the rule is checked on every set of bindings that takes part."""
    lo, hi = product_range
    picks = {hi * 0.999, math.sqrt(lo * hi), lo * 1.5}
    for b in spec.bindings:
        for e in (b.window or ()):
            for p in (e * 0.93, e * 1.07):
                if lo * 1.01 < p < hi * 0.99:
                    picks.add(p)
    return sorted(picks, reverse=True)


def library_range(spec):
    """The product's sigma range on this latent, or None where it is refused (the paths then refuse too)."""
    from unite_and_conquer.samplers import validation
    from unite_and_conquer.samplers.comfy.guider import ProductGuider, latent_facts

    try:
        return ProductGuider(gf.build_chain(spec), "check", latent_facts(gf.latent_of(spec))).sigma_range
    except (ValueError, validation.ProductError):
        return None


def judge_refusals(spec, outcomes, expected: set[str]):
    """All outcomes refused with the same words, and the kind is one the oracle expects."""
    bodies = {o.path: check_named(spec, o).group(3) for o in outcomes}
    if len(set(bodies.values())) != 1:
        fail(spec, "the paths refuse with different words:\n" + "\n".join(f"  {p}: {b}" for p, b in bodies.items()))
    kind = gf.refusal_kind(next(iter(bodies.values())))
    if kind not in expected:
        fail(spec, f"refused as {kind!r} ({next(iter(bodies.values()))}) but the oracle expects {sorted(expected)}")
    return kind


def full_sampling(spec, chain_range):
    """Whole schedules: PoEKSampler and PoEGuider + PoEScheduler + SamplerCustomAdvanced give the same samples,
    and both follow the reference rule along the same Euler steps."""
    import comfy.sample

    from support.comfy_harness import comfy_nodes
    from unite_and_conquer.nodes import sampling
    from unite_and_conquer.samplers.comfy import sampling as comfy_sampling
    from unite_and_conquer.samplers.comfy.guider import ProductGuider, latent_facts

    nodes = comfy_nodes()
    chain = gf.build_chain(spec)
    latent = torch.zeros(spec.batch, spec.channels, spec.canvas, spec.canvas)
    steps = 3
    ours = sampling.PoEKSampler.execute(chain, spec.seed, steps, "euler", "simple", 1.0, 0, 0, spec.batch,
                                        latent_image={"samples": latent}).args[0]["samples"]
    guider = sampling.PoEGuider.execute(experts=chain).args[0]
    sigmas = sampling.PoEScheduler.execute(experts=chain, scheduler="simple", steps=steps, denoise=1.0).args[0]
    sampler = nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"].execute(sampler_name="euler").args[0]
    noise = nodes.NODE_CLASS_MAPPINGS["RandomNoise"].execute(noise_seed=spec.seed).args[0]
    custom = nodes.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"].execute(
        noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image={"samples": latent}).args[0]["samples"]
    lib = ProductGuider(chain, "check", latent_facts(latent))
    own = comfy_sampling.compute_sigmas(lib, "euler", "simple", steps, 1.0).double()
    fmt = lib.model_patcher.model.latent_format
    if torch.allclose(own.float(), sigmas.float(), rtol=1e-5):
        err = float((ours - custom).abs().max()) / (1 + float(ours.abs().max()))
        if not err <= TOL:
            fail(spec, f"PoEKSampler and SamplerCustomAdvanced differ by {err:.3g} on the same schedule")
    # The reference: Euler steps of the rule from the same noise (scaled by sqrt(1 + sigma_max^2), as ComfyUI does).
    x = comfy.sample.prepare_noise(latent, spec.seed).double() * math.sqrt(1 + float(own[0]) ** 2)
    for s, s_next in zip(own[:-1].tolist(), own[1:].tolist()):
        d = gf.reference_denoised(spec, x, s)
        x = x + (x - d) / s * (s_next - s)
    want = fmt.process_out(x)
    err = float((ours.double() - want).abs().max()) / (1 + float(want.abs().max()))
    if not err <= 10 * TOL:        # three steps from sigma_max compound the rounding of the first
        fail(spec, f"PoEKSampler's {steps}-step sample is off the reference rule's by {err:.3g}")
    TALLY["full_max_error"] = max(TALLY.get("full_max_error", 0.0), err)
    TALLY["full"] += 1


def check_graph(spec: gf.GraphSpec):
    TALLY["graphs"] += 1
    TALLY["latents"][spec.latent] += 1
    # A binding node refuses for every path: what a chain cannot be (one space) is refused as it is built.
    try:
        gf.build_chain(spec)
    except ValueError as err:
        outcome = gf.Outcome("chain", refusal=str(err))
        kind = judge_refusals(spec, [outcome], gf.oracle(spec))
        TALLY["paths"]["chain: refused"] += 1
        TALLY["refusals"][kind] += 1
        return
    product_range = library_range(spec)
    expected = gf.oracle(spec)
    sigmas = sigmas_for(product_range, spec) if product_range else [1.0]
    product = [gf.run_path("ksampler", lambda: gf.ksampler_path(spec)),
               gf.run_path("custom", lambda: gf.custom_path(spec, sigmas))]
    refused = [o.refusal is not None for o in product]
    if any(refused):
        if not all(refused):
            fail(spec, "one path refuses what another samples: " + "; ".join(
                f"{o.path}: {o.refusal or 'sampled'}" for o in product))
        kind = judge_refusals(spec, product, expected)
        TALLY["refusals"][kind] += 1
        TALLY["paths"]["product: refused"] += 1
    else:
        if expected:
            fail(spec, f"sampled, but the oracle says the rule breaks {sorted(expected)}")
        for o in product:
            check_predictions(spec, o)
        TALLY["paths"]["product: sampled"] += 1
        if TALLY["paths"]["product: sampled"] % FULL_EVERY == 1:
            full_sampling(spec, product_range)

    # The stock path on one binding, against PoEKSampler on that binding alone.
    j = spec.stock_index
    b = spec.bindings[j]
    if b.weight < 0:            # cfg has no negative values
        return
    solo = spec.solo(j)
    stock = gf.run_path("stock", lambda: gf.stock_path(spec))
    if b.mask or b.band:
        if stock.refusal is None or gf.refusal_kind(check_named(spec, stock).group(3)) != "stock":
            fail(spec, f"the stock path should refuse a binding with a mask or a band: {stock.refusal or 'sampled'}")
        TALLY["paths"]["stock: refused (mask or band)"] += 1
        return
    alone = gf.run_path("solo", lambda: gf.ksampler_path(solo))
    if (stock.refusal is None) != (alone.refusal is None):
        fail(spec, f"the stock path and PoEKSampler on binding {j} alone disagree: stock: {stock.refusal or 'sampled'}; "
                   f"PoEKSampler: {alone.refusal or 'sampled'}")
    if stock.refusal is not None:
        kind = judge_refusals(solo, [stock, alone], gf.oracle(solo))
        TALLY["refusals"]["stock/solo " + kind] += 1
        TALLY["paths"]["stock and solo: refused"] += 1
        return
    if gf.oracle(solo):
        fail(solo, "the stock path samples what the oracle refuses")
    check_predictions(solo, stock)
    check_predictions(solo, alone)
    TALLY["paths"]["stock and solo: sampled"] += 1


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
          phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
@given(spec=gf.graph_specs())
def test_every_graph_samples_the_rule_or_is_refused_alike_on_every_path(spec):
    start = time.perf_counter()
    for b in spec.bindings:
        TALLY["kinds"][b.kind] += 1
    try:
        with torch.no_grad():
            check_graph(spec)
    finally:
        TALLY["seconds"] += time.perf_counter() - start


def test_the_fuzz_covered_every_outcome():
    """The figures, and that the fuzz exercised what it is for (the draw is seeded, so these are reproducible)."""
    report = {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in TALLY.items()}
    print("\n" + json.dumps(report, indent=1, sort_keys=True))
    if os.environ.get("UAC_FUZZ_REPORT"):
        with open(os.environ["UAC_FUZZ_REPORT"], "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    assert TALLY["graphs"] >= EXAMPLES
    if EXAMPLES >= 500:
        paths = TALLY["paths"]
        assert paths["product: sampled"] >= 100 and paths["product: refused"] >= 100
        assert paths["stock and solo: sampled"] >= 50 and paths["stock and solo: refused"] >= 10
        assert {"canvas", "finest", "null", "channels"} <= set(TALLY["refusals"])
        assert TALLY["full"] >= 10
