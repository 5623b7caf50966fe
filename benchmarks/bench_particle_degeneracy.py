"""How far the particle weights degenerate as lambda falls, on the tiny digits and on an SD1.5-size
latent, and what the choice of lambda costs there in bias (issue 27: "In high dimension the weights
degenerate. Measure that on the digits and on the SD1.5-size latent, and choose the default from those
measurements").

    .venv/bin/python benchmarks/bench_particle_degeneracy.py [--targets 32] [--groups 128] [--write]

Both parts sample through the node path (``ProductGuider`` and ``ParticleKSampler`` around the pack's
``poe_euler_maruyama``, 30 Karras steps, ESS threshold 0.5, output ``draw``) for K = 4 and 8 particles
per output and lambda in {1, 0.5, 0.25, 0.1}; lambda 0 is the same sampler without weights.

- **Digits** (3 x 32 x 32 = 3072 dimensions): the all-32 px product, w = (4, 2, 2), reliabilities equal to
  the weights, the layout binding at every level, on ``--targets`` targets of the ``npm_heldout`` split,
  seed 0: the split the digit settings are chosen on (the weights and reliabilities were; ``heldout``, digits
  never used for a choice, is kept for reporting: ``eval_digits_particles.py``). Beside the weights' figures,
  the judges' "all three" rate (a few dozen targets: a coarse figure).
- **SD1.5-size latent** (3 x 74 x 74 = 16428 dimensions, SD1.5's 4 x 64 x 64 = 16384 to 0.3%: the
  analytic experts work on 3-channel pixels, and the weights' spread grows with the dimension): the first analytic case of
  ``analytic_cases.CASES`` (two Gaussian experts on the linear and cosine schedules, w = (2, 1.5),
  a = (0.3, 0.7), so the pooled nulls enter with a negative exponent) drawn at that size, ``--groups``
  outputs. Its product has a closed form, so the bias is measured: W2 between the per-pixel Gaussian
  fitted to the outputs and the closed form (the noise floor of as many exact samples beside it), and
  the mean over pixels of the outputs' variance over the closed form's.

Per row: the mean over steps of the groups' mean ESS / K after each step's increment, the mean of the
lowest; how many of the steps resampled some group; and the mean number of distinct starting particles
a group descends from at the end (``ParticleReport.ancestors``: K = no collapse, 1 = one lineage).

**The rule for the default** (fixed before the measurements): the largest lambda in the grid whose
mean ESS / K per step is at least 0.5, the default resampling threshold, at K = 4 and 8 on both the
digits and the SD1.5-size latent: resampling is then the exception rather than the rule at each step,
so the groups keep several lineages. Larger lambda carries less bias; smaller degenerates less.
"""
from __future__ import annotations

import argparse
import dataclasses
import runpy
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

import torch  # noqa: E402

from unite_and_conquer.benchmarks import analytic_cases as cases  # noqa: E402
from unite_and_conquer.benchmarks import eval_digits as ed  # noqa: E402
from unite_and_conquer.benchmarks import eval_digits_bands as edb  # noqa: E402
from unite_and_conquer.benchmarks.report import publish, run_facts  # noqa: E402
from unite_and_conquer.samplers.particles import ParticleConfig  # noqa: E402

HEADING = "## Particles: weight degeneracy against lambda, digits and an SD1.5-size latent"
SAMPLER = "poe_euler_maruyama"
STEPS = 30
KS = (4, 8)
LAMBDAS = (1.0, 0.5, 0.25, 0.1)
ESS_RULE = 0.5
# The pack's analytic experts work on pixels (3 channels); 3 x 74 x 74 = 16428 is the dimension of SD1.5's
# 4 x 64 x 64 latent (16384) to 0.3%, and the weights' spread grows with the dimension, not the layout.
SD15 = dataclasses.replace(cases.CASES[0], shape=(3, 74, 74))
# The reading of the figures measured on 2026-12-07 (BENCHMARKS.md); rewrite it when they change.
READING = ("Reading: averaged over the 30 steps, the weights keep most of their ESS, on the digits and at the "
           "SD1.5 latent's dimension alike. With lambda 1 the mean ESS / K after a step's increment is 0.65 / "
           "0.56 on the digits (K = 4 / 8) and 0.71 / 0.67 on the latent; lambda 0.1 raises it to 0.82 / 0.77 "
           "and 0.83 / 0.80 and cuts the steps that resample from 15-18 to 11-14 of 30. Every lambda meets the "
           "rule, so the default stays lambda = 1 (exact). The average hides where the weights do degenerate: on"
           " the digits at lambda 1 the ESS / K stays near 1 for the first 12 steps and is 0.3-0.4 after each of"
           " the last 18, every one of which resamples (the particle summary in \"Multimodal digits: weighted "
           "particles, the report\"); a rule on the low levels alone would have chosen a smaller lambda (this run"
           " keeps no per-step figures for lambda < 1). What does collapse, at every lambda down to 0.1, is each"
           " group's lineage: after 11-18 resampling steps a group descends from one starting particle "
           "(1.00-1.12 of K), so tempering keeps no more lineages alive either; output all returns K relatives, "
           "not K independent images. What lambda < 1 costs: on the latent, W2 is 20.8-21.0 at every K and "
           "lambda against 21.2 without weights and a noise floor of 6.9: at 30 steps the Euler-Maruyama step's "
           "own error (variance 2-4% too large) dominates, and the correction the weights make, and so the bias "
           "tempering brings back, is below what 128 outputs resolve (about 0.1). Where it is resolved, on the "
           "6-dimensional mixture product (\"Particles: a Gaussian-mixture product with known mode weights\"), "
           "lambda 0.5 put 0.65 of the images in the mode that should have 0.76, against 0.75 at lambda 1. The "
           "digits' all-three rates on 32 targets (0.53-0.75; 0.50 without weights) are too coarse to rank "
           "lambda; the digits' own screen is \"Multimodal digits: weighted particles, the screen (choice "
           "split)\".")


def config(k: int, lam: float) -> ParticleConfig:
    return ParticleConfig(particles=k, temperature=lam, ess_threshold=0.5, output="draw")


def weights_figures(report) -> dict:
    steps = len(report.ess_mean)
    return {"ess": sum(report.ess_mean) / steps, "ess_low": sum(report.ess_min) / steps,
            "resampled": sum(1 for r in report.resampled if r), "steps": steps,
            "ancestors": sum(report.ancestors) / len(report.ancestors)}


def digits_row(k: int, lam: float, n: int, seed: int = 0) -> dict:
    from unite_and_conquer.samplers.comfy import particles as comfy_particles
    from unite_and_conquer.samplers.comfy import sampling as comfy_sampling
    from unite_and_conquer.samplers.comfy import sde as comfy_sde

    target = ed.targets(n, "npm_heldout", seed)
    handles = edb._handles(REPO / "models_tiny" / "tiny_class_16.safetensors")
    conds = ed.conditions({m: handles[m].expert for m in ed.MODALITIES}, target)
    guider = edb._class16_guider(handles, conds, ("class", "colour", "layout"), (4.0, 2.0, 2.0), 0, n, "weights",
                                 repeat=k)
    sigmas = comfy_sampling.compute_sigmas(guider, SAMPLER, "karras", STEPS, 1.0)
    plain = ParticleConfig(particles=1, temperature=0.0, ess_threshold=0.0, output="best")
    sampler = comfy_particles.with_particles(comfy_sde.sampler_object(SAMPLER), config(k, lam) if lam > 0 else plain)
    t0 = time.time()
    images = comfy_sampling.sample(guider, torch.zeros(n * k, 3, 32, 32), seed * 1000, sampler, sigmas,
                                   preview=False).clamp(-1, 1)
    rates = ed.scored("", images, target, ed.Judges()).rates
    figures = weights_figures(sampler.last_report) if lam > 0 else {}
    return {**figures, "all": rates["all"], "seconds": time.time() - t0}


def latent_row(k: int, lam: float, groups: int, seed: int = 0) -> dict:
    from unite_and_conquer.benchmarks.bench_particles import sample, sampler

    chosen = sampler(SAMPLER, config(k, lam) if lam > 0 else None)
    t0 = time.time()
    out = sample(cases.bindings(SD15), chosen, groups * (k if lam > 0 else 1), SD15.shape, seed, STEPS)
    mean, var = SD15.closed_form()
    figures = weights_figures(chosen.last_report) if lam > 0 else {}
    return {**figures, "w2": cases.w2(out, mean, var),
            "var_ratio": float((out.double().var(0) / var.double()).mean()), "seconds": time.time() - t0}


def fmt(r: dict, key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else "-"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=32, help="digit targets (npm_heldout split)")
    parser.add_argument("--groups", type=int, default=128, help="outputs on the SD1.5-size latent")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    cases.comfy_modules()
    head = ("| K | lambda | mean ESS / K per step | lowest ESS / K per step (mean) | steps that resampled | distinct "
            "ancestors per group at the end | {} | seconds |")
    digits, latent = [], []
    digits_plain = digits_row(1, 0.0, args.targets) if args.targets else {"all": float("nan")}
    print("digits plain", digits_plain, flush=True)
    for k in KS if args.targets else ():
        for lam in LAMBDAS:
            r = digits_row(k, lam, args.targets)
            digits.append((k, lam, r))
            print("digits", k, lam, r, flush=True)
    floor = cases.noise_floor(SD15, args.groups)
    plain = latent_row(1, 0.0, args.groups)
    print("latent plain", plain, flush=True)
    for k in KS:
        for lam in LAMBDAS:
            r = latent_row(k, lam, args.groups)
            latent.append((k, lam, r))
            print("latent", k, lam, r, flush=True)

    def rows(table, extra):
        return [f"| {k} | {lam:g} | {fmt(r, 'ess', '.3f')} | {fmt(r, 'ess_low', '.3f')} | "
                f"{r['resampled']} of {r['steps']} | {fmt(r, 'ancestors', '.2f')} of {k} | {extra(r)} | "
                f"{r['seconds']:.0f} |" for k, lam, r in table]

    ok = {lam: all(r["ess"] >= ESS_RULE for _, l2, r in digits + latent if l2 == lam) for lam in LAMBDAS}
    chosen = next((lam for lam in LAMBDAS if ok[lam]), min(LAMBDAS))
    body = "\n".join([
        f"`poe_euler_maruyama`, {STEPS} Karras steps, ESS threshold 0.5, output draw, through `ProductGuider` and "
        "`ParticleKSampler`. The rule for the default lambda, fixed before measuring: the largest lambda whose mean "
        f"ESS / K per step is at least {ESS_RULE} (the default resampling threshold) at K = 4 and 8 on both "
        "products.",
        "",
        *run_facts("benchmarks/bench_particle_degeneracy.py", argv,
                   f"digits: {args.targets} targets of `npm_heldout`, seed 0; SD1.5-size latent: {args.groups} outputs, "
                   "seed 0", t0, 1, torch.__version__),
        "",
        "**Digits** (3 x 32 x 32; w = (4, 2, 2), reliabilities equal to the weights, no window); the same sampler "
        f"without weights (lambda 0, one particle per output): all three {digits_plain['all']:.3f}.",
        "",
        head.format("all three (judges)"),
        "|---:|---:|---:|---:|---|---|---:|---:|",
        *rows(digits, lambda r: f"{r['all']:.3f}"),
        "",
        f"**SD1.5-size latent** (3 x 74 x 74 = 16428 dimensions, as SD1.5's 4 x 64 x 64 = 16384; analytic case "
        f"\"{SD15.name}\"): W2 to the closed form, noise floor of "
        f"{args.groups} exact samples {floor:.2f}; the same sampler without weights (lambda 0, one particle per "
        f"output): W2 {plain['w2']:.2f}, variance / closed form {plain['var_ratio']:.3f}.",
        "",
        head.format("W2 / variance ratio"),
        "|---:|---:|---:|---:|---|---|---:|---:|",
        *rows(latent, lambda r: f"{r['w2']:.2f} / {r['var_ratio']:.3f}"),
        "",
        "Rule met (mean ESS / K >= 0.5 everywhere) at lambda: "
        + (", ".join(f"{lam:g}" for lam in LAMBDAS if ok[lam]) or "none") + f"; by the rule the default is {chosen:g}.",
        "",
        READING,
        "",
    ])
    publish(HEADING, body, args.write)


if __name__ == "__main__":
    main()
