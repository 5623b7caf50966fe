"""Analytic products of Gaussian experts with a closed form, for choosing and checking correctors.

Each case is a product of Gaussian experts (``tests/support/analytic.py``: the exact eps of
Gaussian data under an expert's own schedule) with per-pixel means and variances over 3 x 4 x 4,
a different null for every expert, weights above 1 and two or three experts on the linear and
cosine schedules. Unite and Conquer eq. 10 at sigma = 0 makes the product

    prod_i N(m_i, v_i)^w_i / prod_j N(mn_j, vn_j)^((sum w - 1) a_j),    a normalised,

a Gaussian per pixel with precision ``sum w_i / v_i - (W - 1) sum a_j / vn_j``. Sampling goes
through the node path: ``ProductGuider`` with ComfyUI's samplers and ``CorrectedKSampler``.
W2 is between the per-pixel Gaussian fitted to the samples and the closed form,
``sqrt(sum_d (m_d - m*_d)^2 + (s_d - s*_d)^2)``; :func:`noise_floor` is its value for exact samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SHAPE = (3, 4, 4)


@dataclass(frozen=True)
class Part:
    schedule: str      # "linear" or "cosine"
    weight: float
    reliability: float


@dataclass(frozen=True)
class Case:
    name: str
    parts: tuple[Part, ...]
    seed: int
    mean_range: tuple[float, float] = (-1.0, 1.0)
    var_range: tuple[float, float] = (0.2, 1.0)
    null_mean_range: tuple[float, float] = (-0.5, 0.5)
    null_var_range: tuple[float, float] = (1.0, 1.5)
    shape: tuple[int, int, int] = SHAPE   # channels x side x side; the experts' resolution is the side

    def parameters(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per expert (mean, variance, null mean, null variance), each 1 x ``shape``, drawn from ``seed``."""
        g = torch.Generator().manual_seed(self.seed)

        def draw(lo, hi):
            return lo + (hi - lo) * torch.rand((1, *self.shape), generator=g)

        return [(draw(*self.mean_range), draw(*self.var_range), draw(*self.null_mean_range),
                 draw(*self.null_var_range)) for _ in self.parts]

    def closed_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel (mean, variance) of the product."""
        params = self.parameters()
        total_w = sum(p.weight for p in self.parts)
        total_a = sum(p.reliability for p in self.parts)
        prec = sum(p.weight / v for p, (_, v, _, _) in zip(self.parts, params))
        lin = sum(p.weight * m / v for p, (m, v, _, _) in zip(self.parts, params))
        for p, (_, _, mn, vn) in zip(self.parts, params):
            a = (total_w - 1) * p.reliability / total_a
            prec, lin = prec - a / vn, lin - a * mn / vn
        if not bool((prec > 0).all()):
            raise ValueError(f"case {self.name}: the product is not normalisable")
        return (lin / prec)[0], (1 / prec)[0]


CASES = (
    # The case: two experts on different schedules, weights above 1, unequal reliabilities.
    Case("two experts, w (2, 1.5), a (0.3, 0.7)", (Part("linear", 2.0, 0.3), Part("cosine", 1.5, 0.7)), seed=1),
    Case("three experts, w (1.5, 1, 2), a (0.2, 0.3, 0.5)",
         (Part("linear", 1.5, 0.2), Part("cosine", 1.0, 0.3), Part("linear", 2.0, 0.5)), seed=2),
    Case("two experts, w (1, 1), a (0.5, 0.5)", (Part("linear", 1.0, 0.5), Part("cosine", 1.0, 0.5)), seed=3),
    Case("two sharp experts, w (3, 1), a (0.5, 0.5)", (Part("cosine", 3.0, 0.5), Part("linear", 1.0, 0.5)), seed=4,
         var_range=(0.05, 0.3)),
)


def comfy_modules():
    """ComfyUI with the pack loaded, and the pack's ``samplers.comfy`` modules (``eval_digits.comfy_modules``)."""
    from unite_and_conquer.benchmarks.eval_digits import comfy_modules as load

    return load()


def bindings(case: Case):
    """The case's bindings, each expert wrapped as the loader nodes wrap theirs."""
    from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
    from unite_and_conquer.samplers.poe import Binding
    from unite_and_conquer.tests.support.analytic import gaussian_expert

    models = comfy_modules()[0]
    out = []
    for i, (part, (m, v, mn, vn)) in enumerate(zip(case.parts, case.parameters())):
        handle = models.wrap_expert(gaussian_expert(alphas_cumprod_for(part.schedule), f"gauss-{part.schedule}-{i}",
                                                  case.shape[-1]))
        out.append(Binding(handle, {"mu": m, "var": v}, part.weight, part.reliability, ({"mu": mn, "var": vn},),
                           label=f"expert {i}"))
    return out


def w2(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> float:
    """W2 between the per-pixel Gaussian fitted to ``samples`` (N x 3 x 4 x 4) and N(mean, var)."""
    m, s = samples.double().mean(0), samples.double().std(0)
    return float(((m - mean.double()) ** 2 + (s - var.double().sqrt()) ** 2).sum().sqrt())


def noise_floor(case: Case, samples: int, seed: int = 0) -> float:
    """W2 of ``samples`` exact draws from the closed form: what sampling noise alone gives."""
    mean, var = case.closed_form()
    g = torch.Generator().manual_seed(10_000 + seed)
    return w2(mean + var.sqrt() * torch.randn((samples, *case.shape), generator=g), mean, var)


@dataclass
class Run:
    case: str
    sampler: str
    steps: int
    corrector: object | None
    evaluations: int
    w2: float
    report: str = ""


def run(case: Case, sampler: str, steps: int, corrector=None, samples: int = 4096, seed: int = 0,
        scheduler: str = "karras") -> Run:
    """Sample ``case`` through ProductGuider (plain when ``corrector`` is None, else through
    ``CorrectedKSampler``) and score it against the closed form."""
    from unite_and_conquer.samplers import poe

    _, guiders, sampling, comfy_correctors = comfy_modules()
    bs = bindings(case)
    guider = guiders.ProductGuider(bs)
    sigmas = sampling.compute_sigmas(guider, sampler, scheduler, steps, 1.0)
    latent = torch.zeros(samples, *case.shape)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    base = sampling.sampler_object(sampler)
    chosen = base if corrector is None else comfy_correctors.with_corrector(base, corrector)
    network = poe.unwrap(bs[0].expert).network
    out = guider.sample(noise, latent, chosen, sigmas, disable_pbar=True, seed=seed)
    mean, var = case.closed_form()
    report = getattr(chosen, "last_report", None)
    return Run(case.name, sampler, steps, corrector, network.calls, w2(out, mean, var),
               report.summary() if report is not None else "")
