"""Overhead of a product step with MODEL bindings over the same models' own forwards.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_model_bindings.py            # into BENCHMARKS.md
    .venv/bin/python benchmarks/bench_model_bindings.py --no-write --iters 5                     # a quick look

Two tiny SD1.5-architecture UNets (ComfyUI's SD15 class and config at width 32, random weights,
different seeds), each bound with a prompt and a negative at weight 3 and reliability 0.5, so each
runs its condition and its null. The reference is what ComfyUI's own guider does per model and
step: one ``comfy.samplers.calc_cond_batch`` on ``[cond, uncond]`` with the conds prepared once.
The product step is ``ProductGuider.predict_noise`` (grouping, the level map, both models' same
calls, the rule), after the guider prepared its MODELs for the run. Ratio = product step / sum of
the two models' calc_cond_batch calls, timed alternately in each iteration (median of the
per-iteration ratios) after ``--warmup`` runs, CPU, one thread.
"""
from __future__ import annotations

import argparse
import datetime
import runpy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "ComfyUI"))
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

import torch  # noqa: E402

from unite_and_conquer.benchmarks.report import cpu_name, write_section  # noqa: E402
from unite_and_conquer.tests.support.comfy_harness import comfy_nodes  # noqa: E402

comfy_nodes()
import comfy.samplers  # noqa: E402

from unite_and_conquer.samplers import poe  # noqa: E402
from unite_and_conquer.samplers.comfy import model_experts  # noqa: E402
from unite_and_conquer.samplers.comfy.guider import ProductGuider  # noqa: E402
from unite_and_conquer.tests.support.tiny_comfy_models import text_conditioning, tiny_sd15  # noqa: E402

HEADING = "## MODEL bindings: product step vs the models' own calc_cond_batch"


def paired_times(a, b, warmup: int, iters: int) -> tuple[float, float, float]:
    """Medians of ``a`` and ``b`` and of the per-iteration ratio b / a, timed alternately so that a
    shared machine's load drift hits both alike."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb))


def measure(batch: int, size: int, warmup: int, iters: int) -> tuple[float, float, float]:
    models = [tiny_sd15(0), tiny_sd15(1)]
    conds = [(text_conditioning(1), text_conditioning(3)), (text_conditioning(2), text_conditioning(3))]
    bindings = [poe.Binding(model_experts.ModelSource(m, f"sd15-{i}"), {"conditioning": p}, 3.0, 0.5,
                            ({"conditioning": n},)) for i, (m, (p, n)) in enumerate(zip(models, conds))]
    guider = ProductGuider(bindings)
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((batch,), 2.0)
    sigmas = torch.tensor([2.0, 0.0])
    for m in guider.model_experts:
        m.prepare(x, torch.zeros_like(x), None, 0, torch.device("cpu"), sigmas)
    guider.inner_model = guider.model_patcher.model
    try:
        def own():
            for m in guider.model_experts:
                comfy.samplers.calc_cond_batch(m.model, m.prepared, x, sigma, m.options)

        def product():
            guider.predict_noise(x, sigma, {})

        with torch.inference_mode():
            return paired_times(own, product, warmup, iters)
    finally:
        for m in guider.model_experts:
            m.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=8, help="latent side (8 = a 64 px SD1.5 image)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for batch in (1, 4):
        own, product, ratio = measure(batch, args.size, args.warmup, args.iters)
        rows.append(f"| {batch} | {own * 1e3:.2f} | {product * 1e3:.2f} | {ratio:.3f} |")
        print(rows[-1], flush=True)
    body = "\n".join([
        f"Machine: {cpu_name()}, 1 thread, torch {torch.__version__}; {datetime.date.today().isoformat()}. "
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_model_bindings.py --iters {args.iters}`.",
        "",
        f"Two tiny SD1.5-architecture UNets (ComfyUI's SD15 class, width 32, random weights), latent "
        f"4 x {args.size} x {args.size}, each with a prompt and a negative (weight 3, reliability 0.5). "
        "Reference: each model's own `calc_cond_batch` on `[cond, uncond]`, as ComfyUI's guider runs it. "
        f"Times alternate within each of {args.iters} iterations; medians, and the median of the per-iteration "
        "ratios. Target ratio <= 1.10.",
        "",
        "| batch | own calc_cond_batch, both models (ms) | product step (ms) | ratio |",
        "|---:|---:|---:|---:|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
