"""What the particle step costs on top of the experts' forwards, on the CPU (issue 27: at most 5% at
batch 4 and 16).

    .venv/bin/python benchmarks/bench_particle_cost.py [--steps 30] [--repeats 5] [--write]

The tiny digit product (class 7, colour red, a layout box; weights 4 / 2 / 2, reliabilities equal) is
sampled through ``ProductGuider`` with the pack's Euler–Maruyama sampler, plain and inside
``ParticleKSampler`` (K = 4 per image, lambda 1, ESS threshold 0.5, output best), on the same batch of
images (4 and 16 in all, so 1 and 4 groups). Both make the same forwards (one per expert and step);
the difference is the particle step: the per-term record, the weight increment, ESS, resampling with
its restart, and the output choice. Each figure is the fastest of ``--repeats`` runs (the machine is
shared), in one torch thread.
"""
from __future__ import annotations

import argparse
import runpy
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

import torch  # noqa: E402

from unite_and_conquer.benchmarks import eval_digits as ed  # noqa: E402
from unite_and_conquer.benchmarks.report import publish, run_facts  # noqa: E402
from unite_and_conquer.samplers.particles import ParticleConfig  # noqa: E402
from unite_and_conquer.samplers.poe import Binding  # noqa: E402

HEADING = "## Particles: cost of the particle step on the CPU"


def guider(batch: int):
    models, guiders, _, _ = ed.comfy_modules()
    experts = ed.load_experts(REPO / "models_tiny")
    handles = {m: models.wrap_expert(e) for m, e in experts.items()}
    target = ed.targets(1, "npm_heldout", 0)
    conds = ed.conditions(experts, target)
    ws = {"class": 4.0, "colour": 2.0, "layout": 2.0}
    bindings = [Binding(handles[m], conds[m], ws[m], ws[m], (experts[m].null_condition,), label=m)
                for m in ed.MODALITIES]
    return guiders.ProductGuider(bindings)


def timed(batch: int, particles: bool, steps: int, repeats: int) -> tuple[float, str]:
    g = guider(batch)   # starts ComfyUI first
    from unite_and_conquer.samplers.comfy import particles as comfy_particles
    from unite_and_conquer.samplers.comfy import sampling, sde

    sigmas = sampling.compute_sigmas(g, "euler", "karras", steps, 1.0)
    best, summary = float("inf"), ""
    for r in range(-1, repeats):   # -1: a warm-up run, not timed (loading, first allocations)
        chosen = sde.SDEKSampler() if not particles else comfy_particles.with_particles(
            None, ParticleConfig(particles=4, output="best"))
        latent = torch.zeros(batch, 3, 32, 32)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(max(r, 0)))
        t0 = time.perf_counter()
        g.sample(noise, latent, chosen, sigmas, disable_pbar=True, seed=max(r, 0))
        if r >= 0:
            best = min(best, time.perf_counter() - t0)
        if particles:
            summary = chosen.summary().splitlines()[0]
    return best, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    lines = ["| images in the batch | plain (s) | with particles (s) | added by the particle step | particles did |",
             "|---:|---:|---:|---:|---|"]
    for batch in (4, 16):
        plain, _ = timed(batch, False, args.steps, args.repeats)
        weighted, summary = timed(batch, True, args.steps, args.repeats)
        lines.append(f"| {batch} | {plain:.3f} | {weighted:.3f} | {(weighted / plain - 1) * 100:+.1f}% | {summary} |")
        print(lines[-1], flush=True)
    body = "\n".join([
        "The tiny digit product (3 experts of 0.57M parameters, 32 x 32) through PoEGuider with `poe_euler_maruyama`, "
        f"{args.steps} Karras steps, plain and with 4 particles per image (lambda 1, ESS threshold 0.5, output best), "
        "on the same batch: the same forwards, so the difference is the particle step. Fastest of "
        f"{args.repeats} runs.",
        "",
        *run_facts("benchmarks/bench_particle_cost.py", argv, f"{args.repeats} repeats", t0, 1, torch.__version__),
        "",
        *lines,
        "",
    ])
    publish(HEADING, body, args.write)


if __name__ == "__main__":
    main()
