"""OR and AND of two Gaussian experts by their Itô log-densities (SuperDiff), against closed forms.

    .venv/bin/python benchmarks/bench_superposition.py [--write]

Both sample through the node path: ``ProductGuider`` over two bindings of one analytic expert
(``tests/support/analytic.gaussian_expert``, linear schedule, 3 x 4 x 4) made a group by
``superposition.make_group`` (what PoEOrGroup / PoEAndGroup do), with the pack's Euler–Maruyama
sampler (``poe_euler_maruyama``), Karras schedule unless said otherwise.

- **OR**: member A is N(-1, 0.1), member B N(+1, 0.4) in every pixel (variances 4x apart), prior
  weights (pi, 1 - pi) for pi = 0.5 and 0.8, 4096 samples, 200 steps. Each sample is assigned to the
  member of larger density; per-mode variance is the mean over pixels of the sample variance, against
  the member's own. Beside it: the authors' Stable Diffusion script's OR estimator (the |eps|^2 term
  with a plus sign), and the mixture of scores at the fixed coefficients pi (no log-densities).
- **AND**: the mean |log q1(x) - log q2(x)| of the outputs (the members' data densities, closed form)
  and the mean of (log q1 + log q2) / 2, for AND and for fixed 0.5 averaging (the members at 1/2 each
  at every step). The clip range is chosen on the pair A = N(-0.5, 0.5), B = N(0.5, 1.0) at 400 steps,
  then ComfyUI's scheduler on the same pair at 200 steps (:data:`AND_SCHEDULERS`), and both are reported
  on pairs with per-pixel means in [-0.5, 0.5] and variances in [0.2, 1.0], each drawn from a seed
  (``REPORT_SEEDS``), at 200, 400 and 1000 steps, with Karras and with the chosen scheduler.

``--write`` puts the sections "## OR / AND: ..." at the end of BENCHMARKS.md (or replaces them).
"""
from __future__ import annotations

import argparse
import contextlib
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
from unite_and_conquer.samplers import superposition  # noqa: E402

OR_HEADING = "## OR / AND: OR of two Gaussians with different variances"
AND_HEADING = "## OR / AND: AND of two Gaussians"
SHAPE = (3, 4, 4)
CLIPS = [(-1.0, 2.0), (-10.0, 11.0), (-100.0, 101.0)]
# Seeds of the pairs AND is reported on (27 was the first; 28 and 29 were added after the step count
# that meets the target was read off 27, so they check it on pairs no reading has seen).
REPORT_SEEDS = (27, 28, 29)
# ComfyUI's schedulers (those of 0.3.75 and 0.33.0) screened for AND at 200 steps. The Itô estimator's error
# is made per step where sigma^2 is near the members' variances, so how a schedule spends its steps there
# decides how well the members' densities are tracked at a given step count.
AND_SCHEDULERS = ("karras", "exponential", "normal", "simple", "sgm_uniform", "ddim_uniform", "beta",
                  "linear_quadratic", "kl_optimal")


def expert():
    cases.comfy_modules()
    from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
    from unite_and_conquer.samplers.comfy import models
    from unite_and_conquer.tests.support.analytic import gaussian_expert

    return models.wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "gauss", SHAPE[-1]))


def condition(m, v):
    return {"mu": torch.as_tensor(m, dtype=torch.float32).expand(1, *SHAPE).clone(),
            "var": torch.as_tensor(v, dtype=torch.float32).expand(1, *SHAPE).clone()}


def members(handle, a, b, weights=(1.0, 1.0)):
    from unite_and_conquer.samplers.poe import Binding

    return [Binding(handle, condition(*a), weights[0], 0.0, label="A"), Binding(handle, condition(*b), weights[1], 0.0,
                                                                              label="B")]


def sample(bindings, n: int, steps: int, seed: int = 0, scheduler: str = "karras"):
    from unite_and_conquer.samplers.comfy import guider, sampling, sde

    g = guider.ProductGuider(bindings)
    sigmas = sampling.compute_sigmas(g, "euler", scheduler, steps, 1.0)
    latent = torch.zeros(n, *SHAPE)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    chosen = sde.SDEKSampler()
    return g.sample(noise, latent, chosen, sigmas, disable_pbar=True, seed=seed), chosen.last_report


def log_q(x, m, v):
    m, v = torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64)
    return (-(x.double() - m) ** 2 / (2 * v) - 0.5 * torch.log(2 * math.pi * v)).flatten(1).sum(1)


@contextlib.contextmanager
def authors_or_sign():
    """The OR branch of the authors' SD script: ``-<eps, dx> / sigma + delta / (2 sigma^2) |eps|^2``."""
    right = superposition.ito_increment

    def plus(eps, x, x_next, sigma, sigma_next):
        if not math.isfinite(sigma):
            return right(eps, x, x_next, sigma, sigma_next)
        delta = sigma**2 - sigma_next**2
        return -superposition._dot(eps, x_next - x) / sigma + delta / (2 * sigma**2) * superposition._dot(eps, eps)

    superposition.ito_increment = plus
    try:
        yield
    finally:
        superposition.ito_increment = right


def or_section(argv, t0, n: int, steps: int) -> str:
    handle = expert()
    a, b = (-1.0, 0.1), (1.0, 0.4)
    table = ["| pi (A) | sampler | share of A | share - pi | variance / member's (A, B) |", "|---:|---|---:|---:|---|"]
    for pi in (0.5, 0.8):
        for label in ("OR (SuperDiff, Itô log-densities)", "OR with the authors' SD-script sign",
                      "fixed coefficients pi (mixture of scores)"):
            if label.startswith("fixed"):
                bindings = members(handle, a, b, (pi, 1 - pi))
            else:
                bindings = superposition.make_group(members(handle, a, b), [0, 1], "or", 1.0, [pi, 1 - pi])
            with authors_or_sign() if "authors" in label else contextlib.nullcontext():
                out, _ = sample(bindings, n, steps)
            in_a = log_q(out, *a) > log_q(out, *b)
            share = float(in_a.double().mean())
            var = [float(out[m].double().var(0).mean()) / v if int(m.sum()) > 2 else float("nan")
                   for m, v in ((in_a, a[1]), (~in_a, b[1]))]
            table.append(f"| {pi:g} | {label} | {share:.3f} | {share - pi:+.3f} | {var[0]:.3f}, {var[1]:.3f} |")
            print(table[-1], flush=True)
    return "\n".join([
        "Member A = N(-1, 0.1), member B = N(+1, 0.4) in each of 3 x 4 x 4 pixels (one analytic expert, linear "
        "schedule, two conditions), made an OR group with prior weights (pi, 1 - pi) and sampled through PoEGuider "
        f"with `poe_euler_maruyama`, {steps} Karras steps, {n} samples, seed 0. A sample belongs to the member of "
        "larger density; its variance is the mean over pixels of the per-pixel sample variance, divided by the "
        "member's. Targets (issue 27): share within 0.03 of pi, variances within 10%.",
        "",
        *run_facts("benchmarks/bench_superposition.py", argv, f"{n} per row", t0, 1, torch.__version__),
        "",
        *table,
        "",
    ])


def and_metrics(bindings, a, b, n: int, steps: int, scheduler: str = "karras") -> tuple[float, float, str]:
    out, report = sample(bindings, n, steps, scheduler=scheduler)
    la, lb = log_q(out, *a), log_q(out, *b)
    return float((la - lb).abs().mean()), float(((la + lb) / 2).mean()), report.summary()


def and_group_metrics(handle, pair, clip, n: int, steps: int, scheduler: str = "karras") -> tuple[float, float, str]:
    """:func:`and_metrics` of the pair's two members made an AND group (weight 1) clipped to ``clip``."""
    bindings = superposition.make_group(members(handle, *pair), [0, 1], "and", 1.0, None, clip)
    return and_metrics(bindings, *pair, n, steps, scheduler)


def reported_pair(seed: int):
    """Two members with per-pixel means in [-0.5, 0.5] and variances in [0.2, 1.0], drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: lo + (hi - lo) * torch.rand(1, *SHAPE, generator=g)  # noqa: E731
    return (draw(-0.5, 0.5), draw(0.2, 1.0)), (draw(-0.5, 0.5), draw(0.2, 1.0))


def and_section(argv, t0, n: int) -> str:
    handle = expert()
    choice = ((-0.5, 0.5), (0.5, 1.0))
    pairs = {seed: reported_pair(seed) for seed in REPORT_SEEDS}
    screen = ["| clip | steps | mean abs(log q1 - log q2) | mean (log q1 + log q2) / 2 | coefficients |",
              "|---|---:|---:|---:|---|"]
    scores = []
    for clip in CLIPS:
        gap, mean_log, summary = and_group_metrics(handle, choice, clip, n, 400)
        scores.append((gap, clip))
        screen.append(f"| [{clip[0]:g}, {clip[1]:g}] | 400 | {gap:.3f} | {mean_log:.2f} | {summary.split(': ', 1)[1]} |")
        print(screen[-1], flush=True)
    clip = min(scores)[1]
    schedules = ["| scheduler | steps | mean abs(log q1 - log q2) | mean (log q1 + log q2) / 2 |",
                 "|---|---:|---:|---:|"]
    scores = []
    for scheduler in AND_SCHEDULERS:
        gap, mean_log, _ = and_group_metrics(handle, choice, clip, n, 200, scheduler)
        scores.append((gap, scheduler))
        schedules.append(f"| {scheduler} | 200 | {gap:.3f} | {mean_log:.2f} |")
        print(schedules[-1], flush=True)
    scheduler = min(scores)[1]
    table = ["| pair (seed) | sampler | scheduler | steps | mean abs(log q1 - log q2) | mean (log q1 + log q2) / 2 |",
             "|---:|---|---|---:|---:|---:|"]
    for seed, reported in pairs.items():
        for steps in (200, 400, 1000):
            for sched in dict.fromkeys(("karras", scheduler)):
                gap, mean_log, summary = and_group_metrics(handle, reported, clip, n, steps, sched)
                table.append(f"| {seed} | AND, clip [{clip[0]:g}, {clip[1]:g}] | {sched} | {steps} | {gap:.3f} | "
                             f"{mean_log:.2f} |")
                print(table[-1], summary, flush=True)
                gap, mean_log, _ = and_metrics(members(handle, *reported, (0.5, 0.5)), *reported, n, steps, sched)
                table.append(f"| {seed} | fixed 0.5 averaging | {sched} | {steps} | {gap:.3f} | {mean_log:.2f} |")
                print(table[-1], flush=True)
    return "\n".join([
        "Two members of one analytic expert (linear schedule, 3 x 4 x 4) made an AND group (weight 1) and sampled "
        f"through PoEGuider with `poe_euler_maruyama`, {n} samples, seed 0; beside it the same two bindings at fixed "
        "weights 1/2 each (the rule's average), same sampler and scheduler. q1 and q2 are the members' data densities "
        "(closed form) at the outputs. Target (issue 27): mean abs(log q1 - log q2) <= 0.3 nats.",
        "",
        *run_facts("benchmarks/bench_superposition.py", argv, f"{n} per row", t0, 1, torch.__version__),
        "",
        "Choice of the clip range, on A = N(-0.5, 0.5), B = N(0.5, 1.0) in every pixel (Karras, 400 steps):",
        "",
        *screen,
        "",
        f"Chosen: [{clip[0]:g}, {clip[1]:g}]. Then ComfyUI's scheduler, on the same pair at 200 steps with that clip "
        "(the lowest gap):",
        "",
        *schedules,
        "",
        f"Chosen: {scheduler}. Reported on {len(pairs)} pairs, each with per-pixel means in [-0.5, 0.5] and variances "
        f"in [0.2, 1.0] drawn from a seed ({', '.join(str(seed) for seed in pairs)}), with Karras (the clip's "
        f"schedule) and with {scheduler}:",
        "",
        *table,
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="OR samples per row")
    parser.add_argument("--and-samples", type=int, default=1024, help="AND samples per row")
    parser.add_argument("--only", choices=["or", "and"])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.only != "and":
        publish(OR_HEADING, or_section(argv, time.time(), args.samples, 200), args.write)
    if args.only != "or":
        publish(AND_HEADING, and_section(argv, time.time(), args.and_samples), args.write)


if __name__ == "__main__":
    main()
