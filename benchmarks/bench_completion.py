"""Digit completion: keep the top half of a held-out digit and complete the lower half.

    .venv/bin/python benchmarks/bench_completion.py -n 300 --split heldout --steps 20

Each target is a held-out canvas (``tools/digits.py``): its top 16 rows are known and kept exactly,
the lower 16 rows are generated. The class judge of ``benchmarks/eval_digits.py`` (an MNIST CNN on
the ink) then says whether the completed digit is still the digit it started as, and the colour
judge whether the new ink has the canvas's colour. Configurations:

- unconditional: the class expert's trained null alone (what the top half implies by itself);
- class + colour: the product of the class expert (the target's digit) and the colour expert (its
  colour word), weight w on both, reliabilities 1/2 (Unite and Conquer eq. 10);
- the same with RePaint resampling (``samplers.resampling``; jump length J, count R), which costs
  R times the evaluations.

Known pixels are handled as ComfyUI's inpainting wrapper does (``KSamplerX0Inpaint``): at each
evaluation the known pixels of ``x`` are replaced by the known image noised with one fixed noise to
the current level, and the prediction there by the known image.
"""
from __future__ import annotations

import argparse
import runpy
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))
from unite_and_conquer.benchmarks import eval_digits as ev  # noqa: E402
from unite_and_conquer.benchmarks.report import publish, run_facts  # noqa: E402
from unite_and_conquer.samplers import resampling  # noqa: E402
from unite_and_conquer.samplers.poe import Binding, product_prediction  # noqa: E402
from unite_and_conquer.tools import digits  # noqa: E402

HALF = digits.SIZE // 2
HEADING = "## Digit completion (known top half)"


def known_mask(n: int) -> torch.Tensor:
    """n x 1 x 32 x 32, 1 = generate (the lower half), 0 = keep (ComfyUI's noise-mask convention)."""
    mask = torch.zeros(n, 1, digits.SIZE, digits.SIZE)
    mask[:, :, HALF:] = 1
    return mask


def configurations(experts, conds, weight: float) -> dict[str, list[Binding]]:
    cls, col = experts["class"], experts["colour"]
    product = [Binding(cls, conds["class"], weight, 0.5, null=(cls.null_condition,), label="class"),
               Binding(col, conds["colour"], weight, 0.5, null=(col.null_condition,), label="colour")]
    return {
        "unconditional (class expert's null)": [Binding(cls, cls.null_condition, 1.0, 0.0, label="null")],
        "class expert alone": [Binding(cls, conds["class"], 1.0, 0.0, label="class")],
        f"class + colour product, w = {weight:g}": product,
    }


@torch.no_grad()
def complete(bindings, known: torch.Tensor, mask: torch.Tensor, steps: int, sampler: str, seed: int, sigma_range,
             jump: int = 1, count: int = 1) -> torch.Tensor:
    fn, karras = ev.k_sampler(sampler)
    lo, hi = sigma_range
    sigmas = karras(steps, lo, hi)
    g = torch.Generator().manual_seed(seed)
    fixed_noise = torch.randn(known.shape, generator=g)

    def model(x, sigma, **_):
        s = sigma.reshape(-1, 1, 1, 1)
        x = x * mask + (known + s * fixed_noise) * (1 - mask)
        eps, _pooled = product_prediction(x, sigma, bindings, ev.eps_fn)
        return (x - s * eps) * mask + known * (1 - mask)

    x = known + torch.randn(known.shape, generator=g) * sigmas[0]
    torch.manual_seed(seed)  # ancestral samplers draw their own noise
    moves = resampling.jump_schedule(steps, jump, count)
    for a, b in resampling.segments(moves, jump):
        if b < a:
            x = resampling.renoise(x, float(sigmas[a]), float(sigmas[b]), torch.randn(x.shape, generator=g))
        else:
            x = fn(model, x, sigmas[a:b + 1], disable=True)
    return (x * mask + known * (1 - mask)).clamp(-1, 1)


def run(n: int, split: str, steps: int, sampler: str, seed: int, weight: float, jump: int, count: int,
        models_dir: Path = REPO / "models_tiny", log=print):
    images, labels = digits.split(split)
    target = digits.make_canvases(images, labels, n, seed=2000 + seed)
    experts = {m: e for m, e in ev.load_experts(models_dir).items() if m in ("class", "colour")}
    judges = ev.Judges()
    conds = ev.conditions({**experts, "layout": _NoLayout()}, target)
    common = ev.common_range(experts)
    known, mask = target.images, known_mask(n)
    rows = [("real held-out canvases (judges' check)", judge(judges, target.images, target), 0.0, 0)]
    log(row(*rows[-1]))
    configs = list(configurations(experts, conds, weight).items())
    product_name, product = configs[-1]
    configs.append((f"{product_name}, RePaint J = {jump}, R = {count}", product))
    for name, bindings in configs:
        j, r = (jump, count) if "RePaint" in name else (1, 1)
        t0 = time.time()
        out = complete(bindings, known, mask, steps, sampler, seed, common, j, r)
        assert torch.equal(out[:, :, :HALF], known[:, :, :HALF].clamp(-1, 1))
        rows.append((name, judge(judges, out, target), time.time() - t0, resampling.intervals(
            resampling.jump_schedule(steps, j, r))))
        log(row(*rows[-1]))
    return rows


class _NoLayout:
    """``eval_digits.conditions`` also encodes a layout; this benchmark binds no layout expert."""

    def encode(self, *_args):
        return {}


def judge(judges, images, target) -> dict[str, float]:
    return {"class": float((judges.classes(images) == target.label).float().mean()),
            "colour": float((judges.colours(images) == target.colour).float().mean())}


def row(name, rates, seconds, evaluations) -> str:
    return f"| {name} | {rates['class']:.3f} | {rates['colour']:.3f} | {evaluations or '-'} | {seconds:.0f} |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=300, help="completions per configuration")
    p.add_argument("--split", default="heldout", choices=["npm_heldout", "heldout"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler", help="k-diffusion sampler name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight", type=float, default=2.0)
    p.add_argument("--jump", type=int, default=2)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = run(args.n, args.split, args.steps, args.sampler, args.seed, args.weight, args.jump, args.count)
    body = "\n".join([
        "The top 16 rows of held-out canvases are kept bit-exactly and the lower 16 rows are completed; the "
        "class judge of `benchmarks/eval_digits.py` asks whether the completed digit is the digit it started as, "
        "the colour judge whether the ink has the canvas's colour. See `benchmarks/bench_completion.py`.",
        "",
        *run_facts("benchmarks/bench_completion.py", argv,
                   f"{args.n} per row, split `{args.split}`, sampler `{args.sampler}`, {args.steps} steps, Karras "
                   f"sigmas over the class and colour experts' common range, seed {args.seed}",
                   t0, torch.get_num_threads(), torch.__version__),
        "",
        "| configuration | class | colour | sampler intervals | seconds |",
        "|---|---|---|---|---|",
        *[row(*r) for r in rows],
        "",
    ])
    publish(HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
