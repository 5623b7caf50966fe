"""Descriptions say what the rule and the corrector do, from the functions that decide it: the pooled
null from ``poe.needs_pooled_null`` (the plan's own rule), a corrector's cost from
``correctors.evaluations_per_level`` (what a level really evaluates)."""
from __future__ import annotations

import math

import pytest
import torch

from unite_and_conquer.samplers import correctors, poe
from unite_and_conquer.samplers.describe import describe_corrector, describe_rule

NO_NULL = "no null forward runs"


class Named:
    def __init__(self, name):
        self.name = name


def c(v):
    return {"c": torch.tensor([float(v)])}


def half(top: bool, size: int = 4) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., : size // 2, :] = 1.0
    return m if top else 1 - m


def test_masked_weights_summing_to_one_on_average_still_need_the_null():
    """1.5 on the top half and 0.5 on the bottom: the means sum to 1, the per-pixel sums do not."""
    a, b = Named("A"), Named("B")
    bindings = [poe.Binding(a, c(1), 1.5 * half(True), 0.5 * half(True), (c(0),), label="top"),
                poe.Binding(b, c(2), 0.5 * half(False), 0.5 * half(False), (c(0),), label="bottom")]
    assert poe.needs_pooled_null(bindings)
    plan = poe.plan_forwards(bindings)
    assert plan.null_levels == [True] and all(plan.null_index)
    rule = describe_rule(bindings)
    assert NO_NULL not in rule
    assert "sum of weights = 0.5..1.5 per pixel" in rule


def test_weights_summing_to_one_at_every_pixel_run_no_null_and_say_so():
    a, b = Named("A"), Named("B")
    bindings = [poe.Binding(a, c(1), half(True), 0.5, (c(0),), label="top"),
                poe.Binding(b, c(2), half(False), 0.5, (c(0),), label="bottom")]
    assert not poe.needs_pooled_null(bindings)
    plan = poe.plan_forwards(bindings)
    assert plan.null_levels == [False] and plan.null_index == [[], []]
    assert NO_NULL in describe_rule(bindings) and "sum of weights = 1..1 per pixel" in describe_rule(bindings)
    scalar = [poe.Binding(a, c(1), 0.25, 0.5, (c(0),)), poe.Binding(b, c(2), 0.75, 0.5, (c(0),))]
    assert "sum of weights = 1\n" in describe_rule(scalar) and NO_NULL in describe_rule(scalar)


def test_banded_weights_report_their_total_per_frequency():
    """Complementary bands of weight 5 each balance a null of 5 at every frequency; a lone low-pass
    of 4 beside an all-pass 1 ranges from 5 (below the cutoff) to 1 (above)."""
    from unite_and_conquer.samplers import bands

    a, b = Named("A"), Named("B")
    lo, hi = bands.low_pass(0.25, 0.1), bands.high_pass(0.25, 0.1)
    split = [poe.Binding(a, c(1), 5.0, 0.5, (c(0),), label="layout", band=lo),
             poe.Binding(b, c(2), 5.0, 0.5, (c(0),), label="texture", band=hi)]
    lines = describe_rule(split).splitlines()
    # The band form opens the text: the plain formula's weight sum (10) says nothing about a banded product.
    assert lines[0] == ("product of 2 binding(s) over 2 expert(s): eps = u + sum_i w_i F_i(eps_i - u),  "
                        "u = sum_j a_j eps_j(x, null_j) per band")
    assert lines[1] == "  per frequency, sum_i w_i F_i(f) = 5 (the weight the null term balances in each band)"
    assert "sum of weights" not in describe_rule(split)
    assert lines[2].endswith("low-pass < 0.25 (transition 0.1)")
    one_band = [poe.Binding(a, c(1), 4.0, 0.5, (c(0),), band=bands.low_pass(0.5)), poe.Binding(b, c(2), 1.0, 0.5, (c(0),))]
    assert "  per frequency, sum_i w_i F_i(f) = 1..5 (" in describe_rule(one_band)
    assert "per frequency" not in describe_rule([poe.Binding(a, c(1), 4.0, 0.5, (c(0),)),
                                                 poe.Binding(b, c(2), 1.0, 0.5, (c(0),))])


def counted_evaluations(config: correctors.CorrectorConfig) -> int:
    calls = []

    def denoise(x, sigma):
        calls.append(1)
        return 0.5 * x

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    correctors.correct(denoise, x, 1.0, config, torch.Generator().manual_seed(1), {})
    return len(calls)


@pytest.mark.parametrize("config, cost", [
    (correctors.CorrectorConfig(method="none", steps=6), 0),
    (correctors.CorrectorConfig(method="mala", steps=3), 4),
    (correctors.CorrectorConfig(method="mala", steps=3, energy="simpson"), 7),
    (correctors.CorrectorConfig(method="uhmc", steps=2, leapfrog_steps=3), 6),
    (correctors.CorrectorConfig(method="ula", steps=5), 5),
])
def test_the_corrector_description_states_what_a_level_evaluates(config, cost):
    assert counted_evaluations(config) == cost == correctors.evaluations_per_level(config)
    assert describe_corrector(config).endswith(f"(+{cost} product evaluation(s) per level)")


def test_the_corrector_description_names_method_steps_and_window():
    config = correctors.CorrectorConfig(method="mala", steps=3, step_scale=0.05, sigma_window=(0.6, float("inf")),
                                        step_rule="sigma2")
    assert describe_corrector(config) == ("mala, 3 steps of 0.05 sigma^2 per level for sigma in [0.6, inf] "
                                          "(+4 product evaluation(s) per level)")
    assert describe_corrector(correctors.CorrectorConfig()) == (
        "uhmc, 4 steps sized for signal-to-noise 0.15 per level for sigma in [0.06, inf] "
        "(+4 product evaluation(s) per level)")


def _digits_like(reliabilities):
    experts = [Named("class"), Named("colour"), Named("layout")]
    return [poe.Binding(e, c(i + 1), w, a, (c(0),), label=e.name)
            for i, (e, w, a) in enumerate(zip(experts, (4.0, 2.0, 2.0), reliabilities))]


def test_null_coefficients_rewrite_the_rule_as_guidance_against_each_experts_own_null():
    """sum_i w_i (eps_i - n_i) + sum_j k_j n_j equals ``combine`` on random predictions, and the k_j sum to 1."""
    g = torch.Generator().manual_seed(0)
    cond, null = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    for rel in ((1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (0.2, 0.1, 0.7)):
        bindings = _digits_like(rel)
        k = poe.null_coefficients(bindings)
        assert [label for label, _ in k] == ["class", "colour", "layout"]
        assert sum(v for _, v in k) == pytest.approx(1.0)
        ws = [b.weight for b in bindings]
        rewritten = sum(w * (cond[i] - null[i]) + k[i][1] * null[i] for i, w in enumerate(ws))
        product, _ = poe.combine(list(cond), ws, list(null), list(rel))
        torch.testing.assert_close(product, rewritten, rtol=0, atol=1e-5)
    assert [v for _, v in poe.null_coefficients(_digits_like((1.0, 1.0, 1.0)))] == pytest.approx([5 / 3, -1 / 3, -1 / 3])
    assert [v for _, v in poe.null_coefficients(_digits_like((4.0, 2.0, 2.0)))] == pytest.approx([0.5, 0.25, 0.25])


def test_a_negative_null_coefficient_is_named_in_the_rule_and_weights_as_reliabilities_clear_it():
    note = [line for line in describe_rule(_digits_like((1.0, 1.0, 1.0))).splitlines() if "note:" in line]
    assert note == ["  note: net null weights w_j - (sum w - 1) a_j below 0 (colour -0.333, layout -0.333) subtract "
                    "those experts' priors; reliabilities equal to the weights guide every expert against its own "
                    "null (README, 'Choosing reliabilities')"]
    assert "note:" not in describe_rule(_digits_like((4.0, 2.0, 2.0)))
    a, b = Named("ADM"), Named("GLIDE")
    paper = [poe.Binding(a, c(1), 5.0, 0.5556, (c(0),)), poe.Binding(b, c(2), 5.0, 0.4444, (c(0),))]
    assert poe.null_coefficients(paper)[0][1] == pytest.approx(-0.0004, abs=1e-6)
    assert "note:" not in describe_rule(paper)


def test_one_expert_and_one_null_shared_by_bindings_is_one_coefficient_and_no_note():
    """Classifier-free guidance split over two bindings of one model: its null is the whole base."""
    m = Named("M")
    bindings = [poe.Binding(m, c(1), 5.0, 1.0, (c(0),), label="cat"), poe.Binding(m, c(2), 3.0, 1.0, (c(0),), label="hat")]
    assert poe.null_coefficients(bindings) == [("cat + hat", pytest.approx(1.0))]
    assert "note:" not in describe_rule(bindings)


def test_null_coefficients_are_undefined_where_the_rule_is_not_of_that_form():
    """Also where a binding's own null is not in the pool: a prior expert's workflow (class w = 3 with
    reliability 0, prior w = 0) is classifier-free guidance against another model's null, and says nothing."""
    a, b = Named("A"), Named("B")
    assert poe.null_coefficients([poe.Binding(a, c(1), 4.0, 1.0, (c(0),)), poe.Binding(b, c(2), 2.0, 0.0, ())]) is None
    prior_expert = [poe.Binding(a, c(3), 3.0, 0.0, (c(0),), label="class"),
                    poe.Binding(b, c(0), 0.0, 1.0, (c(0),), label="prior")]
    assert poe.null_coefficients(prior_expert) is None and "note:" not in describe_rule(prior_expert)
    negation = [poe.Binding(a, c(1), 3.0, 1.0, (c(0),)), poe.Binding(b, c(2), -1.0, 1.0, (c(0),))]
    assert poe.null_coefficients(negation) is None
    assert poe.null_coefficients([poe.Binding(a, c(1), 4.0 * half(True), 1.0, (c(0),)),
                                  poe.Binding(b, c(2), 2.0, 1.0, (c(0),))]) is None
    assert poe.null_coefficients([poe.Binding(a, c(1), 4.0, 1.0, (c(0),), sigma_window=(0.5, math.inf)),
                                  poe.Binding(b, c(2), 2.0, 1.0, (c(0),))]) is None
