"""OR / AND by Itô log-densities (samplers/superposition.py): the estimator against closed-form
Gaussian marginals (and the authors' sign error), OR's softmax, AND's solve and clipping, the mixed
rule, and the refusals (pure torch, no ComfyUI)."""
from __future__ import annotations

import math

import pytest
import torch

from unite_and_conquer.samplers import poe, sde, superposition
from unite_and_conquer.samplers.superposition import make_group

from support.analytic import LinearExpert, call_expert, shift

G = torch.Generator().manual_seed(5)


def log_q(x, sigma, m, v):
    var = v + sigma**2
    return (-(x - m) ** 2 / (2 * var) - 0.5 * math.log(2 * math.pi * var)).flatten(1).sum(1)


def eps(x, sigma, m, v):
    return sigma * (x - m) / (v + sigma**2)


def track(sign: float, steps: int = 600, n: int = 256, d: int = 4):
    """An Euler–Maruyama path of N(m, v) in d dimensions from sigma 20 to 0.05, with the estimator's
    |eps|^2 term at ``sign`` (-1 the derivation, +1 the authors' SD-script OR branch); returns the
    tracked and the true change of log q over the path."""
    m, v = 0.7, 0.3
    sig = [20 * (0.05 / 20) ** (i / steps) for i in range(steps + 1)]
    x = m + math.sqrt(v + sig[0] ** 2) * torch.randn(n, d, generator=G, dtype=torch.float64)
    x0, tracked = x.clone(), torch.zeros(n, dtype=torch.float64)
    for s, s_next in zip(sig[:-1], sig[1:]):
        e = eps(x, s, m, v)
        x_next = sde.euler_maruyama_step(x, s, s_next, x - s * e, torch.randn(x.shape, generator=G, dtype=torch.float64))
        if sign < 0:
            tracked += superposition.ito_increment(e, x, x_next, s, s_next)
        else:
            tracked += -(e * (x_next - x)).sum(1) / s + (s**2 - s_next**2) / (2 * s**2) * (e * e).sum(1)
        x = x_next
    return tracked, log_q(x, sig[-1], m, v) - log_q(x0, sig[0], m, v)


def test_the_ito_estimator_tracks_the_log_density_along_the_path():
    """The log-density rises by about 14 nats along the path; the estimator's mean |error| is 0.28 nats
    at 1200 steps (measured 0.64, 0.44, 0.28, 0.14 at 300, 600, 1200, 4800: it falls like
    1 / sqrt(steps), the left-point noise of an Itô sum). The plus sign of the authors' SD-script OR
    branch is off by about twice the rise."""
    tracked, true = track(-1.0, steps=1200)
    assert float(true.mean()) > 10
    assert float((tracked - true).abs().mean()) < 0.4, float((tracked - true).abs().mean())
    wrong, true = track(+1.0)
    assert float((wrong - true).mean()) > 10


def test_or_is_the_softmax_of_log_density_plus_log_prior():
    log_q_ = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    kappa = superposition.or_coefficients(log_q_, (0.8, 0.2))
    expected = torch.softmax(log_q_ + torch.tensor([[math.log(0.8)], [math.log(0.2)]], dtype=torch.float64), 0)
    torch.testing.assert_close(kappa, expected)
    torch.testing.assert_close(kappa[:, 2], torch.tensor([0.8, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("members, pooled", [(2, False), (3, False), (3, True)])
def test_and_makes_every_members_increment_equal(members, pooled):
    """The step built from the solved kappa (the rule with the members at w_G kappa_m) moves every
    member's tracked log-density by the same amount."""
    x = 2 * torch.randn(5, 3, 4, 4, generator=G, dtype=torch.float64)
    s, s_next, w = 1.3, 1.2, 2.5
    means = [torch.randn(1, 3, 4, 4, generator=G, dtype=torch.float64) for _ in range(members)]
    e = [eps(x, s, m, 0.2 + 0.3 * k) for k, m in enumerate(means)]
    u = eps(x, s, 0.0, 1.5) if pooled else None
    base = eps(x, s, 0.5, 0.4)   # the rest of the rule: any prediction
    z = torch.randn(x.shape, generator=G, dtype=torch.float64)
    kappa, raw = superposition.and_coefficients(e, base, u, z, s, s_next, w, clip=(-1e9, 1e9))
    torch.testing.assert_close(kappa.sum(0), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(kappa, raw)
    mixed = base + w * sum(kappa[m].view(-1, 1, 1, 1) * (e[m] - (u if pooled else 0)) for m in range(members))
    delta = s**2 - s_next**2
    x_next = x - delta / s * mixed + math.sqrt(delta) * z
    inc = torch.stack([superposition.ito_increment(em, x, x_next, s, s_next) for em in e])
    torch.testing.assert_close(inc - inc[0], torch.zeros_like(inc), atol=1e-8, rtol=0)


def test_and_clips_then_renormalises_and_falls_back_to_even_shares():
    x = torch.randn(3, 4, generator=G, dtype=torch.float64)
    e1 = eps(x, 5.0, 0.0, 1.0)
    e2 = e1 + 1e-4 * torch.randn(x.shape, generator=G, dtype=torch.float64)   # nearly equal: large kappa
    z = torch.randn(x.shape, generator=G, dtype=torch.float64)
    kappa, raw = superposition.and_coefficients([e1, e2], torch.zeros_like(x), None, z, 5.0, 4.9, 1.0, clip=(-1.0, 2.0))
    assert float(raw.abs().max()) > 2
    assert float(kappa.min()) >= -1.0 and float(kappa.max()) <= 2.0
    torch.testing.assert_close(kappa.sum(0), torch.ones(3, dtype=torch.float64))
    kappa, raw = superposition.and_coefficients([e1, e1.clone()], torch.zeros_like(x), None, z, 5.0, 4.9, 1.0)
    torch.testing.assert_close(kappa, torch.full((2, 3), 0.5, dtype=torch.float64))


def chain():
    e = LinearExpert()
    return [poe.Binding(e, shift(1), 2.0, 1.0, (shift(0),), label="A"), poe.Binding(e, shift(2), 3.0, 1.0, (shift(0),), label="B"),
            poe.Binding(e, shift(-3), 1.5, 1.0, (shift(0),), label="class")]


def test_the_mixed_rule_is_the_rule_with_each_member_at_w_g_kappa():
    """(A OR B) x class: at kappa = the priors, the evaluated rule itself; at any kappa, the pack's
    rule with member weights w_G kappa_m, recomputed from scratch."""
    grouped = make_group(chain(), [0, 1], "or", weight=2.0, priors=[3.0, 1.0])
    assert [b.weight for b in grouped] == [1.5, 0.5, 1.5]
    g = grouped[0].group
    assert g.priors == (0.75, 0.25) and grouped[1].group is g and grouped[2].group is None
    x = torch.randn(4, 3, 4, 4, generator=G)
    sink = []
    poe.product_prediction(x, torch.tensor(0.8), grouped, call_expert, terms=sink)
    (terms,) = sink
    at_priors = torch.tensor([[0.75] * 4, [0.25] * 4], dtype=torch.float64)
    torch.testing.assert_close(superposition.mix(terms, g, at_priors), terms.output)
    kappa = torch.tensor([[0.9, -0.2, 0.5, 1.3], [0.1, 1.2, 0.5, -0.3]], dtype=torch.float64)
    for j in range(4):
        rebound = [poe.Binding(b.expert, b.condition, w, 1.0, b.null) for b, w in
                   zip(grouped, (2.0 * float(kappa[0, j]), 2.0 * float(kappa[1, j]), 1.5))]
        direct = poe.product_prediction(x[j:j + 1], torch.tensor(0.8), rebound, call_expert)[0]
        torch.testing.assert_close(superposition.mix(terms, g, kappa)[j:j + 1], direct, atol=1e-5, rtol=1e-5)
    # The rest of the rule: the members' part removed, in eps (here every term is an eps).
    rest = superposition.base_prediction(terms, g)
    torch.testing.assert_close(rest + 2.0 * (0.75 * (terms.cond[0] - terms.pooled) + 0.25 * (terms.cond[1] - terms.pooled)),
                               terms.output, atol=1e-5, rtol=1e-5)


def test_a_grouped_chain_needs_the_per_term_predictions():
    grouped = make_group(chain(), [0, 1], "and")
    x = torch.randn(2, 3, 4, 4, generator=G)
    with pytest.raises(ValueError, match="sample it with the pack's SDE step"):
        poe.product_prediction(x, torch.tensor(0.8), grouped, call_expert)


@pytest.mark.parametrize("indices, kind, kwargs, message", [
    ([0], "or", {}, "needs at least 2 bindings, got 1"),
    ([0, 1], "or", {"priors": [1.0]}, "1 prior weight"),
    ([0, 1], "or", {"priors": [1.0, 0.0]}, "finite and > 0"),
    ([0, 1], "and", {"clip": (0.6, 2.0)}, "must be finite and contain the even share 1/2"),
    ([0, 1], "xor", {}, "unknown group kind 'xor'"),
    ([0, 1], "or", {"weight": 0.0}, "finite non-zero number"),
])
def test_bad_groups_are_refused(indices, kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_group(chain(), indices, kind, **kwargs)


def test_members_belong_to_one_group_and_one_and_group_per_chain():
    grouped = make_group(chain(), [0, 1], "or")
    with pytest.raises(ValueError, match=r"binding 2 \(B\) is already in OR\(1, 2\)"):
        make_group(grouped, [1, 2], "and")
    four = chain() + [poe.Binding(LinearExpert(), shift(4), 1.0, 1.0, (shift(0),), label="D")]
    first = make_group(four, [0, 1], "and")
    with pytest.raises(ValueError, match="more than one AND group"):
        make_group(first, [2, 3], "and")


def test_a_member_with_a_mask_or_window_is_refused():
    import dataclasses

    grouped = make_group(chain(), [0, 1], "or")
    masked = list(grouped)
    masked[1] = dataclasses.replace(masked[1], weight=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"binding 2 \(B\) in OR\(1, 2\) has a mask"):
        superposition.check_groups(masked)
    windowed = list(grouped)
    windowed[0] = dataclasses.replace(windowed[0], sigma_window=(0.5, math.inf))
    with pytest.raises(ValueError, match="has a noise window or ramp"):
        superposition.check_groups(windowed)


def test_the_rule_text_names_the_groups():
    grouped = make_group(chain(), [0, 1], "or", priors=[4, 1])
    text = superposition.describe_groups(grouped)
    assert "OR(1, 2): mixture of 1. L · A (pi=0.8), 2. L · B (pi=0.2), weight 1" in text
    assert superposition.describe_groups(chain()) == ""
