"""One validation for every sampling path (samplers/validation.py), pure torch: the chain, the latent, the
rule on that canvas; and the null each product needs, per band and per level (bands.null_levels), which
also decides which nulls the forward plan runs (counted in rows)."""
from __future__ import annotations

import math

import pytest
import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import bands, poe, validation
from unite_and_conquer.samplers.validation import Latent, ProductError
from support.analytic import gaussian, gaussian_expert

LIN = alphas_cumprod_for("linear")
NULL = gaussian(0.0, 1.0)


def expert(name="E", size=8):
    return gaussian_expert(LIN, name, size)


def bind(e, weight=1.0, reliability=1.0, null=True, **kw):
    return poe.Binding(e, gaussian(0.5, 0.3), weight, reliability, (NULL,) if null else (), **kw)


def refusal(bindings, shape=(1, 3, 8, 8), finite=True) -> ProductError:
    with pytest.raises(ProductError) as err:
        validation.validate(bindings, Latent(shape, finite))
    return err.value


# --- 1. the chain ---------------------------------------------------------------------------------------

def test_undefined_rules_are_refused_with_their_fix():
    e = expert()
    assert str(refusal([])) == "the product has no bindings: connect at least one PoEBind* node"
    err = refusal([bind(e, 2.0, 0.0)])
    assert (str(err), err.cause) == ("the weights sum to 2, not 1, so the rule needs a pooled null, but every "
                                     "reliability is 0: give at least one binding with a null a reliability > 0",
                                     "experts")
    assert str(refusal([bind(e, 1.0, 1.0, null=False, label="x")])) == (
        "binding 0 (E · x): reliability is > 0 but this binding has no null condition (its expert has no trained "
        "null); set the reliability to 0 or choose how the null is formed")
    assert str(refusal([bind(e, 1.0, -1.0)])) == "binding 0 (E): reliability must be >= 0"
    assert str(refusal([bind(e, float("nan"))])) == "binding 0 (E): its weight holds NaN or Inf; fix the node that set it"


def test_negation_whose_weights_sum_to_one_needs_no_null():
    """``2 eps_1 - eps_2``: the null term's coefficient 1 - (2 - 1) is 0, so no null is asked for."""
    a, b = expert("A"), expert("B")
    product = validation.validate([bind(a, 2.0, 0.0, null=False), bind(b, -1.0, 0.0, null=False)], Latent((1, 3, 8, 8)))
    assert [x.resolution_factor for x in product.bindings] == [1, 1]
    assert str(refusal([bind(a, 2.0, 0.0, null=False), bind(b, -0.5, 0.0, null=False)])).startswith(
        "the weights sum to 1.5, not 1")


def test_sizes_must_nest_and_spaces_agree():
    big, mid, small, odd = expert("Big", 8), expert("Mid", 4), expert("Small", 2), expert("Odd", 6)
    validation.check_chain([bind(small), bind(big), bind(mid)])          # 8, 4, 2 nest, in any order
    with pytest.raises(ProductError) as err:
        validation.check_chain([bind(big), bind(odd)])
    assert str(err.value) == (
        "binding 0 (Big) makes 8px images and binding 1 (Odd) 6px: a smaller expert runs on the pooled canvas, so "
        "each expert's size must divide the larger ones (their blocks must nest); sample them at one size, or use "
        "an upsampler stage (PoEBindImage) to change the size")
    one_channel = gaussian_expert(LIN, "Grey", 8)
    one_channel.image_channels = 1
    with pytest.raises(ProductError, match=r"^binding 0 \(Big\) works on pixels \(3 channels\) but binding 1 \(Grey\) "
                                           r"works on pixels \(1 channels\)\. Experts of one product must share one"):
        validation.check_chain([bind(big), bind(one_channel)])


# --- 2. the latent ---------------------------------------------------------------------------------------

def test_the_canvas_against_every_experts_size():
    big, small = expert("Big", 8), expert("Small", 4)
    chain = [bind(big), bind(small, 2.0, 0.0)]
    product = validation.validate(chain, Latent((2, 3, 8, 8)))
    assert [b.resolution_factor for b in product.bindings] == [1, 2] and product.canvas == (8, 8)
    fix = "sample at 8 x 8, the largest expert's size"
    cases = {
        (1, 3, 12, 12): f"binding 0 (Big) makes 8 x 8 images, and the canvas is 12 x 12: an expert smaller than the "
                        "canvas runs on its k x k pooled image, so the canvas must be the same integer multiple of its "
                        f"size on both sides; {fix}",
        (1, 3, 8, 16): "binding 0 (Big) makes 8 x 8 images, and the canvas is 8 x 16: an expert smaller than the canvas "
                       "runs on its k x k pooled image, so the canvas must be the same integer multiple of its size on "
                       f"both sides; {fix}",
        (1, 3, 4, 4): f"binding 0 (Big) makes 8 x 8 images, larger than the 4 x 4 canvas; {fix}",
        (1, 3, 16, 16): "no expert of the product makes 16 x 16 images: the largest, binding 0 (Big), makes 8 x 8, so "
                        f"nothing models the detail finer than its 2 x 2 blocks; {fix}, or add an expert of the canvas's "
                        "size",
        (1, 4, 8, 8): "the latent has 4 channels, but the experts work on pixels (3 channels); make the latent with "
                      "EmptyChromaRadianceLatentImage, or VAEEncode with the pixel_space VAE",
        (1, 3, 2, 8, 8): "the latent has shape (1, 3, 2, 8, 8), but a product samples images, batch x channels x height "
                         "x width; use an image latent of pixels (3 channels)",
    }
    for shape, message in cases.items():
        err = refusal(chain, shape)
        assert (str(err), err.cause) == (message, "latent"), shape
    assert str(refusal(chain, (1, 3, 8, 8), finite=False)) == ("the latent contains NaN or Inf values; fix the node "
                                                               "that produced it")


def test_a_lone_smaller_expert_on_a_larger_canvas_is_refused_not_run_unpooled():
    """The 16 px class expert alone on a 32 px latent: nothing models the finest detail."""
    err = refusal([bind(expert("Small", 4))], (1, 3, 8, 8))
    assert str(err).startswith("no expert of the product makes 8 x 8 images: the largest, binding 0 (Small), makes "
                               "4 x 4, so nothing models the detail finer than its 2 x 2 blocks")


def test_per_image_tensors_follow_the_latents_batch():
    e = expert()
    chain = [bind(e, torch.ones(3, 1, 8, 8), 1.0)]
    validation.validate(chain, Latent((3, 3, 8, 8)))
    assert str(refusal(chain, (2, 3, 8, 8))) == ("binding 0 (E): its weight has a batch of 3, but the sampler makes 2 "
                                                 "image(s); give it a batch of 1 (shared) or 2")


# --- 3. the rule at every level -------------------------------------------------------------------------------

def test_windows_are_checked_level_by_level_not_as_one_set():
    """Two bindings of weight 1 that take turns need no null: at every level one of them acts alone."""
    a, b = expert("A"), expert("B")
    chain = [bind(a, 1.0, 0.0, null=False, sigma_window=(0.0, 1.0)), bind(b, 1.0, 0.0, null=False, sigma_window=(1.0, math.inf))]
    validation.validate(chain, Latent((1, 3, 8, 8)))
    gap = [chain[0], bind(b, 1.0, 0.0, null=False, sigma_window=(2.0, math.inf))]
    assert str(refusal(gap)).startswith("no binding is active at sigma=1; the sampler runs from")
    overlap = [bind(a, 1.0, 0.0, null=False, sigma_window=(0.0, 2.0)), chain[1]]
    assert str(refusal(overlap)).startswith("at sigma=1 (with the noise windows and reliability ramps): the weights "
                                            "sum to 2, not 1")


def test_a_pooled_expert_needs_a_full_resolution_null_where_the_fine_weights_do_not_sum_to_one():
    big, small = expert("Big", 8), expert("Small", 4)
    err = refusal([bind(big, 2.0, 0.0), bind(small, 2.0, 1.0)])
    assert str(err) == (
        "on the detail finer than 2 x 2 blocks, the weights acting there (with their bands) do not sum to 1, so the rule "
        "needs a pooled null there, but no binding whose expert makes 8px images or larger has a null with a "
        "reliability > 0: give one a null and a reliability > 0, or make the weights there sum to 1 (complementary "
        "bands of weight 1 need no null)")
    validation.validate([bind(big, 1.0, 0.0), bind(small, 2.0, 1.0)], Latent((1, 3, 8, 8)))


# --- the null each product needs, per band and per level -----------------------------------------------------

def complementary(cutoff=0.25, transition=0.0, weights=(1.0, 1.0)):
    a, b = expert("A"), expert("B")
    return [bind(a, weights[0], 1.0, band=bands.low_pass(cutoff, transition)),
            bind(b, weights[1], 1.0, band=bands.high_pass(cutoff, transition))]


@pytest.mark.parametrize("side", [7, 8, 32, 48, 64])
def test_complementary_bands_of_weight_one_need_no_null_on_any_grid(side):
    """Including 0.25 on grids whose side is a multiple of 4, where coefficients sit exactly on the edge."""
    if side % 4 == 0:
        assert (bands.radial_frequency(side, side) == 0.25).any()
    assert poe.null_levels(complementary(), (1, 3, side, side)) == [False]
    assert poe.null_levels(complementary(0.3, 0.2), (1, 3, side, side)) == [False]   # raised-cosine ramps
    assert poe.null_levels(complementary(weights=(1.0, 2.0)), (1, 3, side, side)) == [True]
    gap = [bind(expert("A"), 1.0, 1.0, band=bands.low_pass(0.25)), bind(expert("B"), 1.0, 1.0, band=bands.high_pass(0.3))]
    assert poe.null_levels(gap, (1, 3, side, side)) == [True]
    assert poe.null_levels(gap, (1, 3, 3, 3)) == [False]     # a 3 x 3 grid has no coefficient in [0.25, 0.3)


class Counting:
    """A native-looking expert that counts its forwards and rows."""

    def __init__(self, name, size=8):
        self.name, self.resolution, self.image_channels = name, size, 3
        self.calls = self.rows = 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        self.rows += x.shape[0]
        return x * 0.5 + cond["c"].view(-1, 1, 1, 1)


def c(v):
    return {"c": torch.tensor([float(v)])}


def eps_fn(e, x, sigma, cond):
    return e(x, sigma, cond)


def test_complementary_bands_run_no_null_and_equal_the_unbanded_binding():
    a, b = Counting("A"), Counting("B")
    lo, hi = bands.low_pass(0.25), bands.high_pass(0.25)
    chain = [poe.Binding(a, c(1), 1.0, 1.0, (c(0),), band=lo), poe.Binding(b, c(2), 1.0, 1.0, (c(0),), band=hi)]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out, pooled = poe.product_prediction(x, torch.tensor(1.0), chain, eps_fn)
    assert pooled is None and (a.rows, b.rows) == (2, 2)      # one conditional row each, no null row
    want = bands.band_filter(x * 0.5 + 1, lo) + bands.band_filter(x * 0.5 + 2, hi)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    # Weights 1 and 2: the null term acts above the cutoff, and both nulls run (one row each, shared key).
    a.rows = b.rows = 0
    poe.product_prediction(x, torch.tensor(1.0), [chain[0], poe.Binding(b, c(2), 2.0, 1.0, (c(0),), band=hi)], eps_fn)
    assert (a.rows, b.rows) == (4, 4)


def test_a_coarse_null_runs_only_where_its_level_needs_it():
    """Full-resolution w = 2 (with a null) and a 2x-smaller expert at w = -1: on the fine detail the weights sum
    to 2 (the null term acts), on the 2 x 2 block means to 1 (it vanishes), so the coarse null never runs."""
    full, coarse = Counting("Full", 8), Counting("Coarse", 4)
    chain = [poe.Binding(full, c(1), 2.0, 1.0, (c(0),)),
             poe.Binding(coarse, c(2), -1.0, 1.0, (c(-1),), resolution_factor=2)]
    assert poe.null_levels(chain, (1, 3, 8, 8)) == [True, False]
    plan = poe.plan_forwards(chain, (1, 3, 8, 8))
    assert plan.null_index[0] and not plan.null_index[1]
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    poe.product_prediction(x, torch.tensor(1.0), chain, eps_fn)
    assert (full.rows, coarse.rows) == (2, 1)
    # At w = 1 for the coarse expert the block means need the null too, and both nulls run.
    chain[1] = poe.Binding(coarse, c(2), 1.0, 1.0, (c(-1),), resolution_factor=2)
    assert poe.null_levels(chain, (1, 3, 8, 8)) == [True, True]


def _dense_null_term(weights, band_list, factors, side):
    """C = I - sum_i w_i F_i as an (n x n) matrix on one channel, column by column (F_i from bands.py's own
    pieces is fine here: what is tested is the decision from one random probe)."""
    n = side * side
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, side, side)
    cols = eye.clone()
    for w, b, k in zip(weights, band_list, factors):
        f = bands.band_filter(eye, b) if k == 1 else bands.upsample(bands.band_filter(bands.pool(eye, k), b), k)
        cols = cols - w * f
    return cols.reshape(n, n).T


def test_the_probe_decides_as_the_dense_null_term_does():
    """On random products (bands, factors, weights that sum to 1 or not), ``null_levels`` agrees with the rank
    of C restricted to each level's subspace, computed densely."""
    g = torch.Generator().manual_seed(3)
    side = 8
    pick = lambda n: int(torch.randint(n, (1,), generator=g))          # noqa: E731
    for trial in range(60):
        count = 1 + pick(3)
        factors = [[1, 2, 4][pick(3)] for _ in range(count)]
        band_list = [None, bands.low_pass(0.25), bands.high_pass(0.25), bands.band_pass(0.2, 0.6, 0.1)]
        chosen = [band_list[pick(4)] for _ in range(count)]
        weights = [float(torch.randint(-2, 3, (1,), generator=g)) for _ in range(count)]
        if trial % 3 == 0:                      # complementary pairs of weight 1, the case that needs no null
            factors, chosen, weights = [1, 1], [bands.low_pass(0.3), bands.high_pass(0.3)], [1.0, 1.0]
        got = bands.null_levels(weights, chosen, factors, (1, 1, side, side))
        c = _dense_null_term(weights, chosen, factors, side)
        levels = bands.levels_of(factors)
        eye = torch.eye(side * side, dtype=torch.float64).reshape(-1, 1, side, side)
        for m, level in enumerate(levels):
            coarser = levels[m + 1] if m + 1 < len(levels) else None
            s = bands.project(eye, level) - (bands.project(eye, coarser) if coarser else 0)
            s = s.reshape(side * side, -1).T
            acts = bool(torch.linalg.matrix_norm(c @ s) > 1e-9)
            assert got[m] == acts, (trial, weights, factors, chosen)
