"""The harder analytic products (benchmarks/analytic_cases.py): their closed form, and the one default
corrector against it through the node path (ProductGuider, ComfyUI's Euler, CorrectedKSampler).

Target (issue #17): W2 <= 0.25 on every case within 200 product evaluations, 4096 samples (the
noise floor of exact samples is listed in BENCHMARKS.md, "Analytic products: corrector step rules").
"""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.benchmarks import analytic_cases as cases
from unite_and_conquer.samplers.correctors import CorrectorConfig
from unite_and_conquer.tests.support.analytic import product_gaussian

SAMPLES = 4096
TARGET_W2 = 0.25
BUDGET = 200


def test_closed_form_with_one_shared_null_is_the_scalar_rule():
    """With every null N(0, 1) and reliabilities summing to anything, each pixel is product_gaussian's product."""
    case = cases.Case("shared null", (cases.Part("linear", 2.0, 0.3), cases.Part("cosine", 1.5, 0.7)), seed=1,
                      null_mean_range=(0.0, 0.0), null_var_range=(1.0, 1.0))
    mean, var = case.closed_form()
    params = case.parameters()
    for idx in [(0, 0, 0), (2, 3, 1)]:
        parts = [(float(m[0][idx]), float(v[0][idx]), p.weight) for p, (m, v, _, _) in zip(case.parts, params)]
        m_ref, v_ref = product_gaussian(parts)
        assert float(mean[idx]) == pytest.approx(m_ref, rel=1e-5) and float(var[idx]) == pytest.approx(v_ref, rel=1e-5)


def test_cases_are_hard_per_pixel_and_normalisable():
    assert any(len(c.parts) >= 3 for c in cases.CASES)
    for c in cases.CASES:
        mean, var = c.closed_form()
        assert mean.shape == var.shape == cases.SHAPE and bool((var > 0).all())
        assert mean.std() > 0.1                                  # per-pixel, not one number
        assert any(p.weight > 1 for p in c.parts) or c.name.startswith("two experts, w (1, 1)")
        nulls = [(mn, vn) for _, _, mn, vn in c.parameters()]
        assert not torch.equal(nulls[0][0], nulls[1][0])         # a different null per expert


def test_w2_of_exact_samples_is_the_noise_floor():
    for c in cases.CASES:
        assert cases.noise_floor(c, SAMPLES) < 0.1


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.name)
def test_default_corrector_meets_the_target_where_plain_sampling_does_not(case):
    corrected = cases.run(case, "euler", 40, CorrectorConfig(), SAMPLES)
    plain = cases.run(case, "euler", BUDGET, None, SAMPLES)
    assert corrected.evaluations <= BUDGET
    assert corrected.w2 <= TARGET_W2 < plain.w2, (corrected.w2, plain.w2)
    assert corrected.report.startswith("corrected ")
