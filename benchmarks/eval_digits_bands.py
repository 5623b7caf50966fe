"""Multimodal digits with a class expert at 16 px guiding the 32 px colour and layout experts.

    .venv/bin/python benchmarks/eval_digits_bands.py                     # 1000 samples, npm held-out digits
    .venv/bin/python benchmarks/eval_digits_bands.py -n 200 --no-write
    .venv/bin/python benchmarks/eval_digits_bands.py --corrected --jobs 2  # the 16 px product, MCMC-corrected
    .venv/bin/python benchmarks/eval_digits_bands.py --corrected --reliabilities weights --layout-sigma-min 0.3 --jobs 2
    .venv/bin/python benchmarks/eval_digits_bands.py --particles 4 --reliabilities weights --steps 60 --jobs 2

Both rows run through the pack's ComfyUI guider (``PoEGuider``, what PoEKSampler and
SamplerCustomAdvanced run) with ComfyUI's ``dpmpp_2m`` sampler and ``karras`` scheduler, on the
same targets and judges as ``eval_digits.py`` (the noise is ComfyUI's, from seed * 1000 + the first
target of each chunk, so the rows here share it with each other, not with ``eval_digits.py``): the
all-32 px product at weights (4, 2, 2) and reliabilities 1/3 (or, with ``--reliabilities weights``,
equal to the weights), and the same product with the class expert replaced by one trained on 2 x 2-pooled canvases
(``tools/train_tiny.py --resolution 16 --patch 1``: the 32 px network's token grid on the 16 px
canvas), which the guider evaluates on the pooled canvas at sigma / 2 and lifts into the
piecewise-constant images (``samplers/bands.py``).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import runpy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMFY = REPO / ".cache" / "ComfyUI"
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

from unite_and_conquer.benchmarks import eval_digits as ed  # noqa: E402
from unite_and_conquer.benchmarks.report import publish, run_facts  # noqa: E402
from unite_and_conquer.model_loaders import load_expert  # noqa: E402
from unite_and_conquer.samplers import correctors  # noqa: E402
from unite_and_conquer.samplers.poe import Binding  # noqa: E402

HEADING = "## Multimodal digits: a 16 px class expert on the 32 px canvas"
CORRECTED_HEADING = "## Multimodal digits: the 16 px class expert, MCMC-corrected"
PARTICLES_HEADING = "## Multimodal digits: weighted particles"


def layout_label(layout_sigma_min: float) -> str:
    """How rows and headings name the layout binding's noise window (nothing when there is none)."""
    return f", layout at sigma >= {layout_sigma_min:g}" if layout_sigma_min else ""


def _class16_guider(handles, conds, keys, w, start: int, stop: int, reliability: str = "equal",
                    layout_sigma_min: float = 0.0, repeat: int = 1):
    """The product over ``keys``; with ``layout_sigma_min``, the layout binding takes part only at
    sigma >= it (a binding's noise window, as the nodes set it), so that below it the class expert
    alone draws the strokes inside the box that the higher levels placed. ``repeat``: each target's
    conditions repeated for its K particles (PoEKSampler does the same)."""
    from unite_and_conquer.samplers.comfy import guider as comfy_guider
    from unite_and_conquer.samplers.comfy import particles as comfy_particles

    ws, rs = ed.per_modality(w), ed.reliabilities(w, reliability)
    bindings = []
    for key in keys:
        m = "class" if key == "class16" else key
        cond = {k: v[start:stop] for k, v in conds[m].items()}
        window = (layout_sigma_min, math.inf) if m == "layout" else (0.0, math.inf)
        bindings.append(Binding(handles[key], cond, ws[m], rs[m], null=(handles[key].expert.null_condition,), label=m,
                                sigma_window=window))
    if repeat > 1:
        bindings = comfy_particles.repeat_conditions(bindings, repeat)
    return comfy_guider.ProductGuider(bindings)


def _handles(class16: Path):
    from unite_and_conquer.samplers.comfy import models as comfy_models

    experts = ed.load_experts(REPO / "models_tiny")
    handles = {m: comfy_models.wrap_expert(e) for m, e in experts.items()}
    handles["class16"] = comfy_models.wrap_expert(load_expert(str(class16), family="auto"))
    return handles


def sample_row(spec, n: int, split: str, seed: int, class16: Path, chunk: int = 250,
               reliability: str = "equal", layout_sigma_min: float = 0.0) -> ed.Result:
    """One row: ``spec = (name, expert keys, weight, steps, corrector or None)`` on ``n`` targets, with
    the reliabilities ``ed.reliabilities(weight, reliability)`` and the layout binding's window
    (:func:`_class16_guider`)."""
    from unite_and_conquer.samplers.comfy import correctors as comfy_correctors
    from unite_and_conquer.samplers.comfy import sampling as comfy_sampling

    name, keys, w, steps, corrector = spec
    target = ed.targets(n, split, seed)
    handles = _handles(class16)
    conds = ed.conditions({m: handles[m].expert for m in ed.MODALITIES}, target)
    sampler = "dpmpp_2m" if corrector is None else comfy_correctors.with_corrector("dpmpp_2m", corrector)
    t0, images, evaluations = time.time(), [], steps
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        guider = _class16_guider(handles, conds, keys, w, start, stop, reliability, layout_sigma_min)
        sigmas = comfy_sampling.compute_sigmas(guider, "dpmpp_2m", "karras", steps, 1.0)
        if corrector is not None:
            evaluations = correctors.run_evaluations(sigmas, corrector)
        latent = torch.zeros(stop - start, 3, 32, 32)
        images.append(comfy_sampling.sample(guider, latent, seed * 1000 + start, sampler, sigmas,
                                            preview=False).clamp(-1, 1))
    return ed.scored(name, torch.cat(images), target, ed.Judges(), time.time() - t0, evaluations)


def particle_row(name: str, keys, w, steps: int, config, sampler_name: str, n: int, split: str, seed: int,
                 class16: Path, chunk: int = 250, reliability: str = "equal") -> tuple[ed.Result, str]:
    """One row sampled with weighted particles (``samplers/comfy/particles.py``): K particles per target
    (``config``: a ``ParticleConfig`` with output ``draw`` or ``best``, one image per target) moved by
    ``sampler_name`` (``poe_euler_maruyama`` or a ComfyUI ancestral / SDE sampler), through the guider
    and ``comfy_sampling.sample`` as PoEKSampler runs them. Returns the row (its evaluations per output
    image: K per step, plus the move step's) and the particle summary of the last chunk."""
    from unite_and_conquer.samplers.comfy import particles as comfy_particles
    from unite_and_conquer.samplers.comfy import sampling as comfy_sampling
    from unite_and_conquer.samplers.comfy import sde as comfy_sde

    if config.output == "all":
        raise ValueError("the judges score one image per target: give the particles output 'draw' or 'best'")
    k = config.particles
    target = ed.targets(n, split, seed)
    handles = _handles(class16)
    conds = ed.conditions({m: handles[m].expert for m in ed.MODALITIES}, target)
    t0, images, moved, runs, summary = time.time(), [], 0, 0, ""
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        guider = _class16_guider(handles, conds, keys, w, start, stop, reliability, repeat=k)
        sigmas = comfy_sampling.compute_sigmas(guider, sampler_name, "karras", steps, 1.0)
        sampler = comfy_particles.with_particles(comfy_sde.sampler_object(sampler_name), config)
        latent = torch.zeros((stop - start) * k, 3, 32, 32)
        images.append(comfy_sampling.sample(guider, latent, seed * 1000 + start, sampler, sigmas,
                                            preview=False).clamp(-1, 1))
        moved, runs, summary = moved + sampler.last_corrector_report.levels, runs + 1, sampler.summary()
    per_move = correctors.evaluations_per_level(config.corrector) if config.corrector is not None else 0
    evaluations = round(k * (steps + per_move * moved / runs))
    return ed.scored(name, torch.cat(images), target, ed.Judges(), time.time() - t0, evaluations), summary


def particle_rows(n: int, split: str, steps: int, seed: int, weight, class16: Path, config, sampler_name: str,
                  reliability: str = "equal", jobs: int = 1):
    """The all-32 px product sampled by ``sampler_name`` without weights, at equal evaluations (K times
    the steps), and with ``config``'s particles; plus the particle summary. (Not the 16 px class expert:
    a lower-resolution expert weights the pooled null per band, which leaves the weights without a
    target, so particles refuse it: ``particles.check_bindings``.)"""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from unite_and_conquer.samplers.particles import ParticleConfig

    target = ed.targets(n, split, seed)
    results = [ed.scored("real held-out canvases (judges' check)", target.images, target, ed.Judges())]
    all32 = ("class", "colour", "layout")
    base = f"class 32 px, colour 32 px, layout 32 px, w = {ed.weight_label(weight)}" + ed.reliability_label(reliability)
    k = config.particles
    plain = ParticleConfig(particles=1, temperature=0.0, ess_threshold=0.0, output="best")
    specs = [(f"{base}, {sampler_name}, no weights", plain, steps),
             (f"{base}, {sampler_name}, no weights, {k * steps} steps (equal evaluations)", plain, k * steps),
             (f"{base}, {sampler_name}, {k} particles, lambda {config.temperature:g}, ESS threshold "
              f"{config.ess_threshold:g}, output {config.output}" +
              (f", move: {ed.corrector_label(config.corrector)} ({config.move})" if config.corrector else ""),
              config, steps)]
    run = partial(particle_row, keys=all32, w=weight, sampler_name=sampler_name, n=n, split=split, seed=seed,
                  class16=class16, reliability=reliability)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_particle_job, [(run, spec) for spec in specs]))
    else:
        rows = [_particle_job((run, spec)) for spec in specs]
    for r, _ in rows:
        print(ed._row(r), flush=True)
    return results + [r for r, _ in rows], rows[-1][1]


def _particle_job(job):
    run, (name, config, steps) = job
    return run(name, steps=steps, config=config)


def row_specs(steps: int, weight, extra_weights=(), corrected: bool = False, class16: Path | None = None,
              reliability: str = "equal", layout_sigma_min: float = 0.0):
    """The rows: all-32 px and 16 px class at ``weight`` (and the 16 px at ``extra_weights``); with
    ``corrected``, instead the 16 px class product plain, plain at as many product evaluations as
    the default corrector costs, and corrected by it. ``reliability`` and ``layout_sigma_min`` only
    name the rows here."""
    ra = ed.reliability_label(reliability) + layout_label(layout_sigma_min)

    def label(w):
        return ed.weight_label(w) + ra

    all32, small = ("class", "colour", "layout"), ("class16", "colour", "layout")
    name16 = f"class 16 px (k = 2), colour 32 px, layout 32 px, w = {label(weight)}"
    if not corrected:
        return ([(f"class 32 px, colour 32 px, layout 32 px, w = {label(weight)}", all32, weight, steps, None),
                 (name16, small, weight, steps, None)]
                + [(f"class 16 px (k = 2), colour 32 px, layout 32 px, w = {label(w)}", small, w, steps, None)
                   for w in extra_weights])
    from unite_and_conquer.samplers.comfy import sampling as comfy_sampling

    config = correctors.CorrectorConfig()
    handles = _handles(class16)
    one = ed.conditions({m: handles[m].expert for m in ed.MODALITIES}, ed.targets(1, "npm_heldout", 0))
    guider = _class16_guider(handles, one, small, weight, 0, 1)  # the sigmas depend only on the experts
    evals = correctors.run_evaluations(comfy_sampling.compute_sigmas(guider, "dpmpp_2m", "karras", steps, 1.0), config)
    return [(name16, small, weight, steps, None),
            (f"{name16}, plain, {evals} steps (equal evaluations)", small, weight, evals, None),
            (f"{name16}, {ed.corrector_label(config)} (the default corrector)", small, weight, steps, config)]


def sample_rows(n: int, split: str, steps: int, seed: int, weight, class16: Path, extra_weights=(),
                corrected: bool = False, jobs: int = 1, reliability: str = "equal", layout_sigma_min: float = 0.0):
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    target = ed.targets(n, split, seed)
    results = [ed.scored("real held-out canvases (judges' check)", target.images, target, ed.Judges())]
    print(ed._row(results[0]), flush=True)
    specs = row_specs(steps, weight, extra_weights, corrected, class16, reliability, layout_sigma_min)
    run = partial(sample_row, n=n, split=split, seed=seed, class16=class16, reliability=reliability,
                  layout_sigma_min=layout_sigma_min)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(run, specs))
    else:
        rows = [run(spec) for spec in specs]
    for r in rows:
        print(ed._row(r), flush=True)
    return results + rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--split", default="npm_heldout", choices=["npm_heldout", "heldout"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight", type=ed.parse_weight, default=(4.0, 2.0, 2.0))
    p.add_argument("--extra-weights", default="",
                   help="more rows with the 16 px class expert at these weights, comma separated (as --weight)")
    p.add_argument("--class16", default=str(REPO / "models_tiny" / "tiny_class_16.safetensors"))
    p.add_argument("--corrected", action="store_true",
                   help="the 16 px class product plain, at equal evaluations and with the default corrector, "
                        f"into the section '{CORRECTED_HEADING[3:]}'")
    p.add_argument("--reliabilities", default="equal", choices=ed.RELIABILITIES,
                   help="the products' reliabilities: 1/3 each, or each binding's weight (eval_digits.reliabilities)")
    p.add_argument("--layout-sigma-min", type=float, default=0.0,
                   help="the layout binding takes part only at sigma >= this (its noise window); 0: at every level")
    p.add_argument("--particles", type=int, default=0,
                   help="K > 0: the all-32 px product with K weighted particles per target (no noise window), "
                        f"beside the same sampler without weights, into the section '{PARTICLES_HEADING[3:]}'")
    p.add_argument("--particle-sampler", default="poe_euler_maruyama",
                   help="the stochastic sampler that moves the particles (poe_euler_maruyama or an ancestral / SDE one)")
    p.add_argument("--particle-lambda", type=float, default=1.0, help="the weight temperature lambda in [0, 1]")
    p.add_argument("--ess-threshold", type=float, default=0.5, help="resample a group below this ESS / K")
    p.add_argument("--particle-output", default="draw", choices=["draw", "best"])
    p.add_argument("--particle-move", default="", choices=["", "resampled", "levels"],
                   help="with the default corrector as the move step: after resampling, or at every level")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="rows sampled in parallel processes")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if str(COMFY) not in sys.path and importlib.util.find_spec("comfy") is None:
        sys.path.insert(0, str(COMFY))  # a script run outside ComfyUI uses the checkout's copy
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = comfy_args.cpu or not torch.cuda.is_available()
    t0 = time.time()
    extra = tuple(ed.parse_weight(w) for w in args.extra_weights.split(",") if w.strip())
    if args.particles:
        particles_main(args, argv, t0)
        return
    results = sample_rows(args.n, args.split, args.steps, args.seed, args.weight, Path(args.class16),
                          extra_weights=extra, corrected=args.corrected, jobs=args.jobs, reliability=args.reliabilities,
                          layout_sigma_min=args.layout_sigma_min)
    facts = run_facts("benchmarks/eval_digits_bands.py", argv,
                      f"{args.n} per row, split `{args.split}`, ComfyUI `dpmpp_2m` + `karras`, {args.steps} steps, "
                      f"through `PoEGuider` (the node path's guider), seed {args.seed}", t0, torch.get_num_threads(),
                      torch.__version__)
    reliabilities = "reliabilities 1/3" if args.reliabilities == "equal" else "reliabilities equal to the weights"
    suffix = ed.reliability_heading(args.reliabilities) + layout_label(args.layout_sigma_min)
    if args.layout_sigma_min:
        reliabilities += f", the layout binding only at sigma >= {args.layout_sigma_min:g} (its noise window)"
    if args.corrected:
        body = "\n".join([
            "The product of the 16 px class expert with the 32 px colour and layout experts (section "
            f"'{HEADING[3:]}'), "
            "sampled plain, plain with as many product evaluations as the corrected run, and with the default "
            "corrector (`CorrectorConfig()`, PoECorrector's defaults) through `CorrectedKSampler`. Same targets, "
            f"noise and judges; weights {ed.weight_label(args.weight)}, {reliabilities}.",
            "", *facts, "", ed.table(results), ""])
        publish(CORRECTED_HEADING + suffix, body, not args.no_write)
        return
    base, low = results[1].rates["all"], results[2].rates["all"]
    body = "\n".join([
        "The class expert trained on 2 x 2-pooled canvases (16 px, `tools/train_tiny.py --resolution 16 --patch 1`, "
        "tools/README.md stage 6) in the "
        "product with the 32 px colour and layout experts: the guider runs it on the pooled canvas at sigma / 2 and "
        "lifts its prediction into the piecewise-constant images (`samplers/bands.py`). Same targets, noise and "
        "judges as the all-32 px row; weights (class, colour, layout) = "
        f"{ed.weight_label(args.weight)}, {reliabilities}.",
        "",
        *facts,
        "",
        ed.table(results),
        "",
        f"Ratio of 'all three' (16 px class / all 32 px, both at w = {ed.weight_label(args.weight)}): "
        f"{low / base:.3f}" if base else "",
        "",
    ])
    publish(HEADING + suffix, body, not args.no_write)


def particles_main(args, argv, t0) -> None:
    from unite_and_conquer.samplers.particles import ParticleConfig

    if args.layout_sigma_min:
        raise SystemExit("--particles: a noise window leaves the weights without a target; drop --layout-sigma-min")
    move = {"move": args.particle_move, "corrector": correctors.CorrectorConfig()} if args.particle_move else {}
    config = ParticleConfig(particles=args.particles, temperature=args.particle_lambda,
                            ess_threshold=args.ess_threshold, output=args.particle_output, **move)
    results, summary = particle_rows(args.n, args.split, args.steps, args.seed, args.weight, Path(args.class16),
                                     config, args.particle_sampler, args.reliabilities, args.jobs)
    facts = run_facts("benchmarks/eval_digits_bands.py", argv,
                      f"{args.n} per row, split `{args.split}`, `{args.particle_sampler}` + `karras`, {args.steps} steps "
                      f"unless the row says otherwise, through `PoEGuider` and `ParticleKSampler`, seed {args.seed}",
                      t0, torch.get_num_threads(), torch.__version__)
    body = "\n".join([
        "The all-32 px product (class, colour and layout experts; particles refuse the 16 px class expert, whose "
        "per-band null leaves the weights without a target), the layout binding at every level (particles refuse "
        "noise windows), sampled without weights, without weights at K times the steps (equal evaluations), and with K "
        "Feynman-Kac particles per target, one output per target. Same targets and judges as eval_digits.py.",
        "", *facts, "", ed.table(results), "", "Particle summary of the last chunk:", "", "```", summary, "```", ""])
    publish(PARTICLES_HEADING + ed.reliability_heading(args.reliabilities), body, not args.no_write)


if __name__ == "__main__":
    main()
