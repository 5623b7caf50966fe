"""Multimodal digits with a class expert at 16 px guiding the 32 px colour and layout experts.

    .venv/bin/python benchmarks/eval_digits_bands.py                     # 1000 samples, npm held-out digits
    .venv/bin/python benchmarks/eval_digits_bands.py -n 200 --no-write

Both rows run through the pack's ComfyUI guider (``PoEGuider``, what PoEKSampler and
SamplerCustomAdvanced run) with ComfyUI's ``dpmpp_2m`` sampler and ``karras`` scheduler, on the
same targets, noise and judges as ``eval_digits.py``: the all-32 px product at weights (4, 2, 2)
and reliabilities 1/3, and the same product with the class expert replaced by one trained on
2 x 2-pooled canvases (``tools/train_tiny.py --resolution 16 --patch 1``: the 32 px network's token
grid on the 16 px canvas), which the guider evaluates on the pooled canvas at sigma / 2 and lifts
into the piecewise-constant images (``samplers/bands.py``).
"""
from __future__ import annotations

import argparse
import importlib.util
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
from unite_and_conquer.samplers.poe import Binding  # noqa: E402

HEADING = "## Multimodal digits: a 16 px class expert on the 32 px canvas"


def sample_rows(n: int, split: str, steps: int, seed: int, weight, class16: Path, chunk: int = 250,
                extra_weights=()):
    from unite_and_conquer.samplers.comfy import guider as comfy_guider
    from unite_and_conquer.samplers.comfy import models as comfy_models
    from unite_and_conquer.samplers.comfy import sampling as comfy_sampling

    target = ed.targets(n, split, seed)
    experts = ed.load_experts(REPO / "models_tiny")
    conds = ed.conditions(experts, target)
    small = load_expert(str(class16), family="auto")
    handles = {m: comfy_models.wrap_expert(e) for m, e in experts.items()}
    handles["class16"] = comfy_models.wrap_expert(small)
    judges = ed.Judges()
    label = ed.weight_label
    rows = {f"class 32 px, colour 32 px, layout 32 px, w = {label(weight)}": (("class", "colour", "layout"), weight),
            f"class 16 px (k = 2), colour 32 px, layout 32 px, w = {label(weight)}": (("class16", "colour", "layout"),
                                                                                     weight)}
    for w in extra_weights:
        rows[f"class 16 px (k = 2), colour 32 px, layout 32 px, w = {label(w)}"] = (("class16", "colour", "layout"), w)
    results = [ed.Result("real held-out canvases (judges' check)", ed._rates(judges.score(target.images, target)), 0.0)]
    print(ed._row(results[0]), flush=True)
    for name, (keys, w) in rows.items():
        ws = ed.per_modality(w)
        t0 = time.time()
        images = []
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            bindings = []
            for key in keys:
                m = "class" if key == "class16" else key
                cond = {k: v[start:stop] for k, v in conds[m].items()}
                bindings.append(Binding(handles[key], cond, ws[m], 1 / 3, null=(handles[key].expert.null_condition,),
                                        label=m))
            guider = comfy_guider.ProductGuider(bindings)
            sigmas = comfy_sampling.compute_sigmas(guider, "dpmpp_2m", "karras", steps, 1.0)
            latent = torch.zeros(stop - start, 3, 32, 32)
            images.append(comfy_sampling.sample(guider, latent, seed * 1000 + start, "dpmpp_2m", sigmas, preview=False).clamp(-1, 1))
        results.append(ed.Result(name, ed._rates(judges.score(torch.cat(images), target)), time.time() - t0, steps))
        print(ed._row(results[-1]), flush=True)
    return results


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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if str(COMFY) not in sys.path and importlib.util.find_spec("comfy") is None:
        sys.path.insert(0, str(COMFY))  # a script run outside ComfyUI uses the checkout's copy
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = comfy_args.cpu or not torch.cuda.is_available()
    t0 = time.time()
    extra = tuple(ed.parse_weight(w) for w in args.extra_weights.split(",") if w.strip())
    results = sample_rows(args.n, args.split, args.steps, args.seed, args.weight, Path(args.class16),
                          extra_weights=extra)
    base, low = results[1].rates["all"], results[2].rates["all"]
    body = "\n".join([
        "The class expert trained on 2 x 2-pooled canvases (16 px, `tools/train_tiny.py --resolution 16 --patch 1`, "
        "tools/README.md stage 6) in the "
        "product with the 32 px colour and layout experts: the guider runs it on the pooled canvas at sigma / 2 and "
        "lifts its prediction into the piecewise-constant images (`samplers/bands.py`). Same targets, noise and "
        "judges as the all-32 px row; weights (class, colour, layout) = "
        f"{ed.weight_label(args.weight)}, reliabilities 1/3.",
        "",
        *run_facts("benchmarks/eval_digits_bands.py", argv,
                   f"{args.n} per row, split `{args.split}`, ComfyUI `dpmpp_2m` + `karras`, {args.steps} steps, "
                   f"through `PoEGuider` (the node path's guider), seed {args.seed}", t0, torch.get_num_threads(),
                   torch.__version__),
        "",
        ed.table(results),
        "",
        f"Ratio of 'all three' (16 px class / all 32 px, both at w = {ed.weight_label(args.weight)}): "
        f"{low / base:.3f}" if base else "",
        "",
    ])
    publish(HEADING, body, not args.no_write)


if __name__ == "__main__":
    main()
