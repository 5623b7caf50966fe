"""The product-of-experts rule and the grouping of forwards (pure torch, no ComfyUI)."""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.samplers import poe


class CountingExpert:
    """eps = a linear function of x and the condition, counting forwards and rows."""

    def __init__(self, name="E", scale=1.0):
        self.name = name
        self.scale = scale
        self.calls = 0
        self.rows = 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        self.rows += x.shape[0]
        return self.scale * x * 0.5 + cond["c"].view(-1, 1, 1, 1)


def eps_fn(expert, x, sigma, cond):
    return expert(x, sigma, cond)


def c(v):
    return {"c": torch.tensor([float(v)])}


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
SIGMA = torch.tensor(1.5)


def test_single_expert_weight_one_is_that_expert_exactly():
    e = CountingExpert()
    out, pooled = poe.product_prediction(X, SIGMA, [poe.Binding(e, c(2), 1.0, 0.0)], eps_fn)
    assert torch.equal(out, e(X, SIGMA, {"c": torch.tensor([2.0, 2.0])}))
    assert pooled is None


@pytest.mark.parametrize("s", [0.0, 1.5, 4.0])
def test_one_expert_bound_twice_is_classifier_free_guidance(s):
    e = CountingExpert()
    null = c(-1)
    bindings = [poe.Binding(e, c(3), 1 + s, 0.5, (null,)), poe.Binding(e, null, 0.0, 0.5, (null,))]
    out, _ = poe.product_prediction(X, SIGMA, bindings, eps_fn)
    eps_c = e(X, SIGMA, {"c": torch.tensor([3.0, 3.0])})
    eps_u = e(X, SIGMA, {"c": torch.tensor([-1.0, -1.0])})
    torch.testing.assert_close(out, (1 + s) * eps_c - s * eps_u, atol=1e-6, rtol=1e-6)


def test_one_batched_forward_per_expert_with_shared_null():
    a, b = CountingExpert("A"), CountingExpert("B", 2.0)
    bindings = [poe.Binding(a, c(1), 2.0, 1.0, (c(0),)), poe.Binding(a, c(2), 1.0, 1.0, (c(0),)),
                poe.Binding(b, c(5), 1.0, 2.0, (c(0),))]
    poe.product_prediction(X, SIGMA, bindings, eps_fn)
    # A: rows c1, c2 and one shared null; B: c5 and its null. One call each.
    assert (a.calls, a.rows) == (1, 3 * X.shape[0])
    assert (b.calls, b.rows) == (1, 2 * X.shape[0])


def test_no_null_forward_when_weights_sum_to_one():
    a, b = CountingExpert("A"), CountingExpert("B")
    bindings = [poe.Binding(a, c(1), 0.25, 1.0, (c(0),)), poe.Binding(b, c(2), 0.75, 1.0, (c(0),))]
    out, pooled = poe.product_prediction(X, SIGMA, bindings, eps_fn)
    assert pooled is None and a.rows == X.shape[0] and b.rows == X.shape[0]


def test_rule_matches_the_formula_with_normalised_reliabilities():
    a, b = CountingExpert("A"), CountingExpert("B", 3.0)
    w, r = (5.0, 5.0), (5.0, 4.0)
    bindings = [poe.Binding(a, c(1), w[0], r[0], (c(0),)), poe.Binding(b, c(2), w[1], r[1], (c(-2),))]
    out, pooled = poe.product_prediction(X, SIGMA, bindings, eps_fn)
    ea = a(X, SIGMA, {"c": torch.tensor([1.0, 1.0])})
    eb = b(X, SIGMA, {"c": torch.tensor([2.0, 2.0])})
    ua = a(X, SIGMA, {"c": torch.tensor([0.0, 0.0])})
    ub = b(X, SIGMA, {"c": torch.tensor([-2.0, -2.0])})
    u = 5 / 9 * ua + 4 / 9 * ub
    torch.testing.assert_close(pooled, u, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, 5 * ea + 5 * eb - 9 * u, atol=1e-5, rtol=0)


def test_zero_weight_binding_is_a_prior_and_costs_no_conditional_row():
    a, prior = CountingExpert("A"), CountingExpert("P")
    bindings = [poe.Binding(a, c(1), 2.0, 0.0, (c(0),)), poe.Binding(prior, c(0), 0.0, 1.0, (c(0),))]
    out, pooled = poe.product_prediction(X, SIGMA, bindings, eps_fn)
    assert prior.rows == X.shape[0]  # only the null row
    ea = a(X, SIGMA, {"c": torch.tensor([1.0, 1.0])})
    up = prior(X, SIGMA, {"c": torch.tensor([0.0, 0.0])})
    torch.testing.assert_close(out, 2 * ea - up, atol=1e-6, rtol=0)


def test_mean_of_several_null_rows():
    a = CountingExpert("A")
    nulls = (c(1), c(3))
    out, pooled = poe.product_prediction(X, SIGMA, [poe.Binding(a, c(5), 2.0, 1.0, nulls)], eps_fn)
    torch.testing.assert_close(pooled, a(X, SIGMA, {"c": torch.tensor([2.0, 2.0])}), atol=1e-6, rtol=0)


def test_empty_set_samples_the_pooled_prior():
    a, b = CountingExpert("A"), CountingExpert("B", 2.0)
    bindings = [poe.Binding(a, c(1), 0.0, 1.0, (c(0),)), poe.Binding(b, c(1), 0.0, 3.0, (c(1),))]
    out, pooled = poe.product_prediction(X, SIGMA, bindings, eps_fn)
    expected = 0.25 * a(X, SIGMA, {"c": torch.zeros(2)}) + 0.75 * b(X, SIGMA, {"c": torch.ones(2)})
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_sigma_window_skips_the_forward():
    a, b = CountingExpert("A"), CountingExpert("B")
    bindings = [poe.Binding(a, c(1), 1.0, 0.0), poe.Binding(b, c(2), 1.0, 1.0, (c(0),), sigma_window=(0.0, 1.0))]
    out, _ = poe.product_prediction(X, torch.tensor(2.0), bindings, eps_fn)
    assert b.calls == 0
    torch.testing.assert_close(out, a(X, SIGMA, {"c": torch.tensor([1.0, 1.0])}))


def test_spatial_constant_masks_reduce_to_the_global_rule():
    a, b = CountingExpert("A"), CountingExpert("B", 3.0)
    glob = [poe.Binding(a, c(1), 2.0, 1.0, (c(0),)), poe.Binding(b, c(2), 3.0, 2.0, (c(-1),))]
    ones = torch.ones(1, 1, 4, 4)
    spatial = [poe.Binding(a, c(1), 2.0 * ones, 1.0 * ones, (c(0),)), poe.Binding(b, c(2), 3.0 * ones, 2.0 * ones, (c(-1),))]
    g, _ = poe.product_prediction(X, SIGMA, glob, eps_fn)
    s, _ = poe.product_prediction(X, SIGMA, spatial, eps_fn)
    torch.testing.assert_close(s, g, atol=1e-6, rtol=0)


def test_per_pixel_all_zero_reliability_falls_back_to_uniform_mean():
    r = poe.normalise_reliabilities([torch.tensor([0.0, 2.0]), torch.tensor([0.0, 6.0])])
    assert r[0].tolist() == [0.5, 0.25] and r[1].tolist() == [0.5, 0.75]


def test_nan_from_an_expert_is_named():
    class Bad(CountingExpert):
        def __call__(self, x, sigma, cond):
            return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match=r"^Bad returned NaN or Inf at sigma=1.5"):
        poe.product_prediction(X, SIGMA, [poe.Binding(Bad("Bad"), c(1), 1.0, 0.0)], eps_fn)


def test_negation_pushes_away_along_the_negated_direction():
    a = CountingExpert("A")
    null = c(0)
    bindings = [poe.Binding(a, c(2), 1.0, 1.0, (null,)), poe.Binding(a, c(5), -0.5, 0.0, (null,))]
    out, u = poe.product_prediction(X, SIGMA, bindings, eps_fn)
    e2 = a(X, SIGMA, {"c": torch.tensor([2.0, 2.0])})
    e5 = a(X, SIGMA, {"c": torch.tensor([5.0, 5.0])})
    torch.testing.assert_close(out, u + (e2 - u) - 0.5 * (e5 - u), atol=1e-6, rtol=0)


def test_reliability_ramp_hands_the_prior_over_in_log_sigma():
    ramp = (10.0, 1.0, 0.1, 0.0)
    assert poe.ramp_factor(20.0, ramp) == 1.0 and poe.ramp_factor(0.05, ramp) == 0.0
    assert poe.ramp_factor(1.0, ramp) == pytest.approx(0.5)
    a, b = CountingExpert("A"), CountingExpert("B", 2.0)
    bindings = [poe.Binding(a, c(1), 2.0, 1.0, (c(0),), reliability_ramp=ramp),
                poe.Binding(b, c(1), 0.0, 1.0, (c(3),), reliability_ramp=(10.0, 0.0, 0.1, 1.0))]
    _, u = poe.product_prediction(X, torch.tensor(1.0), bindings, eps_fn)
    ua = a(X, SIGMA, {"c": torch.zeros(2)})
    ub = b(X, SIGMA, {"c": torch.full((2,), 3.0)})
    torch.testing.assert_close(u, 0.5 * ua + 0.5 * ub, atol=1e-6, rtol=0)
    _, u_late = poe.product_prediction(X, torch.tensor(0.05), bindings, eps_fn)
    torch.testing.assert_close(u_late, ub, atol=1e-6, rtol=0)


def previous_combine(cond_preds, weights, null_preds=(), reliabilities=()):
    """The rule as it was written before the in-place combination, term by term out of place."""
    pooled = None
    if null_preds:
        pooled = sum(a.to(p) * p for a, p in zip(poe.normalise_reliabilities(reliabilities), null_preds))
    ref = cond_preds[0] if cond_preds else pooled
    out = torch.zeros_like(ref)
    total_w = torch.zeros((), dtype=ref.dtype, device=ref.device)
    for w, p in zip(weights, cond_preds):
        w = torch.as_tensor(w).to(p)
        out = out + w * p
        total_w = total_w + w
    if pooled is not None:
        out = out - (total_w - 1) * pooled
    return out, pooled


G = torch.Generator().manual_seed(3)
PREDS = [torch.randn(2, 3, 4, 4, generator=G) for _ in range(6)]
MASK = torch.rand(1, 1, 4, 4, generator=G)


@pytest.mark.parametrize("weights, reliabilities", [
    ((1.0,), ()),                                            # one expert alone
    ((3.0, 3.0), (0.5, 0.5)),                                # the paper's product with guidance
    ((1.0, -0.5, 2.0), (1.0, 0.0, 3.0)),                     # negation, a zero reliability
    ((torch.tensor(2.0), 1.5), (torch.tensor(1.0), 2)),      # 0-d tensors and ints
    ((2.0 * MASK, 3.0 * (1 - MASK)), (MASK, 1 - MASK)),      # spatial weights and reliabilities
    ((0.0, 2.5), (0.0, 0.0)),                                # all reliabilities 0: the uniform mean
], ids=["alone", "paper", "negation", "tensors", "spatial", "uniform-null"])
def test_in_place_combination_equals_the_previous_formula(weights, reliabilities):
    n = len(weights)
    cond, null = PREDS[:n], PREDS[3:3 + len(reliabilities)]
    before = [p.clone() for p in PREDS]
    got, got_pooled = poe.combine(cond, weights, null, reliabilities)
    want, want_pooled = previous_combine(cond, weights, null, reliabilities)
    # Float32 rounding of values up to ~10: the rule is evaluated as u + sum w_i (eps_i - u).
    assert (got - want).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item())
    assert (got_pooled is None) == (want_pooled is None)
    if want_pooled is not None:
        assert (got_pooled - want_pooled).abs().max().item() <= 1e-6
    assert all(torch.equal(p, q) for p, q in zip(PREDS, before))  # the predictions are read, never written


def test_combination_of_the_prior_alone():
    got, pooled = poe.combine([], [], PREDS[:2], (1.0, 3.0))
    want = previous_combine([], [], PREDS[:2], (1.0, 3.0))[1]
    assert (pooled - want).abs().max().item() <= 1e-6


def test_staged_conditions_are_stacked_once_per_run_and_change_nothing(monkeypatch):
    a, b = CountingExpert("A"), CountingExpert("B", 2.0)
    bindings = [poe.Binding(a, c(1), 2.0, 1.0, (c(0),)), poe.Binding(b, c(5), 1.0, 2.0, (c(-1),))]
    want, want_u = poe.product_prediction(X, SIGMA, bindings, eps_fn)
    stacked = []
    original = poe.stack_conditions
    monkeypatch.setattr(poe, "stack_conditions", lambda rows, batch: stacked.append(len(rows)) or original(rows, batch))
    staged: dict = {}
    for step in range(3):
        out, u = poe.product_prediction(X, SIGMA, bindings, eps_fn, staged)
        assert torch.equal(out, want) and torch.equal(u, want_u)
    conditions = [k for k in staged if k[0] != "null_levels"]
    assert stacked == [2, 2] and len(conditions) == 2  # once per expert, not once per step
    assert len(staged) == 3                             # and where the null term acts, once per set of bindings
    # Another batch size is another entry, not a wrong one.
    x3 = torch.cat([X, X[:1]])
    out3, _ = poe.product_prediction(x3, SIGMA, bindings, eps_fn, staged)
    assert torch.equal(out3[:2], want) and len(staged) == 5


def test_nan_in_the_null_rows_is_named_too():
    class HalfBad(CountingExpert):
        def __call__(self, x, sigma, cond):
            out = super().__call__(x, sigma, cond)
            return torch.where(cond["c"].view(-1, 1, 1, 1) == 0, float("inf"), out)

    bindings = [poe.Binding(HalfBad("HalfBad"), c(1), 2.0, 1.0, (c(0),))]
    with pytest.raises(FloatingPointError, match=r"^HalfBad returned NaN or Inf at sigma=1.5"):
        poe.product_prediction(X, SIGMA, bindings, eps_fn)


class PlacedExpert(CountingExpert):
    """A CountingExpert whose weights sit on ``device``: any input left elsewhere is a device mismatch."""

    def __init__(self, name, device, scale=1.0):
        super().__init__(name, scale)
        self.device = torch.device(device)
        self.seen = []

    def __call__(self, x, sigma, cond):
        self.seen.append((x.device, sigma.device, {v.device for v in cond.values()}))
        weight = torch.full((1, 1, 1, 1), self.scale, device=self.device)
        return weight * x * 0.5 + cond["c"].view(-1, 1, 1, 1) / sigma.view(-1, 1, 1, 1)


def test_experts_on_other_devices_get_x_and_conditions_there():
    """Fake CUDA tensors (torch's FakeTensorMode) carry devices and refuse every op that mixes two,
    so the moves between GPUs are checked without one. The rule itself is not run here: it reads
    sigma and the scalar weights on the host, which fake tensors cannot answer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, b, same = PlacedExpert("A", "cuda:1"), PlacedExpert("B", "cpu", 2.0), PlacedExpert("C", "cuda:0", 3.0)
    bindings = [poe.Binding(a, c(1), 2.0, 1.0, (c(0),)), poe.Binding(b, c(5), 1.0, 2.0, (c(-1),)),
                poe.Binding(same, c(3), 0.5, 0.0)]
    plan = poe.plan_forwards(bindings)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 3, 4, 4).to("cuda:0")
        sigma = torch.full((2,), 1.5).to("cuda:0")
        staged: dict = {}
        for step in range(2):
            outs = poe.run_plan(plan, x, sigma, eps_fn, staged, device_of=lambda e: e.device)
            assert [[p.device for p in preds] for preds in outs] == [[x.device] * 2, [x.device] * 2, [x.device]]
        for e in (a, b, same):
            assert e.seen == [(e.device, e.device, {e.device})] * 2, e.name
        # Each expert's conditions are staged once, on its own device.
        assert sorted(key[-1] for key in staged) == ["cpu", "cuda:0", "cuda:1"]
        with pytest.raises(RuntimeError, match="two devices"):  # without device_of, fake tensors object
            poe.run_plan(plan, x, sigma, eps_fn, {})
