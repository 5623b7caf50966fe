"""Feynman–Kac particles on products with a closed form: Gaussian products with a negative null
exponent, and a Gaussian-mixture product whose mode weights are known.

    .venv/bin/python benchmarks/bench_particles.py [--seeds 3] [--write]

Everything samples through the node path: ``ProductGuider`` with the pack's Euler–Maruyama sampler
(``poe_euler_maruyama``) or ComfyUI's ``euler_ancestral``, plain or inside ``ParticleKSampler``
(``samplers/comfy/particles.py``), Karras schedule over the experts' common range.

- **Gaussian products** (``analytic_cases.CASES``: every case has weights summing above 1, so its
  pooled nulls enter with negative exponents), at the cases' own 3 x 4 x 4 (48 dimensions) and at
  3 x 1 x 1 (3 dimensions), 200 steps. W2 between the per-pixel Gaussian fitted to the samples and the
  closed form, against the noise floor of as many exact samples; every figure is the mean over
  ``--seeds`` seeds. The ESS threshold and lambda are chosen on the first case ("choice") and reported
  on the other three.
- **8 particles per output** (``--only eight``): 512 outputs, each drawn by weight from its own group
  of 8 (4096 particles, ``output = "draw"``), against 512 samples of the same sampler without weights;
  the ESS threshold and lambda chosen on the first case, reported on the others and on fresh draws of
  their parameters.
- **What limits the weights** (``--only moves``): on the same products, exact weights at 800 steps and
  with 4096 particles (if the step were the limit, more steps would help; if the weights' spread is,
  more particles gain less than exact samples do), and MALA moves at every level with and without the
  weights at the same evaluations (the ESS threshold and the MALA steps per level chosen on the first
  case; reported on the others and on two fresh draws of their parameters).
- **A mixture product**: expert A's data are two modes (means -1 and +1, variance 0.2, weights 1/2
  each) over 3 x 2 x 2, expert B's N(0.05, 1); both at weight 1 with their nulls N(0, 1) and N(0, 2) at
  reliability 1/2, so the product is a two-mode mixture whose mode weights are (0.242, 0.758)
  (``tests/support/analytic.mixture_product``). Samples are assigned to the mode of larger posterior.

``--write`` puts the sections "## Particles: ..." at the end of BENCHMARKS.md (or replaces them).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import runpy
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

import torch  # noqa: E402

from unite_and_conquer.benchmarks import analytic_cases as cases  # noqa: E402
from unite_and_conquer.benchmarks.report import publish, run_facts  # noqa: E402
from unite_and_conquer.samplers.correctors import CorrectorConfig  # noqa: E402
from unite_and_conquer.samplers.particles import ParticleConfig  # noqa: E402

GAUSSIAN_HEADING = "## Particles: Gaussian products with a negative null exponent"
EIGHT_HEADING = "## Particles: 8 per output against the same sampler without weights"
MOVES_HEADING = "## Particles: what limits the weights, and MCMC moves at every level"
MIXTURE_HEADING = "## Particles: a Gaussian-mixture product with known mode weights"
STEPS = 200
SMALL = (3, 1, 1)
# Every Gaussian section runs each case at the suite's size and at 3 x 1 x 1.
SHAPES = [("48 dims", cases.SHAPE), ("3 dims", SMALL)]
# The screen on the choice case: (ESS threshold, lambda).
SCREEN = [(0.3, 1.0), (0.5, 1.0), (0.7, 1.0), (1.0, 1.0), (0.5, 0.5)]
# The moves section's screen on the choice case: (ESS threshold, MALA steps per level). MALA is exact on
# Gaussians, so the steps change nothing but how fast copies separate; the threshold decides how far the
# weights spread before the moves get copies to separate (1: resample at every step).
MOVE_SCREEN = [(0.5, 1), (0.5, 2), (0.5, 4), (1.0, 1), (1.0, 2), (1.0, 4)]
# (ESS threshold, MALA steps per level) on the mixture product: what the moves section chose from MOVE_SCREEN.
MIXTURE_MOVES = (1.0, 2)
# The 8-per-output section's screen on the choice case: (ESS threshold, lambda).
EIGHT_SCREEN = [(0.5, 1.0), (1.0, 1.0), (0.5, 0.5), (1.0, 0.5)]
# Fresh draws of the reported cases' parameters (seed + this), which no choice or reading has seen.
FRESH = 100


def modules():
    cases.comfy_modules()
    from unite_and_conquer.samplers.comfy import guider, particles, sampling, sde

    return guider, particles, sampling, sde


def sampler(name: str, config: ParticleConfig | None, corrector=None):
    """``name``'s sampler, with particles when ``config`` is given, else with ``corrector`` alone when given."""
    _, particles, sampling, sde = modules()
    base = sde.sampler_object(name)
    if config is not None:
        return particles.with_particles(base, config)
    if corrector is not None:
        from unite_and_conquer.samplers.comfy import correctors

        return correctors.with_corrector(base, corrector)
    return base


def sample(bindings, chosen, n: int, shape, seed: int, steps: int = STEPS):
    guider, _, sampling, _ = modules()
    g = guider.ProductGuider(bindings)
    sigmas = sampling.compute_sigmas(g, "euler", "karras", steps, 1.0)
    latent = torch.zeros(n, *shape)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return g.sample(noise, latent, chosen, sigmas, disable_pbar=True, seed=seed)


def gaussian_w2(case, name: str, config: ParticleConfig | None, outputs: int, seed: int,
                corrector: CorrectorConfig | None = None, steps: int = STEPS) -> tuple[float, int]:
    """(W2, product evaluations) of ``outputs`` images of ``case``: with K particles per output when
    ``config``, else with ``corrector`` alone when given (``sampler``). The evaluations are batched
    over the particles, so they are the evaluations per output."""
    from unite_and_conquer.samplers import poe

    chosen = sampler(name, config, corrector)
    per = config.particles if config is not None and config.output != "all" else 1
    bs = cases.bindings(case)
    network = poe.unwrap(bs[0].expert).network
    before = network.calls
    out = sample(bs, chosen, outputs * per, case.shape, seed, steps)
    mean, var = case.closed_form()
    return cases.w2(out, mean, var), network.calls - before


def mean_w2(case, name: str, config: ParticleConfig | None, outputs: int, seeds: int,
            corrector: CorrectorConfig | None = None, steps: int = STEPS) -> tuple[float, float]:
    """:func:`gaussian_w2`'s (W2, evaluations per output), each the mean over seeds 0 .. ``seeds`` - 1."""
    runs = [gaussian_w2(case, name, config, outputs, seed, corrector, steps) for seed in range(seeds)]
    return sum(r[0] for r in runs) / seeds, sum(r[1] for r in runs) / seeds


def floor(case, n: int, seeds: int) -> float:
    return sum(cases.noise_floor(case, n, seed) for seed in range(seeds)) / seeds


def floor_ratios(case, config: ParticleConfig, seeds: int) -> list[float]:
    """W2 / noise floor of 512 outputs of ``case`` with ``config`` (``poe_euler_maruyama``), at each of
    :data:`SHAPES`: what the 512-particle screens score."""
    ratios = []
    for _, shape in SHAPES:
        sized = dataclasses.replace(case, shape=shape)
        ratios.append(mean_w2(sized, "poe_euler_maruyama", config, 512, seeds)[0] / floor(sized, 512, seeds))
    return ratios


def describe(name: str, config: ParticleConfig | None, corrector: CorrectorConfig | None = None) -> str:
    if config is None:
        return f"{name}, no weights" + (f", MALA x {corrector.steps} at every level" if corrector is not None else "")
    per = f"{config.particles} per output, {config.output}" if config.output != "all" else \
        f"groups of {config.particles}, all after a final resampling"
    moves = f", MALA x {config.corrector.steps} at every level" if config.corrector is not None else ""
    return (f"{name}, particles ({per}), ESS threshold {config.ess_threshold:g}, lambda {config.temperature:g}"
            f"{moves}")


def gaussian_section(seeds: int, argv, t0) -> tuple[str, float, float]:
    choice, reported = cases.CASES[0], cases.CASES[1:]
    # Choice: the threshold and lambda on the first case, at both sizes.
    screen = ["| ESS threshold | lambda | " + " | ".join(f"W2 / floor, {label}" for label, _ in SHAPES) + " |",
              "|---:|---:|" + "---:|" * len(SHAPES)]
    scores = []
    for threshold, lam in SCREEN:
        ratios = floor_ratios(choice, ParticleConfig(particles=512, ess_threshold=threshold, temperature=lam), seeds)
        scores.append((sum(ratios), threshold, lam))
        screen.append(f"| {threshold:g} | {lam:g} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        print(screen[-1], flush=True)
    _, threshold, lam = min(scores)
    chosen = ParticleConfig(particles=512, ess_threshold=threshold, temperature=lam)
    exact = dataclasses.replace(chosen, temperature=1.0)
    rows = [("poe_euler_maruyama", None, 512), ("poe_euler_maruyama", chosen, 512),
            *([("poe_euler_maruyama", exact, 512)] if lam != 1.0 else []),
            ("euler_ancestral", None, 512), ("euler_ancestral", chosen, 512)]
    table = ["| case | dims | sampler | outputs | W2 | noise floor | W2 / floor |", "|---|---:|---|---:|---:|---:|---:|"]
    for case0 in reported:
        for label, shape in SHAPES:
            case = dataclasses.replace(case0, shape=shape)
            fl = floor(case, 512, seeds)
            for name, config, outputs in rows:
                w2 = mean_w2(case, name, config, outputs, seeds)[0]
                table.append(f"| {case.name} | {label} | {describe(name, config)} | {outputs} | {w2:.3f} | {fl:.3f} | "
                             f"{w2 / fl:.2f} |")
                print(table[-1], flush=True)
    accuracy = step_accuracy()
    return "\n".join([
        "Products of Gaussian experts with a closed form (`benchmarks/analytic_cases.py`; weights summing above 1, "
        "so the pooled nulls enter with negative exponents), sampled through PoEGuider with the pack's "
        "Euler–Maruyama step or ComfyUI's euler_ancestral, plain or with Feynman–Kac particles "
        "(`ParticleKSampler`), 200 Karras steps. W2 between the per-pixel Gaussian fitted to the outputs and the "
        f"closed form; every figure is the mean over {seeds} seeds, the floor that of as many exact samples. One "
        "particle run costs one product evaluation per particle and step, as the plain sampler.",
        "",
        *run_facts("benchmarks/bench_particles.py", argv, f"512 outputs per run, {seeds} seeds", t0, 1,
                   torch.__version__),
        "",
        f"Choice (on '{choice.name}', one group of 512 particles, output after a final resampling):",
        "",
        *screen,
        "",
        f"Chosen: ESS threshold {threshold:g}, lambda {lam:g}. Reported on the other cases:",
        "",
        *table,
        "",
        f"8 particles per output: '{EIGHT_HEADING[3:]}'.",
        "",
        "The step's own error, which no weight removes: one expert N(1, 0.5) alone over 3 x 1 x 1, 65536 samples, "
        "variance of the outputs / 0.5:",
        "",
        *accuracy,
        "",
    ]), threshold, lam


def step_accuracy() -> list[str]:
    """The Euler–Maruyama step alone on one Gaussian expert: its variance against the closed form."""
    from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
    from unite_and_conquer.samplers.comfy import models as comfy_models
    from unite_and_conquer.samplers.poe import Binding
    from unite_and_conquer.tests.support.analytic import gaussian, gaussian_expert

    handle = comfy_models.wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "gauss", 1))
    lines = ["| sampler | steps | variance ratio |", "|---|---:|---:|"]
    for name in ("poe_euler_maruyama", "euler_ancestral"):
        for steps in (200, 800):
            out = sample([Binding(handle, gaussian(1.0, 0.5))], sampler(name, None), 65536, SMALL, 0, steps)
            lines.append(f"| {name} | {steps} | {float(out.double().var()) / 0.5:.3f} |")
            print(lines[-1], flush=True)
    return lines


def eight_section(seeds: int, argv, t0) -> str:
    """8 particles per output (one drawn by weight) against the same sampler without weights."""
    choice, reported = cases.CASES[0], cases.CASES[1:]

    plain_w2: dict = {}   # the unweighted W2 of a case, shared by every setting screened on it

    def ratio(case, config) -> tuple[float, float, float]:
        if case not in plain_w2:
            plain_w2[case] = mean_w2(case, "poe_euler_maruyama", None, 512, seeds)[0]
        weighted, plain = mean_w2(case, "poe_euler_maruyama", config, 512, seeds)[0], plain_w2[case]
        return weighted / plain, weighted, plain

    def config(threshold, lam):
        return ParticleConfig(particles=8, ess_threshold=threshold, temperature=lam, output="draw")

    screen = ["| ESS threshold | lambda | " + " | ".join(f"W2 ratio, {label}" for label, _ in SHAPES) + " |",
              "|---:|---:|" + "---:|" * len(SHAPES)]
    scores = []
    for threshold, lam in EIGHT_SCREEN:
        ratios = [ratio(dataclasses.replace(choice, shape=shape), config(threshold, lam))[0] for _, shape in SHAPES]
        scores.append((sum(ratios), threshold, lam))
        screen.append(f"| {threshold:g} | {lam:g} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        print(screen[-1], flush=True)
    _, threshold, lam = min(scores)
    table = ["| case | parameters | dims | W2 with weights | W2 without | ratio |", "|---|---|---:|---:|---:|---:|"]
    for case0 in reported:
        for draw, seed in ((f"the case's own (seed {case0.seed})", case0.seed),
                           (f"fresh draw (seed {case0.seed + FRESH})", case0.seed + FRESH)):
            for label, shape in SHAPES:
                case = dataclasses.replace(case0, shape=shape, seed=seed)
                r, weighted, plain = ratio(case, config(threshold, lam))
                table.append(f"| {case.name} | {draw} | {label} | {weighted:.3f} | {plain:.3f} | {r:.2f} |")
                print(table[-1], flush=True)
    return "\n".join([
        "The Gaussian products of 'Particles: Gaussian products with a negative null exponent' (and fresh draws of "
        "their parameters), 200 Karras steps, the pack's Euler–Maruyama step: 512 outputs, each one particle drawn "
        "by weight from its own group of 8 (4096 particles, `output = \"draw\"`), against 512 samples of the same "
        f"sampler without weights. W2 as there; mean over {seeds} seeds. Target (issue 27): ratio <= 0.8.",
        "",
        *run_facts("benchmarks/bench_particles.py", argv, f"512 outputs per run, {seeds} seeds", t0, 1,
                   torch.__version__),
        "",
        f"Choice (on '{choice.name}', W2 with weights / W2 without):",
        "",
        *screen,
        "",
        f"Chosen: ESS threshold {threshold:g}, lambda {lam:g}. Reported on the other cases:",
        "",
        *table,
        "",
    ])


def mala(steps: int):
    """MALA at every level down to the last (no window): exact on the Gaussian products."""
    return CorrectorConfig(method="mala", steps=steps, sigma_window=(0.0, math.inf))


def moves_section(seeds: int, argv, t0) -> str:
    """Why 512 weighted particles stay above the floor, and what MCMC moves at every level give."""
    choice, reported = cases.CASES[0], cases.CASES[1:]
    exact = ParticleConfig(particles=512, ess_threshold=0.5, temperature=1.0)

    screen = ["| ESS threshold | MALA steps per level | " + " | ".join(f"W2 / floor, {label}" for label, _ in SHAPES)
              + " |", "|---:|---:|" + "---:|" * len(SHAPES)]
    scores = []
    for threshold, steps in MOVE_SCREEN:
        ratios = floor_ratios(choice, dataclasses.replace(exact, ess_threshold=threshold, corrector=mala(steps),
                                                          move="levels"), seeds)
        scores.append((sum(ratios), threshold, steps))
        screen.append(f"| {threshold:g} | {steps} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        print(screen[-1], flush=True)
    _, threshold, moves = min(scores)
    moved = dataclasses.replace(exact, ess_threshold=threshold, corrector=mala(moves), move="levels")
    rows = [("particles, 200 steps", exact, None, 512, STEPS),
            ("particles, 800 steps", exact, None, 512, 4 * STEPS),
            ("particles, one group of 4096, 200 steps", dataclasses.replace(exact, particles=4096), None, 4096, STEPS),
            (f"particles (ESS threshold {threshold:g}) + MALA x {moves} at every level, 200 steps", moved, None, 512,
             STEPS),
            (f"MALA x {moves} at every level alone (no weights), 200 steps", None, mala(moves), 512, STEPS)]
    table = ["| case | dims | sampler | outputs | evaluations per output | W2 | noise floor | W2 / floor |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for case0 in reported:
        # The second fresh draw came with the ESS threshold in the screen: the first had been read under the
        # earlier choice, so the second is the one that no choice or reading has seen.
        draws = [("", case0.seed), (f", fresh draw (seed {case0.seed + FRESH})", case0.seed + FRESH),
                 (f", second fresh draw (seed {case0.seed + 2 * FRESH})", case0.seed + 2 * FRESH)]
        for draw, seed in draws:
            for label, shape in SHAPES:
                case = dataclasses.replace(case0, shape=shape, seed=seed)
                for name, config, corrector, n, steps in rows:
                    w2, evaluations = mean_w2(case, "poe_euler_maruyama", config, n, seeds, corrector, steps)
                    fl = floor(case, n, seeds)
                    table.append(f"| {case.name}{draw} | {label} | {name} | {n} | {evaluations:.0f} | {w2:.3f} | "
                                 f"{fl:.3f} | {w2 / fl:.2f} |")
                    print(table[-1], flush=True)
    return "\n".join([
        "The Gaussian products of 'Particles: Gaussian products with a negative null exponent', with exact weights "
        "(lambda 1, ESS threshold 0.5, all particles after a final resampling) and the pack's Euler–Maruyama step: "
        "more steps, more particles (W2 against the floor of as many exact samples), and MALA moves at every level "
        "(`ParticleConfig.move = \"levels\"`; MALA's accept step makes it exact on a Gaussian pi_sigma, so the "
        "weights stay exact) with the ESS threshold screened again for them, against the same MALA without weights "
        "at the same evaluations. Evaluations per output count the product's evaluations (batched over the "
        f"particles). Mean over {seeds} seeds.",
        "",
        *run_facts("benchmarks/bench_particles.py", argv, f"512 or 4096 outputs per run, {seeds} seeds", t0, 1,
                   torch.__version__),
        "",
        f"Choice (on '{choice.name}', particles with moves: the ESS threshold and the MALA steps per level; the "
        "lowest sum of the two ratios):",
        "",
        *screen,
        "",
        f"Chosen: ESS threshold {threshold:g}, MALA x {moves}. Reported on the other cases and on two fresh draws of "
        "their parameters:",
        "",
        *table,
        "",
    ])


def mixture_setup():
    from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
    from unite_and_conquer.samplers.poe import Binding
    from unite_and_conquer.tests.support import analytic

    models = modules()[0]  # noqa: F841  (ComfyUI is up)
    from unite_and_conquer.samplers.comfy import models as comfy_models

    shape = (3, 2, 2)
    a = comfy_models.wrap_expert(analytic.mixture_expert(alphas_cumprod_for("linear"), "mixture", 2))
    b = comfy_models.wrap_expert(analytic.gaussian_expert(alphas_cumprod_for("cosine"), "gauss", 2))
    full = lambda v: torch.full((1, *shape), float(v))  # noqa: E731
    bindings = [Binding(a, analytic.mixture([-1.0, 1.0], [0.2, 0.2], [0.5, 0.5], shape), 1.0, 0.5,
                        (analytic.mixture([0.0, 0.0], [1.0, 1.0], [1.0, 1.0], shape),), label="two modes"),
                Binding(b, {"mu": full(0.05), "var": full(1.0)}, 1.0, 0.5, ({"mu": full(0.0), "var": full(2.0)},),
                        label="gaussian")]
    truth = analytic.mixture_product(
        [(full(-1.0)[0].double(), full(0.2)[0].double(), 0.5), (full(1.0)[0].double(), full(0.2)[0].double(), 0.5)],
        [(full(0.05)[0].double(), full(1.0)[0].double(), 1.0), (full(0.0)[0].double(), full(1.0)[0].double(), -0.5),
         (full(0.0)[0].double(), full(2.0)[0].double(), -0.5)])
    return bindings, truth, shape


def mode_of(samples: torch.Tensor, truth) -> torch.Tensor:
    logs = torch.stack([math.log(w) - ((samples.double() - m) ** 2 / (2 * v) + 0.5 * torch.log(2 * math.pi * v)).flatten(1).sum(1)
                        for w, m, v in truth])
    return logs.argmax(0)


def mixture_section(seeds: int, argv, t0, threshold: float, lam: float) -> str:
    bindings, truth, shape = mixture_setup()
    lams = sorted({lam, 1.0}, reverse=True)
    exact_512 = ParticleConfig(particles=512, ess_threshold=threshold, temperature=1.0)
    rows = [("poe_euler_maruyama", None, None, 4096), ("euler_ancestral", None, None, 4096),
            *[("poe_euler_maruyama", ParticleConfig(particles=512, ess_threshold=threshold, temperature=t), None, 4096)
              for t in lams],
            ("euler_ancestral", ParticleConfig(particles=512, ess_threshold=threshold, temperature=lam), None, 4096),
            ("poe_euler_maruyama", dataclasses.replace(exact_512, ess_threshold=MIXTURE_MOVES[0],
                                                       corrector=mala(MIXTURE_MOVES[1]), move="levels"), None, 4096),
            ("poe_euler_maruyama", None, mala(MIXTURE_MOVES[1]), 4096),
            *[("poe_euler_maruyama", ParticleConfig(particles=8, ess_threshold=threshold, temperature=t, output="draw"),
               None, 512) for t in lams]]
    table = ["| sampler | outputs | share of mode 2 | per-mode variance / closed form (mode 1, mode 2) |",
             "|---|---:|---:|---|",
             f"| closed form | - | {truth[1][0]:.3f} | 1, 1 |"]
    for name, config, corrector, outputs in rows:
        shares, ratios = [], []
        for seed in range(seeds):
            per = config.particles if config is not None and config.output != "all" else 1
            out = sample(bindings, sampler(name, config, corrector), outputs * per, shape, seed)
            mode = mode_of(out, truth)
            shares.append(float((mode == 1).double().mean()))
            ratios.append([float(out[mode == c].double().var(0).mean() / truth[c][2].mean()) if (mode == c).sum() > 2
                           else float("nan") for c in (0, 1)])
        r = [sum(x[c] for x in ratios) / seeds for c in (0, 1)]
        table.append(f"| {describe(name, config, corrector)} | {outputs} | {sum(shares) / seeds:.3f} | "
                     f"{r[0]:.2f}, {r[1]:.2f} |")
        print(table[-1], flush=True)
    return "\n".join([
        "Expert A's data are two modes over 3 x 2 x 2 (means -1 and +1 in every pixel, variance 0.2, weights 1/2 "
        "each; `tests/support/analytic.GaussianMixtureEps`), expert B's N(0.05, 1); both at weight 1, with their "
        "nulls N(0, 1) and N(0, 2) at reliability 1/2. The product is a two-mode mixture whose second mode weighs "
        f"{truth[1][0]:.3f} (`analytic.mixture_product`); each output is assigned to the mode of larger posterior. "
        f"Through PoEGuider, 200 Karras steps, ESS threshold {threshold:g} as chosen in '{GAUSSIAN_HEADING[3:]}', "
        f"lambda 1 (exact) and the chosen {lam:g}; MALA x {MIXTURE_MOVES[1]} at every level with exact weights "
        f"resampled at ESS threshold {MIXTURE_MOVES[0]:g} (the choice in '{MOVES_HEADING[3:]}'), and the same MALA "
        f"without weights; mean over {seeds} seeds.",
        "",
        *run_facts("benchmarks/bench_particles.py", argv, f"as in the table, {seeds} seeds", t0, 1, torch.__version__),
        "",
        *table,
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=["gaussian", "eight", "moves", "mixture"], help="one section")
    parser.add_argument("--threshold", type=float, default=None, help="with --only mixture: the chosen ESS threshold")
    parser.add_argument("--lam", type=float, default=1.0, help="with --only mixture: the chosen lambda")
    parser.add_argument("--write", action="store_true", help="write the sections into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    threshold, lam = args.threshold, args.lam
    if args.only in (None, "gaussian"):
        body, threshold, lam = gaussian_section(args.seeds, argv, t0)
        publish(GAUSSIAN_HEADING, body, args.write)
    if args.only in (None, "eight"):
        publish(EIGHT_HEADING, eight_section(args.seeds, argv, time.time()), args.write)
    if args.only in (None, "moves"):
        publish(MOVES_HEADING, moves_section(args.seeds, argv, time.time()), args.write)
    if args.only in (None, "mixture"):
        publish(MIXTURE_HEADING, mixture_section(args.seeds, argv, time.time(), threshold if threshold is not None else 0.5,
                                                 lam), args.write)


if __name__ == "__main__":
    main()
