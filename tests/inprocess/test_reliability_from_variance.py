"""Tier (b): PoEReliabilityFromVariance through ComfyUI's guider, on analytic learned-sigma experts.

Gaussian data makes the product exact in closed form: in ComfyUI's space x = x0 + sigma n, an
expert of N(mu, v) has E[x0 | x] = (v x + sigma^2 mu) / (v + sigma^2) and
Var[x0 | x] = v sigma^2 / (v + sigma^2), whatever its schedule.
"""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.nodes import bindings as bindings_mod
from unite_and_conquer.samplers import poe
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.models import wrap_expert
from support.analytic import gaussian, gaussian_expert, learned_sigma_gaussian_expert


NULL_VARS = {"A": 0.2, "B": 2.0}          # the narrower null should take most of the pooled null
PARTS = {"A": (1.0, 0.5, 2.0, 1.0), "B": (-0.5, 0.8, 1.0, 3.0)}   # mean, variance, weight, reliability


def chain():
    out = []
    for name, schedule in (("A", "linear"), ("B", "cosine")):
        e = wrap_expert(learned_sigma_gaussian_expert(alphas_cumprod_for(schedule), f"learned-{name}", 4,
                                                         null_var=NULL_VARS[name]))
        mu, var, w, a = PARTS[name]
        out.append(poe.Binding(e, gaussian(mu, var), w, a, (e.expert.null_condition,), label=name))
    return out


def posterior(x, sigma, mu, v):
    return (v * x + sigma**2 * mu) / (v + sigma**2), v * sigma**2 / (v + sigma**2)


@pytest.mark.parametrize("sigma", [0.3, 2.0, 8.0])
def test_guider_weights_the_nulls_by_their_closed_form_precision(sigma):
    flagged = bindings_mod.PoEReliabilityFromVariance.execute(experts=chain())
    rule = flagged.ui["text"][0]
    assert rule.splitlines()[-1] == ("  reliabilities: a_j / Var_j[x0 | x] per pixel, from the experts' learned "
                                     "variances (experimental)")
    guider = ProductGuider(flagged.args[0])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * sigma
    s = torch.full((2,), sigma)
    got = guider.predict_noise(x, s)
    cond = {k: posterior(x, sigma, mu, v)[0] for k, (mu, v, _, _) in PARTS.items()}
    nulls = {k: posterior(x, sigma, 0.0, NULL_VARS[k]) for k in PARTS}
    prec = {k: PARTS[k][3] / nulls[k][1] for k in PARTS}
    pooled = sum(prec[k] * nulls[k][0] for k in PARTS) / sum(prec.values())
    total_w = sum(p[2] for p in PARTS.values())
    expected = sum(PARTS[k][2] * cond[k] for k in PARTS) - (total_w - 1) * pooled
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-4)
    # Without the node, the same chain pools the nulls 1 : 3 and the answer differs.
    plain = ProductGuider(chain()).predict_noise(x, s)
    uniform = 0.25 * nulls["A"][0] + 0.75 * nulls["B"][0]
    torch.testing.assert_close(plain, sum(PARTS[k][2] * cond[k] for k in PARTS) - (total_w - 1) * uniform,
                               rtol=2e-3, atol=2e-4)
    assert (plain - got).abs().max() > 1e-2


def test_node_refuses_a_null_from_an_expert_without_a_variance():
    plain = wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "gauss-eps", 4))
    bindings = chain() + [poe.Binding(plain, gaussian(0.0, 0.3), 1.0, 1.0, (plain.expert.null_condition,),
                                      label="C")]
    with pytest.raises(ValueError) as err:
        bindings_mod.PoEReliabilityFromVariance.execute(experts=bindings)
    assert str(err.value) == (
        "PoEReliabilityFromVariance: input 'experts': binding 2 (gauss-eps · C · w=1 · a=1) supplies a null, but "
        "gauss-eps predicts no variance (prediction 'eps'); set that binding's reliability to 0 or remove this node")
    with pytest.raises(ValueError) as err:
        bindings_mod.PoEReliabilityFromVariance.execute(experts=[])
    assert str(err.value) == "PoEReliabilityFromVariance: input 'experts' is empty: connect a PoEBind* node"
