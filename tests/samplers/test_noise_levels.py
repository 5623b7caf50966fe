"""The schedule bridge: sigma <-> continuous timestep for any alphas_cumprod table."""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import noise_levels


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sigma_timestep_round_trip(schedule):
    ac = alphas_cumprod_for(schedule)
    t = torch.linspace(0, 999, 4001, dtype=torch.float64)
    back = noise_levels.timestep_from_sigma(noise_levels.sigma_from_timestep(t, ac), ac)
    assert (back - t).abs().max() < 1e-4
    lo, hi = noise_levels.sigma_range(ac)
    sigmas = torch.exp(torch.linspace(torch.log(torch.tensor(lo)), torch.log(torch.tensor(hi)), 777, dtype=torch.float64))
    again = noise_levels.sigma_from_timestep(noise_levels.timestep_from_sigma(sigmas, ac), ac)
    assert ((again - sigmas).abs() / sigmas).max() < 1e-4


def test_table_sigmas_map_to_integer_timesteps():
    ac = alphas_cumprod_for("linear")
    sig = noise_levels.sigmas_from_alphas_cumprod(ac)
    t = noise_levels.timestep_from_sigma(sig[[0, 10, 500, 999]], ac)
    torch.testing.assert_close(t, torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64), atol=1e-9, rtol=0)


def test_published_ranges_and_their_intersection():
    lin, cos = alphas_cumprod_for("linear"), alphas_cumprod_for("cosine")
    (l0, l1), (c0, c1) = noise_levels.sigma_range(lin), noise_levels.sigma_range(cos)
    assert l0 == pytest.approx(0.01, rel=1e-3) and l1 == pytest.approx(157.4, rel=1e-2)
    assert c1 > 1e4  # the cosine schedule reaches about 2e4
    assert noise_levels.common_sigma_range([lin, cos]) == (max(l0, c0), min(l1, c1))


def test_disjoint_ranges_are_an_error():
    a = torch.tensor([0.99, 0.9, 0.8], dtype=torch.float64)   # sigma up to 0.5
    b = torch.tensor([0.1, 0.05, 0.01], dtype=torch.float64)  # sigma from 3
    with pytest.raises(ValueError, match=r"the experts' noise ranges do not overlap \(A: \[0\.1005, 0\.5\]; B: \[3, 9\.95\]\)"):
        noise_levels.common_sigma_range([a, b], ["A", "B"])


def test_resampled_table_spans_exactly_the_range():
    ac = alphas_cumprod_for("cosine")
    table = noise_levels.resample_table(ac, 0.05, 80.0)
    lo, hi = noise_levels.sigma_range(table)
    assert lo == pytest.approx(0.05, rel=1e-9) and hi == pytest.approx(80.0, rel=1e-9)
    assert torch.all(table[1:] < table[:-1])


def test_scale_input_is_the_variance_preserving_point():
    x = torch.ones(2, 3, 1, 1)
    out = noise_levels.scale_input(x, torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([1.0, 1 / 10**0.5]))
