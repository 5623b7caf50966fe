"""Band weights and lower-resolution experts (samplers/bands.py): exact against Gaussian closed forms."""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.samplers import bands, poe



@pytest.fixture(autouse=True)
def float64():
    """The closed forms are compared at 1e-10, in float64; restored after each test so no other module sees it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class DenseGaussian:
    """An expert whose data is N(mean, cov) on one-channel h x w images: its exact eps at level sigma,
    ``sigma (cov + sigma^2 I)^-1 (x - mean)``; conditions pick (mean, cov) by index."""

    def __init__(self, name, h, w, gaussians):
        self.name, self.h, self.w, self.gaussians = name, h, w, gaussians
        self.seen = []

    def eps(self, x, sigma, cond):
        self.seen.append((tuple(x.shape), float(torch.as_tensor(sigma).flatten()[0])))
        n = self.h * self.w
        out = []
        for row, idx in zip(x.reshape(x.shape[0], n), cond["g"].tolist()):
            mean, cov = self.gaussians[idx]
            s = float(torch.as_tensor(sigma).flatten()[0])
            out.append(s * torch.linalg.solve(cov + s**2 * torch.eye(n), row - mean))
        return torch.stack(out).reshape(x.shape)


def g(i):
    return {"g": torch.tensor([i])}


def eps_fn(expert, x, sigma, cond):
    return expert.eps(x, sigma, cond)


def denoised_fn(expert, x, sigma, cond):
    s = float(torch.as_tensor(sigma).flatten()[0])
    return x - s * expert.eps(x, sigma, cond)


def dct_basis(h, w):
    """(h w) x (h w) orthonormal 2D DCT: row f is the basis image of coefficient f, flattened."""
    return torch.kron(bands.dct_matrix(h), bands.dct_matrix(w))


def pool_matrix(h, w, k):
    eye = torch.eye(h * w).reshape(h * w, 1, h, w)
    return bands.pool(eye, k).reshape(h * w, -1).T            # (h w / k^2) x (h w)


# --- the operators ------------------------------------------------------------------------------


def test_dct_is_orthonormal_and_inverts():
    q = bands.dct_matrix(8)
    assert torch.allclose(q @ q.T, torch.eye(8), atol=1e-12)
    x = torch.randn(2, 3, 8, 4)
    assert torch.allclose(bands.idct2(bands.dct2(x)), x, atol=1e-12)
    assert torch.allclose(bands.dct2(x).flatten(2), x.flatten(2) @ dct_basis(8, 4).T, atol=1e-12)


def test_pooling_projector():
    d = pool_matrix(4, 6, 2)
    u = 4 * d.T
    p = u @ d
    assert torch.allclose(d @ u, torch.eye(6))
    assert torch.allclose(p @ p, p) and torch.allclose(p, p.T)
    x = torch.randn(1, 1, 4, 6)
    assert torch.allclose(bands.project(x, 2).flatten(), p @ x.flatten())
    assert torch.allclose(bands.upsample(bands.pool(x, 2), 2).flatten(), u @ d @ x.flatten())
    # The pooled noise has std sigma / k: D D^T = I / k^2.
    assert torch.allclose(d @ d.T, torch.eye(6) / 4)


def test_band_profiles():
    lo, hi = bands.low_pass(0.4).response(8, 8), bands.high_pass(0.4).response(8, 8)
    assert torch.equal(lo + hi, torch.ones(8, 8)) and lo[0, 0] == 1 and hi[7, 7] == 1
    r = bands.ramp(0.2, 0.6).response(16, 16)
    rho = bands.radial_frequency(16, 16)
    assert torch.all(r[rho <= 0.2] == 1) and torch.all(r[rho >= 0.6] == 0)
    assert torch.all((r >= 0) & (r <= 1))
    n = bands.bands((0.25, 0.5), (2.0, 1.0, 0.5)).response(8, 8)
    assert set(n.unique().tolist()) == {2.0, 1.0, 0.5}
    assert bands.band_pass(0.2, 0.5).response(8, 8)[0, 0] == 0
    with pytest.raises(ValueError, match="needs 2 values"):
        bands.Band((0.5,), (1.0,))


# --- frequency bands: per-frequency closed form ------------------------------------------------------


def test_stationary_gaussians_with_bands_match_per_frequency_product():
    h = w = 8
    n = h * w
    q = dct_basis(h, w)
    gen = torch.Generator().manual_seed(0)
    spectra = [torch.rand(n, generator=gen) * 2 + 0.1 for _ in range(3)]      # experts 1, 2, null
    means = [torch.randn(n, generator=gen) * 0.5, torch.randn(n, generator=gen) * 0.5, torch.zeros(n)]
    gaussians = [(m, q.T @ torch.diag(s) @ q) for m, s in zip(means, spectra)]
    e1 = DenseGaussian("A", h, w, gaussians)
    e2 = DenseGaussian("B", h, w, gaussians)
    band1, band2 = bands.ramp(0.2, 0.7), bands.bands((0.3,), (0.5, 3.0))
    w1, w2 = 2.0, 1.5
    bindings = [poe.Binding(e1, g(0), w1, 1.0, (g(2),), band=band1),
                poe.Binding(e2, g(1), w2, 0.0, (g(2),), band=band2)]
    x = torch.randn(3, 1, h, w, generator=gen)
    sigma = 0.7
    out, pooled = poe.product_prediction(x, torch.tensor(sigma), bindings, eps_fn)
    # Per frequency f: the product of N(m_i(f), s_i(f) + sigma^2)^(w_i b_i(f)) / N(0, s_0 + sigma^2)^(W(f) - 1).
    b1, b2 = band1.response(h, w).flatten(), band2.response(h, w).flatten()
    v = [s + sigma**2 for s in spectra]
    mf = [q @ m for m in means]
    big_w = w1 * b1 + w2 * b2
    prec = w1 * b1 / v[0] + w2 * b2 / v[1] - (big_w - 1) / v[2]
    mean = (w1 * b1 * mf[0] / v[0] + w2 * b2 * mf[1] / v[1]) / prec
    expected = sigma * prec * (x.reshape(3, n) @ q.T - mean)                  # eps in DCT coordinates
    assert torch.allclose(out.reshape(3, n) @ q.T, expected, atol=1e-10)
    assert torch.allclose(pooled.reshape(3, n) @ q.T, sigma * (x.reshape(3, n) @ q.T) / v[2], atol=1e-10)


def test_all_pass_band_and_factor_one_are_todays_rule_exactly():
    gen = torch.Generator().manual_seed(1)
    h = w = 4
    gaussians = [(torch.randn(16, generator=gen), torch.eye(16) * (i + 1)) for i in range(3)]
    e1, e2 = DenseGaussian("A", h, w, gaussians), DenseGaussian("B", h, w, gaussians)
    x = torch.randn(2, 1, h, w, generator=gen)
    spatial = torch.rand(1, 1, h, w, generator=gen) * 3
    today = [poe.Binding(e1, g(0), spatial, 0.4, (g(2),)), poe.Binding(e2, g(1), 1.5, 0.6, (g(2),))]
    ref = poe.product_prediction(x, torch.tensor(0.9), today, eps_fn)
    for variant in ({"band": bands.bands((0.3, 0.6), (1.0, 1.0, 1.0))}, {"resolution_factor": 1},
                    {"band": bands.low_pass(1.0, 0.0).__class__((), (1.0,))}):
        same = [poe.Binding(b.expert, b.condition, b.weight, b.reliability, b.null, **variant) for b in today]
        got = poe.product_prediction(x, torch.tensor(0.9), same, eps_fn)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --- lower-resolution experts: the closed-form product -------------------------------------------------


def spd(n, gen, scale=1.0):
    a = torch.randn(n, n, generator=gen)
    return scale * (a @ a.T / n + 0.2 * torch.eye(n))


@pytest.mark.parametrize("mode", ["eps", "denoised"])
def test_pooled_expert_with_full_resolution_one_matches_closed_form(mode):
    h = w = 4
    k = 2
    n, n2 = h * w, (h // k) * (w // k)
    gen = torch.Generator().manual_seed(2)
    m, c = torch.randn(n, generator=gen), spd(n, gen)
    mu2, s2 = torch.randn(n2, generator=gen), spd(n2, gen, 0.5)
    v_null, v2_null = 1.3, 0.4
    full = DenseGaussian("full", h, w, [(m, c), (torch.zeros(n), v_null * torch.eye(n))])
    low = DenseGaussian("low", h // k, w // k, [(mu2, s2), (torch.zeros(n2), v2_null * torch.eye(n2))])
    w1, w2, a1, a2 = 1.7, 2.5, 0.3, 0.7
    bindings = [poe.Binding(full, g(0), w1, a1, (g(1),)),
                poe.Binding(low, g(0), w2, a2, (g(1),), resolution_factor=k)]
    x = torch.randn(2, 1, h, w, generator=gen)
    sigma = 0.8
    fn = eps_fn if mode == "eps" else denoised_fn
    out, _ = poe.product_prediction(x, torch.tensor(sigma), bindings, fn, prediction=mode)
    # The low-res expert ran once, on the pooled 2 x 2 input at sigma / k.
    assert {shape for shape, _ in low.seen} == {(4, 1, 2, 2)} and {s for _, s in low.seen} == {sigma / k}
    d = pool_matrix(h, w, k)
    p = k * k * d.T @ d
    eye = torch.eye(n)
    a1n, a2n = a1 / (a1 + a2), a2 / (a1 + a2)
    # Scores (negative precision times offset) of the noisy marginals, pulled back through D.
    pr1 = torch.linalg.inv(c + sigma**2 * eye)
    pr2 = d.T @ torch.linalg.inv(s2 + sigma**2 / k**2 * torch.eye(n2)) @ d
    pn1 = eye / (v_null + sigma**2)
    pn2 = d.T @ d / (v2_null + sigma**2 / k**2)
    # Precision of the product: w1 C^-1 + w2 D^T S'^-1 D minus the null terms of each band:
    # on P the pooled null mixes both nulls with weight (w1 + w2 - 1), on I - P only the full one with (w1 - 1).
    prec = (w1 * pr1 + w2 * pr2 - (w1 + w2 - 1) * p @ (a1n * pn1 + a2n * pn2) @ p
            - (w1 - 1) * (eye - p) @ pn1 @ (eye - p))
    lin = w1 * pr1 @ m + w2 * d.T @ torch.linalg.solve(s2 + sigma**2 / k**2 * torch.eye(n2), mu2)
    xs = x.reshape(2, n)
    score = -(xs @ prec.T - lin)
    expected = -sigma * score if mode == "eps" else xs + sigma**2 * score
    assert torch.allclose(out.reshape(2, n), expected, atol=1e-10)
    # The rule's slope is a symmetric precision: the score of one Gaussian (where it is positive definite).
    assert torch.allclose(prec, prec.T, atol=1e-12)


def test_pooled_expert_with_full_resolution_weights_summing_to_one_runs_without_a_fine_null():
    # Weights that sum to 1 on the fine detail need no null there: a full-resolution w = 1 with a coarse guide.
    h = w = 4
    full = DenseGaussian("full", h, w, [(torch.zeros(16), torch.eye(16))])
    low = DenseGaussian("low", 2, 2, [(torch.zeros(4), torch.eye(4)), (torch.zeros(4), torch.eye(4))])
    ok = [poe.Binding(full, g(0), 1.0, 0.0), poe.Binding(low, g(0), 2.0, 1.0, (g(1),), resolution_factor=2)]
    assert poe.null_levels(ok, (1, 1, h, w)) == [False, True]
    x = torch.randn(1, 1, h, w)
    out, _ = poe.product_prediction(x, torch.tensor(0.5), ok, eps_fn)
    assert torch.isfinite(out).all()


def test_band_on_a_pooled_expert_acts_on_its_own_grid():
    h = w = 8
    full = DenseGaussian("full", h, w, [(torch.zeros(64), torch.eye(64)), (torch.zeros(64), 2 * torch.eye(64))])
    low = DenseGaussian("low", 4, 4, [(torch.ones(16), torch.eye(16)), (torch.zeros(16), torch.eye(16))])
    x = torch.randn(1, 1, h, w)
    band = bands.low_pass(0.5)
    bindings = [poe.Binding(full, g(0), 1.0, 1.0, (g(1),)),
                poe.Binding(low, g(0), 2.0, 0.0, (g(1),), band=band, resolution_factor=2)]
    out, u = poe.product_prediction(x, torch.tensor(0.6), bindings, eps_fn)
    e_full = full.eps(x, 0.6, g(0))
    e_low = low.eps(bands.pool(x, 2), 0.3, g(0)) / 2
    expected = u + (e_full - u) + 2.0 * bands.upsample(bands.band_filter(e_low - bands.pool(u, 2), band), 2)
    assert torch.allclose(out, expected, atol=1e-12)
    assert "low-pass < 0.5 on its own grid" in bands.describe(band, 2, 4)
