"""Variance-derived reliabilities (samplers/variance_reliability.py), on analytic learned-sigma experts."""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.benchmarks.bench_variance import LearnedSigmaGaussian
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import noise_levels
from unite_and_conquer.samplers import variance_reliability as vr


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [3.0, 250.5, 700.25, 990.0])
def test_x0_variance_is_recovered_from_the_learned_sigma_output(schedule, t):
    """v encodes the true reverse-step variance of N(mu, var) data; the implied Var[x0 | x_t] is the
    closed form var (1 - ab) / (ab var + 1 - ab), whatever the schedule."""
    table = alphas_cumprod_for(schedule)
    var = torch.tensor([0.05, 0.3, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    tt = torch.tensor([t])
    out = LearnedSigmaGaussian(table)(torch.zeros(1, 3, 2, 2), tt, torch.zeros(1, 3, 1, 1), var)
    v = out[:, 3:]
    assert v.min() >= -1 - 1e-5 and v.max() <= 1 + 1e-5
    coef = vr.step_coefficients(table, tt)
    got = vr.x0_variance(vr.learned_log_variance(v.double(), coef), coef)
    ab = 1 / (1 + noise_levels.sigma_from_timestep(tt.double(), table) ** 2)
    expected = var.double() * (1 - ab) / (ab * var.double() + 1 - ab)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-6)


def test_v_ends_are_beta_tilde_and_beta():
    table = alphas_cumprod_for("linear")
    coef = vr.step_coefficients(table, torch.tensor([100.0]))
    lo = vr.learned_log_variance(torch.full((1, 1), -1.0), coef)
    hi = vr.learned_log_variance(torch.full((1, 1), 1.0), coef)
    torch.testing.assert_close(lo.exp().flatten(), coef.beta_tilde)
    torch.testing.assert_close(hi.exp().flatten(), coef.beta)
    # On integer steps the coefficients are DDPM's (eq. 7).
    a = table.double()
    beta = 1 - a[100] / a[99]
    torch.testing.assert_close(coef.beta, beta.view(1))
    torch.testing.assert_close(coef.beta_tilde, (beta * (1 - a[99]) / (1 - a[100])).view(1))
    torch.testing.assert_close(coef.c0, (a[99].sqrt() * beta / (1 - a[100])).view(1))


def test_precision_reliabilities_are_normalised_precisions_per_pixel():
    v1 = torch.tensor([[1.0, 0.25]])
    v2 = torch.tensor([[0.5, 0.25]])
    a1, a2 = vr.precision_reliabilities([v1, v2])
    torch.testing.assert_close(a1, torch.tensor([[1 / 3, 0.5]]))
    torch.testing.assert_close(a2, torch.tensor([[2 / 3, 0.5]]))
    b1, b2 = vr.precision_reliabilities([v1, v2], reliabilities=[3.0, 1.0])
    torch.testing.assert_close(b1, torch.tensor([[0.6, 0.75]]))
    torch.testing.assert_close(b1 + b2, torch.ones(1, 2))


def test_reliabilities_from_outputs_favour_the_narrower_null_where_it_is_narrower():
    tables = [alphas_cumprod_for("linear"), alphas_cumprod_for("cosine")]
    sigma = torch.tensor([2.0])
    ts = [noise_levels.timestep_from_sigma(sigma, t).float() for t in tables]
    narrow_left = torch.tensor([0.2, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    outs = [LearnedSigmaGaussian(tab)(torch.zeros(1, 3, 1, 2), t, torch.zeros(1, 3, 1, 1), var)[:, 3:]
            for tab, t, var in zip(tables, ts, (narrow_left, narrow_left.flip(-1)))]
    a, b = vr.reliabilities_from_outputs(outs, tables, ts)
    # Var[x0 | x_t] at sigma 2: 0.2 * 4 / (0.2 + 4) = 0.1905 and 1 * 4 / 5 = 0.8: precisions 5.25 and 1.25.
    torch.testing.assert_close(a[0, 0, 0], torch.tensor([5.25 / 6.5, 1.25 / 6.5]), rtol=3e-3, atol=1e-4)
    torch.testing.assert_close(a + b, torch.ones_like(a))


# --- inside the product rule (poe.product_prediction) ------------------------------------------

class VarianceExpert:
    """eps = x / 2 + c; Var[x0 | x] = the condition's ``v`` (a map), counting variance requests."""

    def __init__(self, name):
        self.name = name
        self.variance_calls = 0

    def __call__(self, x, cond, with_variance=False):
        eps = x * 0.5 + cond["c"].view(-1, 1, 1, 1)
        if not with_variance:
            return eps
        self.variance_calls += 1
        return eps, cond["v"].expand_as(x)


def _eps_fn(expert, x, sigma, cond, with_variance=False):
    return expert(x, cond, with_variance)


def _cond(c, v):
    return {"c": torch.tensor([float(c)]), "v": torch.as_tensor(v, dtype=torch.float32).expand(1, 3, 4, 4)}


def _bindings(from_variance, v_a, v_b):
    from unite_and_conquer.samplers.poe import Binding

    a, b = VarianceExpert("A"), VarianceExpert("B")
    return [Binding(a, _cond(1, 1.0), 2.0, 1.0, (_cond(0.5, v_a),), label="A",
                    reliability_from_variance=from_variance),
            Binding(b, _cond(-1, 1.0), 1.0, 3.0, (_cond(-0.25, v_b),), label="B",
                    reliability_from_variance=from_variance)]


def test_product_weights_each_null_by_its_precision_per_pixel():
    """u = sum_j (a_j / V_j) eps_j(null) / sum_j (a_j / V_j), pixel by pixel, inside the rule."""
    from unite_and_conquer.samplers import poe

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    v_a = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.1
    v_b = torch.full((1, 3, 4, 4), 0.4)
    bindings = _bindings(True, v_a, v_b)
    out, pooled = poe.product_prediction(x, torch.tensor(1.0), bindings, _eps_fn)
    null_a, null_b = x * 0.5 + 0.5, x * 0.5 - 0.25
    share_a = (1.0 / v_a) / (1.0 / v_a + 3.0 / v_b)
    expected_u = share_a * null_a + (1 - share_a) * null_b
    torch.testing.assert_close(pooled, expected_u, rtol=1e-5, atol=1e-6)
    expected = 2 * (x * 0.5 + 1) + (x * 0.5 - 1) - 2 * expected_u
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert [b.expert.variance_calls for b in bindings] == [1, 1]
    # Off, the same product uses the plain reliabilities 1/4, 3/4 and asks for no variance.
    plain = _bindings(False, v_a, v_b)
    _, pooled_plain = poe.product_prediction(x, torch.tensor(1.0), plain, _eps_fn)
    torch.testing.assert_close(pooled_plain, 0.25 * null_a + 0.75 * null_b)
    assert [b.expert.variance_calls for b in plain] == [0, 0]


def test_equal_variances_leave_the_reliabilities_as_they_are():
    from unite_and_conquer.samplers import poe

    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    on, _ = poe.product_prediction(x, torch.tensor(1.0), _bindings(True, 0.3, 0.3), _eps_fn)
    off, _ = poe.product_prediction(x, torch.tensor(1.0), _bindings(False, 0.3, 0.3), _eps_fn)
    torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-6)


def test_a_chain_half_from_variance_is_refused():
    from dataclasses import replace

    from unite_and_conquer.samplers import validation

    bindings = _bindings(True, 1.0, 1.0)
    bindings[1] = replace(bindings[1], reliability_from_variance=False)
    with pytest.raises(validation.ProductError) as err:
        validation.check_rule(bindings, (1, 3, 4, 4))
    assert str(err.value) == ("binding 1 (B · B): reliability from variance is on for some bindings and off for this "
                              "one; apply it to the whole chain, after its last binding")


def test_reliability_from_variance_refuses_experts_without_a_variance():
    from unite_and_conquer.samplers.nulls import reliability_from_variance
    from unite_and_conquer.samplers.poe import Binding

    class Plain:
        name, prediction, learned_sigma = "Plain-eps", "eps", False

    class Learned:
        name, prediction, learned_sigma = "Learned", "eps_learned_sigma", True

    ok = reliability_from_variance([Binding(Learned(), {}, 2.0, 1.0, ({},), label="x"),
                                                Binding(Plain(), {}, 1.0, 0.0, (), label="y")])
    assert [b.reliability_from_variance for b in ok] == [True, True]
    with pytest.raises(ValueError) as err:
        reliability_from_variance([Binding(Plain(), {}, 2.0, 1.0, ({},), label="cat")])
    assert str(err.value) == ("binding 0 (Plain-eps · cat · w=2 · a=1) supplies a null, but Plain-eps predicts no "
                              "variance (prediction 'eps'); set that binding's reliability to 0 or remove this node")


def test_only_experts_whose_nulls_are_pooled_are_asked_for_a_variance():
    """A binding with reliability 0 contributes no null, so its expert (which may have no variance
    at all) runs as usual, while the pooled nulls' precisions still apply."""
    from unite_and_conquer.samplers import poe
    from unite_and_conquer.samplers.poe import Binding

    class NoVariance(VarianceExpert):
        def __call__(self, x, cond, with_variance=False):
            assert not with_variance, "asked a variance of an expert whose null is not pooled"
            return super().__call__(x, cond)

    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    bindings = _bindings(True, 0.2, 0.8) + [Binding(NoVariance("C"), _cond(2, 1.0), 1.0, 0.0, (), label="C",
                                                    reliability_from_variance=True)]
    out, pooled = poe.product_prediction(x, torch.tensor(1.0), bindings, _eps_fn)
    share_a = (1 / 0.2) / (1 / 0.2 + 3 / 0.8)
    torch.testing.assert_close(pooled, share_a * (x * 0.5 + 0.5) + (1 - share_a) * (x * 0.5 - 0.25))
    expected = 2 * (x * 0.5 + 1) + (x * 0.5 - 1) + (x * 0.5 + 2) - 3 * pooled
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_variance_reliability_holds_with_a_band_on_a_binding():
    """A band takes the banded path of the rule; the pooled null there is still precision-weighted."""
    from dataclasses import replace

    from unite_and_conquer.samplers import bands, poe

    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    plain = _bindings(True, 0.2, 0.8)
    banded = [replace(plain[0], band=bands.low_pass(0.5)), plain[1]]
    _, pooled_plain = poe.product_prediction(x, torch.tensor(1.0), plain, _eps_fn)
    out, pooled = poe.product_prediction(x, torch.tensor(1.0), banded, _eps_fn)
    torch.testing.assert_close(pooled, pooled_plain)
    preds = [b.expert(x, b.condition) for b in banded]
    expected = pooled + sum(b.weight * bands.band_filter(p - pooled, b.band) for b, p in zip(banded, preds))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
