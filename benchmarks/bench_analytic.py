"""Analytic products: plain vs MCMC-corrected sampling, and the corrector's step rules, against the closed form.

The cases of ``benchmarks/analytic_cases.py`` (per-pixel Gaussian experts over 3 x 4 x 4, a
different null per expert, weights above 1, two or three experts on the linear and cosine
schedules), each sampled through the node path (``PoEGuider`` with ComfyUI's samplers and
``CorrectedKSampler``) and scored by W2 against the closed form.

    .venv/bin/python benchmarks/bench_analytic.py [--samples 4096] [--write]

``--write`` replaces the section "## Analytic products: corrector step rules" of BENCHMARKS.md
(and nothing else).
"""
from __future__ import annotations

import argparse
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

HEADING = "## Analytic products: corrector step rules"
OLD_NODE = CorrectorConfig(steps=6, step_scale=0.05, sigma_window=(0.6, math.inf), step_rule="sigma2")
OLD_LIBRARY = CorrectorConfig(steps=2, step_scale=0.5, sigma_window=(0.05, math.inf), step_rule="sigma2")
FROM_005 = (0.05, math.inf)  # the screening window of the step rules below

# (label, sampler, steps, corrector): every corrected row costs at most 200 product evaluations.
ROWS = [
    ("plain", "dpmpp_2m", 30, None),
    ("plain", "euler", 200, None),
    ("plain", "euler_ancestral", 200, None),
    ("former node default", "euler", 30, OLD_NODE),
    ("former library default", "euler", 60, OLD_LIBRARY),
    ("sigma^2 steps", "euler", 40, CorrectorConfig(steps=4, step_scale=0.3, step_rule="sigma2", sigma_window=FROM_005)),
    ("SNR steps, r = 0.15", "euler", 40, CorrectorConfig(steps=4, snr=0.15, sigma_window=FROM_005)),
    ("SNR steps, r = 0.2 (session 5 default)", "euler", 40, CorrectorConfig(steps=4, snr=0.2, sigma_window=FROM_005)),
    ("SNR steps, r = 0.25", "euler", 40, CorrectorConfig(steps=4, snr=0.25, sigma_window=FROM_005)),
    ("SNR steps, r = 0.2, from sigma 0.08", "euler", 40,
     CorrectorConfig(steps=4, snr=0.2, sigma_window=(0.08, math.inf))),
    ("SNR steps, r = 0.15, from sigma 0.08", "euler", 40,
     CorrectorConfig(steps=4, snr=0.15, sigma_window=(0.08, math.inf))),
    ("default", "euler", 40, CorrectorConfig()),
    ("default, second-order predictor", "heun", 30, CorrectorConfig()),
    ("ULA, SNR steps", "euler", 40, CorrectorConfig(method="ula", steps=4, snr=0.16, sigma_window=FROM_005)),
    ("MALA, SNR steps", "euler", 40, CorrectorConfig(method="mala", steps=3, snr=0.3, sigma_window=FROM_005)),
]


def describe(c: CorrectorConfig | None) -> str:
    if c is None:
        return "-"
    step = f"SNR r = {c.snr:g}" if c.step_rule == "snr" else f"{c.step_scale:g} sigma^2"
    lo, hi = c.sigma_window
    return f"{c.method} {c.steps} x {step}, sigma in [{lo:g}, {hi:g}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="images of 3 x 4 x 4 per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", help="only the rows with these labels (default: all)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    head = ["| run | sampler | steps | corrector | evaluations | " + " | ".join(c.name for c in cases.CASES) + " |",
            "|---|---|---:|---|---:|" + "---:|" * len(cases.CASES)]
    floors = [cases.noise_floor(c, args.samples, args.seed) for c in cases.CASES]
    lines = head + ["| exact samples (noise floor) | - | - | - | - | " + " | ".join(f"{f:.3f}" for f in floors) + " |"]
    print("\n".join(lines), flush=True)
    for label, sampler, steps, config in ROWS:
        if args.rows and label not in args.rows:
            continue
        runs = [cases.run(c, sampler, steps, config, args.samples, args.seed) for c in cases.CASES]
        lines.append(f"| {label} | {sampler} | {steps} | {describe(config)} | {runs[0].evaluations} | "
                     + " | ".join(f"{r.w2:.3f}" for r in runs) + " |")
        print(lines[-1], flush=True)
    body = "\n".join([
        "Products of Gaussian experts with a closed form (`benchmarks/analytic_cases.py`): per-pixel means and "
        "variances over 3 x 4 x 4, a different null per expert, weights above 1, two or three experts on the "
        "linear and cosine schedules. Sampled through PoEGuider with ComfyUI's samplers and CorrectedKSampler "
        "(the node path), Karras schedule; W2 between the per-pixel Gaussian fitted to the samples and the closed "
        "form, summed over the 48 pixels. Evaluations are product evaluations per sample.",
        "",
        *run_facts("benchmarks/bench_analytic.py", argv, f"{args.samples} per run, seed {args.seed}", t0, 1,
                   torch.__version__),
        "",
        *lines,
        "",
    ])
    publish(HEADING, body, args.write)


if __name__ == "__main__":
    main()
