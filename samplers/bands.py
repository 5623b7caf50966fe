"""Band weights and lower-resolution experts: the product rule in a basis where the weights are diagonal.

Per-pixel weights are the product rule (``poe``, Unite and Conquer eq. 10) applied in the pixel
basis. The same rule holds in any orthonormal basis in which every weight is diagonal.

**Frequency bands.** Let Q be the orthonormal 2D DCT-II. A binding whose weight is ``w b(f)`` (a band
profile ``b`` over the DCT frequencies f) pulls away from the pooled null only in its band:

    eps = u + sum_i w_i Q^T diag(b_i) Q (eps_i - u),       u = sum_j a_j eps_j(null_j)

so that, coefficient by coefficient, eps(f) = sum_i w_i b_i(f) eps_i(f) - (sum_i w_i b_i(f) - 1) u(f):
today's rule with the weights, and with them the null-term coefficient ``sum_i w_i b_i(f) - 1``,
turned into functions of frequency. For stationary Gaussian experts N(m_i, Q^T diag(s_i) Q) the
noisy marginals at level sigma have covariance Q^T diag(s_i + sigma^2) Q, diagonal in the same basis,
so the band-weighted rule is exactly the score of the product of per-frequency Gaussians with
powers w_i b_i(f) (less the null's power), frequency by frequency.

**Lower-resolution experts.** Let D be k x k average pooling (each output pixel the mean of its
k^2 inputs), U = k^2 D^T nearest upsampling, and P = U D. Because D U = I, P^2 = P and
P^T = D^T U^T = (U / k^2)(k^2 D) = P: P is the orthogonal projector onto images that are constant on
k x k blocks. With the sampler's ``x = x0 + sigma e`` (e standard normal),

    D x = D x0 + sigma D e,      Cov(D e) = D D^T = I / k^2,

so the pooled image is the pooled clean image plus standard noise at level **sigma / k**: exactly an
input that an expert trained on pooled images (p'(y0), y0 = D x0) serves at its own level sigma / k.
Such an expert defines a density on the full image through the pooling, q(x) = q'_{sigma/k}(D x),
whose score is

    grad_x log q'(D x) = D^T s'(D x),        s' = -eps' / (sigma / k)    (its own score),

so its noise prediction at full resolution is  -sigma D^T s' = U eps' / k,  and its denoised
prediction is U x0' on P (``x - sigma U eps' / k = U (D x - (sigma/k) eps')`` there) and says nothing
on I - P, where q is flat. A lower-resolution expert is therefore a band-limited expert: weight w on
P and 0 on I - P, costing one forward of its own size. With a band of its own, the band acts on its
own grid (``U Q'^T diag(b) Q' D``, self-adjoint and inside P).

**Null terms per band.** Each pooled-null contribution is only defined where its expert speaks: a
null of an expert at factor k lives in P_k. With nested factors 1 = K_1 < K_2 < ... the subspaces
P_{K_m} - P_{K_{m+1}} are orthogonal, and on each the pooled null is the reliability-normalised mix
of the nulls of the experts with k <= K_m:

    u = sum_m (P_{K_m} - P_{K_{m+1}}) ubar_m,      ubar_m = sum_{j: k_j <= K_m} a_j u_j / sum a_j.

So on every band the rule's coefficients still sum to one (sum of weights acting there, minus
their sum less one times a null that is defined there), and the rule stays affine with unit sum:
it combines noise and denoised predictions alike. For consistent nulls (a coarse null equal to
the pooled fine null) ubar_m is the same null whatever the mix. With all-pass bands and k = 1 the
rule is today's, and ``poe`` then runs today's code.

**Spatial weights with bands** (one binding with a mask and a band): the binding's term is
``w ⊙ F(eps_i - u)``: the band F picks which frequencies of the binding's pull count, and the mask
then says where they count. With a scalar weight this is the exact per-frequency rule above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

# --- the orthonormal 2D DCT-II --------------------------------------------------------------------


@lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float64)
    f = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.cos(math.pi * (x + 0.5) * f / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Q (n x n), orthonormal DCT-II: ``Q[f, x] = s_f cos(pi (x + 1/2) f / n)``, ``Q Q^T = I``."""
    return _dct_matrix_cpu(n).to(dtype=dtype, device=device)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """DCT-II of the last two dimensions (orthonormal, so :func:`idct2` is its transpose)."""
    qh = dct_matrix(x.shape[-2], x.dtype, x.device)
    qw = dct_matrix(x.shape[-1], x.dtype, x.device)
    return qh @ x @ qw.T


def idct2(c: torch.Tensor) -> torch.Tensor:
    qh = dct_matrix(c.shape[-2], c.dtype, c.device)
    qw = dct_matrix(c.shape[-1], c.dtype, c.device)
    return qh.T @ c @ qw


def radial_frequency(h: int, w: int) -> torch.Tensor:
    """h x w frequency of each DCT coefficient: sqrt((fy / h)^2 + (fx / w)^2), 1 = Nyquist along an axis
    (the diagonal corner reaches sqrt(2) and counts in the top band)."""
    fy = torch.arange(h, dtype=torch.float64)[:, None] / h
    fx = torch.arange(w, dtype=torch.float64)[None, :] / w
    return (fy**2 + fx**2).sqrt()


# --- band profiles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """A weight profile over frequency: ``values[0]`` below ``edges[0]``, ``values[j]`` between edges
    j-1 and j, ``values[-1]`` above the last edge; each step is a raised-cosine ``transition`` wide
    (0: a hard edge, and a coefficient exactly on it takes the value above it, so bands that share an
    edge split the coefficients exactly). Frequencies are :func:`radial_frequency`, 1 = Nyquist.

    Args:
        edges (`tuple[float, ...]`): increasing band edges in [0, 1].
        values (`tuple[float, ...]`): one multiplier of the binding's weight per band (len(edges) + 1).
        transition (`float`, defaults to 0): width of each edge's smooth step, in the same units.
        label (`str`): how the rule text names it.
    """

    edges: tuple[float, ...]
    values: tuple[float, ...]
    transition: float = 0.0
    label: str = ""

    def __post_init__(self):
        if len(self.values) != len(self.edges) + 1:
            raise ValueError(f"a band profile with {len(self.edges)} edge(s) needs {len(self.edges) + 1} values, "
                             f"got {len(self.values)}")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"band edges must increase, got {self.edges}")
        if any(not 0 <= e <= 1 for e in self.edges):
            raise ValueError(f"band edges are fractions of the Nyquist frequency in [0, 1], got {self.edges}")
        if self.transition < 0:
            raise ValueError(f"a band's transition width must be >= 0, got {self.transition}")

    @property
    def all_pass(self) -> bool:
        return all(v == 1 for v in self.values)

    def response(self, h: int, w: int) -> torch.Tensor:
        """h x w (float64): the multiplier of the binding's weight at each DCT coefficient."""
        rho = radial_frequency(h, w)
        out = torch.full_like(rho, float(self.values[0]))
        for edge, below, above in zip(self.edges, self.values, self.values[1:]):
            if self.transition > 0:
                s = ((rho - edge) / self.transition + 0.5).clamp(0, 1)
                step = 0.5 - 0.5 * torch.cos(math.pi * s)
            else:
                step = (rho >= edge).to(rho.dtype)
            out = out + (above - below) * step
        return out

    def describe(self) -> str:
        if self.label:
            return self.label + (f" (transition {self.transition:.3g})" if self.transition else "")
        parts = [f"{self.values[0]:.3g}"]
        for e, v in zip(self.edges, self.values[1:]):
            parts.append(f"|{e:.3g}| {v:.3g}")
        return "band " + " ".join(parts) + (f" (transition {self.transition:.3g})" if self.transition else "")


def low_pass(cutoff: float, transition: float = 0.0) -> Band:
    return Band((cutoff,), (1.0, 0.0), transition, f"low-pass < {cutoff:.3g}")


def high_pass(cutoff: float, transition: float = 0.0) -> Band:
    return Band((cutoff,), (0.0, 1.0), transition, f"high-pass >= {cutoff:.3g}")


def band_pass(lo: float, hi: float, transition: float = 0.0) -> Band:
    return Band((lo, hi), (0.0, 1.0, 0.0), transition, f"band-pass {lo:.3g}..{hi:.3g}")


def ramp(start: float, end: float, rising: bool = False) -> Band:
    """A smooth (raised-cosine) ramp from 1 at frequency ``start`` to 0 at ``end`` (the other way with
    ``rising``): one expert fades out across the band where the other fades in."""
    if not 0 <= start < end <= 1:
        raise ValueError(f"a ramp needs 0 <= start < end <= 1, got {start}, {end}")
    values = (0.0, 1.0) if rising else (1.0, 0.0)
    return Band(((start + end) / 2,), values, end - start,
                f"ramp {'up' if rising else 'down'} {start:.3g}..{end:.3g}")


def bands(edges: Sequence[float], values: Sequence[float], transition: float = 0.0) -> Band:
    return Band(tuple(float(e) for e in edges), tuple(float(v) for v in values), transition)


def band_filter(x: torch.Tensor, band: Band | None) -> torch.Tensor:
    """Q^T diag(b) Q x over the last two dimensions (self-adjoint, diagonal in the DCT basis)."""
    if band is None or band.all_pass:
        return x
    work = x.double() if x.dtype != torch.float64 else x
    r = band.response(x.shape[-2], x.shape[-1]).to(work.device)
    return idct2(dct2(work) * r).to(x.dtype)


# --- pooling -------------------------------------------------------------------------------------


def pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """D x: k x k average pooling."""
    return x if k == 1 else F.avg_pool2d(x, k)


def upsample(y: torch.Tensor, k: int) -> torch.Tensor:
    """U y = k^2 D^T y: nearest upsampling."""
    return y if k == 1 else y.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def project(x: torch.Tensor, k: int) -> torch.Tensor:
    """P x = U D x, the orthogonal projection onto images constant on k x k blocks."""
    return upsample(pool(x, k), k)


def at_canvas(v, h: int, w: int, k: int):
    """A weight or reliability given at the expert's own size (H/k x W/k) lifted to the canvas; others as given."""
    if k > 1 and isinstance(v, torch.Tensor) and v.ndim >= 2 and tuple(v.shape[-2:]) == (h // k, w // k):
        return upsample(v, k)
    return v


# --- the rule with bands and factors --------------------------------------------------------------


def lift_scale(prediction: str, k: int) -> float:
    """What a pooled expert's prediction is multiplied by before :func:`upsample` lifts it into P: its
    noise 1/k (``-sigma D^T s' = U eps' / k``), its denoised image 1."""
    if prediction == "eps":
        return 1.0 / k
    if prediction == "denoised":
        return 1.0
    raise ValueError(f"prediction must be 'eps' or 'denoised', got {prediction!r}")


def _scalar(v) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return None


def levels_of(factors: Sequence[int]) -> list[int]:
    """The resolution levels K_1 = 1 < K_2 < ... of a product: 1 and every expert's factor."""
    return sorted({1} | {int(k) for k in factors})


def level_words(levels: Sequence[int], m: int) -> str:
    """How messages name the band S_m of level ``levels[m]`` (the detail between its blocks and the next level's)."""
    level = levels[m]
    coarser = levels[m + 1] if m + 1 < len(levels) else None
    if level == 1:
        return f"the detail finer than {coarser} x {coarser} blocks" if coarser else "the canvas"
    if coarser:
        return f"the detail between {level} x {level} and {coarser} x {coarser} blocks"
    return f"the {level} x {level} block means"


def _filter(v: torch.Tensor, band: Band | None, k: int) -> torch.Tensor:
    """F_i v: the band at full resolution, or for an expert at factor k, ``U band(D v)`` on its own grid."""
    return band_filter(v, band) if k == 1 else upsample(band_filter(pool(v, k), band), k)


def null_levels(weights: Sequence, band_list: Sequence[Band | None], factors: Sequence[int],
                shape: tuple[int, ...], tol: float = 1e-9) -> list[bool]:
    """Per level K_m (:func:`levels_of`): whether the null term acts on the band S_m = P_{K_m} - P_{K_{m+1}}.

    The rule is ``eps = C u + sum_i w_i F_i eps_i`` with ``C = I - sum_i w_i F_i``, so the pooled null u
    matters on S_m only where C does not vanish there; a null whose expert speaks on no such band is
    multiplied by zero and need not run. Weights may be spatial (lifted to the canvas, :func:`at_canvas`).

    - Without bands, every expert acting on S_m (k_i <= K_m) is the identity there (P_{k_i} v = v) and
      the others are zero (S_m is orthogonal to P_{k_i}), so C is multiplication by ``1 - sum_{k_i <= K_m} w_i``
      and vanishes iff those weights sum to 1 at every pixel.
    - With bands, C restricted to S_m is applied to one random element of S_m (float64, fixed seed): a
      linear map that sends a random vector of a subspace to 0 vanishes on it with probability one.
      Complementary bands of weight 1 (``low_pass(c)`` and ``high_pass(c)``) give C = 0 on every grid.
    """
    h, w = shape[-2:]
    levels = levels_of(factors)
    lifted = [at_canvas(wt, h, w, int(k)) for wt, k in zip(weights, factors)]
    banded = any(b is not None and not b.all_pass for b in band_list)
    out = []
    for m, level in enumerate(levels):
        coarser = levels[m + 1] if m + 1 < len(levels) else None
        if not banded:
            acting = [wt for wt, k in zip(lifted, factors) if int(k) <= level]
            ws = [_scalar(wt) for wt in acting]
            if None not in ws:
                out.append(not math.isclose(sum(ws), 1.0, rel_tol=tol, abs_tol=tol))
                continue
            total = sum((torch.as_tensor(wt, dtype=torch.float64).cpu() for wt in acting), torch.zeros(()))
            out.append(not bool(torch.isclose(total, torch.ones((), dtype=torch.float64), rtol=tol, atol=tol).all()))
            continue
        spatial = [torch.as_tensor(wt).cpu() for wt in lifted if _scalar(wt) is None]
        batch = max([t.shape[0] for t in spatial if t.ndim == 4] or [1])
        channels = max([t.shape[1] for t in spatial if t.ndim == 4] or [1])
        g = torch.Generator().manual_seed(m)
        v = torch.randn(batch, channels, h, w, dtype=torch.float64, generator=g)
        v = project(v, level) - (project(v, coarser) if coarser else 0)
        cv = v.clone()
        for wt, band, k in zip(lifted, band_list, factors):
            s = _scalar(wt)
            term = _filter(v, band, int(k))
            cv -= term * s if s is not None else term * torch.as_tensor(wt, dtype=torch.float64).cpu()
        out.append(bool(cv.norm() > tol * max(float(v.norm()), 1e-300)))
    return out


def pooled_null(null_preds: Sequence[torch.Tensor], reliabilities: Sequence, factors: Sequence[int],
                shape: tuple[int, ...], levels: Sequence[int], needed: Sequence[bool],
                names: Sequence[str] = ()) -> torch.Tensor | None:
    """u = sum_m (P_{K_m} - P_{K_{m+1}}) ubar_m (module docstring); null predictions of experts at
    factor k come at their own size, already scaled by :func:`lift_scale`."""
    if not null_preds:
        return None
    h, w = shape[-2:]
    lifted = [upsample(p, k) for p, k in zip(null_preds, factors)]
    rel = [torch.as_tensor(at_canvas(a, h, w, k), dtype=torch.float32) for a, k in zip(reliabilities, factors)]
    u = None
    for m, level in enumerate(levels):
        members = [j for j, k in enumerate(factors) if k <= level and not bool((rel[j] == 0).all())]
        if not members:
            if needed[m]:
                raise ValueError(
                    f"no binding with a null of its own covers the detail finer than {level}x{level} blocks "
                    f"(factor {level}), where the weights acting there need a pooled null; give a binding whose "
                    "expert is at that resolution or finer a null and a reliability > 0")
            continue
        total = sum(rel[j] for j in members)
        ubar = sum(lifted[j] * torch.where(total > 0, rel[j] / torch.where(total > 0, total, 1.0),
                                           torch.as_tensor(1.0 / len(members))).to(lifted[j])
                   for j in members)
        coarser = levels[m + 1] if m + 1 < len(levels) else None
        part = (ubar if level == 1 else project(ubar, level)) - (project(ubar, coarser) if coarser else 0)
        u = part if u is None else u + part
    return u if u is not None else torch.zeros(shape, dtype=null_preds[0].dtype, device=null_preds[0].device)


def combine_banded(cond_preds: Sequence[torch.Tensor], weights: Sequence, band_list: Sequence[Band | None],
                   factors: Sequence[int], pooled: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """``u + sum_i w_i ⊙ F_i(eps_i - u)``: F_i the band filter at full resolution, or for an expert at
    factor k, ``U band(. - D u)`` on its own grid (its prediction given at its own size, scaled)."""
    h, w = shape[-2:]
    ref = cond_preds[0]
    u = pooled if pooled is not None else torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    out = u.clone()
    for p, wt, band, k in zip(cond_preds, weights, band_list, factors):
        if k == 1:
            term = band_filter(p - u, band)
        else:
            term = upsample(band_filter(p - pool(u, k), band), k)
        wt = at_canvas(wt, h, w, k)
        s = _scalar(wt)
        out = out + (term * s if s is not None else term * torch.as_tensor(wt).to(term))
    return out


def describe(band: Band | None, factor: int, resolution: int | None = None) -> str:
    """The rule text's words for a binding's band and resolution ('' for a full-resolution all-pass one)."""
    parts = []
    if factor > 1:
        size = f"{resolution}px, " if resolution else ""
        parts.append(f"at {size}1/{factor} of the canvas (sigma/{factor}, lifted into P)")
    if band is not None and not band.all_pass:
        parts.append(band.describe() + (" on its own grid" if factor > 1 else ""))
    return " · ".join(parts)


MODES = ("low-pass", "high-pass", "band-pass", "ramp down", "ramp up", "bands")


def band_from_choice(mode: str, cutoff: float, cutoff_high: float, transition: float, edges: str = "",
                     values: str = "") -> Band:
    """A node's choice as a :class:`Band`: ``mode`` from :data:`MODES`; ``bands`` reads comma-separated
    ``edges`` and one more comma-separated ``values``."""
    if mode == "low-pass":
        return low_pass(cutoff, transition)
    if mode == "high-pass":
        return high_pass(cutoff, transition)
    if mode == "band-pass":
        if cutoff_high <= cutoff:
            raise ValueError(f"a band-pass needs cutoff_high above cutoff, got {cutoff_high} <= {cutoff}")
        return band_pass(cutoff, cutoff_high, transition)
    if mode in ("ramp down", "ramp up"):
        return ramp(cutoff, cutoff_high, rising=mode == "ramp up")
    if mode == "bands":
        def numbers(text, what):
            try:
                return [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
            except ValueError:
                raise ValueError(f"band {what} must be numbers separated by commas, got {text!r}") from None
        return bands(numbers(edges, "edges"), numbers(values, "weights"), transition)
    raise ValueError(f"unknown band mode {mode!r}; pick one of: {', '.join(MODES)}")
