"""Tier (b): bad input values at every node are refused with a message that names the node, the
input and the fix. Node-level, like ``test_nodes.py``: analytic experts, and small tiny-family
experts (random weights) where the check lives in a family's encoder.

``GAPS`` lists what ComfyUI 0.3.75 does not check itself (V3 combo values, NaN numbers), which each
node refuses.
"""
from __future__ import annotations

import re

import pytest
import torch

from unite_and_conquer import model_loaders
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.nodes import bindings, loaders, sampling, utilities
from unite_and_conquer.samplers.comfy.models import wrap_expert
from support.analytic import gaussian_expert
from support.fuzz import write_tiny


NAN_IMAGE = torch.zeros(1, 8, 8, 3).index_put_((torch.tensor([0]),) * 4, torch.tensor([float("nan")]))


def analytic(name="gauss", resolution=8, null=True):
    e = gaussian_expert(alphas_cumprod_for("linear"), name, resolution)
    e.encoders["class"] = lambda k: {"mu": torch.full((1, 3, 1, 1), float(k)), "var": torch.full((1, 3, 1, 1), 0.25)}
    e.encoders["segmentation"] = lambda m, slot=None: {"mu": m.expand(-1, 3, -1, -1), "var": torch.full((1, 3, 1, 1), 0.1)}
    e.class_names = ["a", "b", "c"]
    if not null:
        e.null_condition = None
    return wrap_expert(e)


def analytic_sketch():
    handle = analytic("Sketchy")
    handle.expert.encoders["sketch"] = lambda s: {"mu": s.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1),
                                                  "var": torch.full((1, 3, 1, 1), 0.1)}
    return handle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_validation")
    return {m: wrap_expert(model_loaders.load_expert(str(write_tiny(folder / f"{m}.safetensors", m))))
            for m in ("class", "colour", "layout")}


def bind_class(expert, index=-1, choice="1: b", weight=1.0, reliability=1.0, null="trained", experts=None, **kw):
    return bindings.PoEBindClass.execute(expert=expert, weight=weight, reliability=reliability, null=null, null_k=4,
                                         class_index=index, experts=experts, **{"class": choice}, **kw)


def text(expert, prompt, **kw):
    return bindings.PoEBindText.execute(expert=expert, text=prompt, weight=1.0, reliability=1.0, **kw)


def segmentation(expert, source="mask", **kw):
    return bindings.PoEBindSegmentation.execute(expert=expert, source=source, slot="auto", weight=1.0,
                                                reliability=1.0, **kw)


def sketch(expert, image, low=100.0, high=200.0):
    return bindings.PoEBindSketch.execute(expert=expert, image=image, edges="canny", low_threshold=low,
                                          high_threshold=high, weight=1.0, reliability=0.0)


def schedule(chain, index=-1, sigma_min=0.0, sigma_max=1e5, ramp_high=10.0, ramp_low=0.1):
    return bindings.PoEBindingSchedule.execute(experts=chain, index=index, sigma_min=sigma_min, sigma_max=sigma_max,
                                               reliability_at_high_noise=1.0, reliability_at_low_noise=0.5,
                                               ramp_sigma_high=ramp_high, ramp_sigma_low=ramp_low)


def ksample(chain, denoise=1.0, width=0, height=0, latent=None, sampler="euler", scheduler="karras"):
    return sampling.PoEKSampler.execute(experts=chain, seed=0, steps=2, sampler_name=sampler, scheduler=scheduler,
                                        denoise=denoise, width=width, height=height, batch_size=1,
                                        latent_image=latent)


def sweep(chain, values, index=-1, field="reliability"):
    return utilities.PoEReliabilitySweep.execute(experts=chain, index=index, field=field, values=values)


def chain_of(expert=None):
    return bind_class(expert or analytic()).args[0]


# Each case: a call that must fail, and the exact message (a regex only where a number is computed).
HANDLED = {
    # PoEBindClass
    "class_index out of range (tiny)": (
        lambda t: bind_class(t["class"], index=50, choice="1"),
        "PoEBindClass: input 'class_index' is 50 but Tiny digits · class has 10 classes; set class_index to -1 to "
        "use the picker"),
    "class_index disagrees with the picker (tiny)": (
        lambda t: bind_class(t["class"], index=3, choice="7"),
        "PoEBindClass: input 'class_index' is 3 but the picker says '7' (class 7); set class_index to -1 to use "
        "the picker, or pick '3'"),
    "another expert's label (ImageNet name on the digit expert)": (
        lambda t: bind_class(t["class"], choice="7: cock"),
        "PoEBindClass: input 'class': '7: cock' is not a class of Tiny digits · class, whose 10 classes are: 0, 1, "
        "2, 3, 4, 5, 6, 7, 8, 9. Pick one of them (the picker lists the connected expert's own classes)"),
    "class picker out of range (tiny)": (
        lambda t: bind_class(t["class"], choice="292: tiger"),
        "PoEBindClass: input 'class': '292: tiger' is not a class of Tiny digits · class, whose 10 classes are: 0, "
        "1, 2, 3, 4, 5, 6, 7, 8, 9. Pick one of them (the picker lists the connected expert's own classes)"),
    "class on an expert without classes": (
        lambda t: bind_class(t["colour"]),
        "PoEBindClass: input 'expert': Tiny digits · colour does not take a 'class' condition; it accepts: "
        "colour, text"),
    "unknown null choice": (
        lambda t: bind_class(analytic(), null="sometimes"),
        "PoEBindClass: input 'null': unknown null choice 'sometimes'; pick one of: trained, class0 (paper), "
        "mean of k random classes, none"),
    "trained null on an expert without one": (
        lambda t: bind_class(analytic("NoNull", null=False)),
        "PoEBindClass: input 'null': NoNull has no trained null (it was never trained with condition dropout); "
        "choose 'class0 (paper)', 'mean of k random classes' or 'none'"),
    "reliability with null none": (
        lambda t: bind_class(analytic("G"), null="none", reliability=0.5),
        "PoEBindClass: input 'reliability': G has no null for this binding, so the reliability must be 0 (another "
        "binding supplies the prior)"),
    "mask of the wrong rank": (
        lambda t: bind_class(analytic(), mask=torch.ones(1, 1, 8, 8)),
        "PoEBindClass: input 'mask': a MASK must be B x H x W, got shape (1, 1, 8, 8)"),
    "chained experts of another resolution": (
        lambda t: bind_class(analytic("Big", resolution=12), experts=chain_of()),
        "PoEBindClass: input 'expert': binding 1 (Big · class 1: b) makes 12px images and binding 0 (gauss · class "
        "1: b) 8px: a smaller expert runs on the pooled canvas, so each expert's size must divide the larger ones "
        "(their blocks must nest); sample them at one size, or use an upsampler stage (PoEBindImage) to change the "
        "size"),
    # PoEBindText
    "empty text": (
        lambda t: text(t["colour"], "  \n "),
        "PoEBindText: input 'text' is empty. Type a prompt; for an unconditional prior use PoEBindPrior instead."),
    "unknown colour word (tiny)": (
        lambda t: text(t["colour"], "purple"),
        "PoEBindText: input 'text': Tiny digits · colour: unknown colour 'purple'; the vocabulary is: red, green, "
        "blue, yellow, magenta, cyan"),
    "text on an expert without text": (
        lambda t: text(t["class"], "red"),
        "PoEBindText: input 'text': Tiny digits · class does not take a 'text' condition; it accepts: class"),
    # PoEBindPrior
    "prior without a trained null": (
        lambda t: bindings.PoEBindPrior.execute(expert=analytic("NoNull", null=False), reliability=1.0, weight=0.0),
        "PoEBindPrior: input 'expert': NoNull has no trained null condition, so it cannot act as a prior. Use an "
        "unconditional model or one trained with condition dropout."),
    # PoEBindSegmentation
    "map_mask not connected": (
        lambda t: segmentation(t["layout"]),
        "PoEBindSegmentation: input 'map_mask' is not connected but source is 'mask'; connect a MASK or pick an "
        "image source"),
    "map_image not connected": (
        lambda t: segmentation(t["layout"], source="image red"),
        "PoEBindSegmentation: input 'map_image' is not connected but source is 'image red'; connect an IMAGE or use "
        "source 'mask'"),
    "NaN map_mask": (
        lambda t: segmentation(t["layout"], map_mask=NAN_IMAGE[..., 0]),
        "PoEBindSegmentation: input 'map_mask' contains NaN or Inf values; fix the node that produced it"),
    "Inf map_image": (
        lambda t: segmentation(t["layout"], source="image luminance", map_image=NAN_IMAGE.nan_to_num(nan=float("inf"))),
        "PoEBindSegmentation: input 'map_image' contains NaN or Inf values; fix the node that produced it"),
    "bad label colour": (
        lambda t: segmentation(t["layout"], source="image colour label", map_image=torch.ones(1, 32, 32, 3),
                               label_colour="#12345"),
        "PoEBindSegmentation: input 'label_colour': colour '#12345' must look like '#ff0000'"),
    "label colour out of 0..255": (
        lambda t: segmentation(t["layout"], source="image colour label", map_image=torch.ones(1, 32, 32, 3),
                               label_colour="300, 0, 0"),
        "PoEBindSegmentation: input 'label_colour': colour '300, 0, 0' must be three values in 0..255, like "
        "'255,0,0'"),
    "segmentation on an expert without maps": (
        lambda t: segmentation(t["class"], map_mask=torch.ones(1, 32, 32)),
        "PoEBindSegmentation: input 'expert': Tiny digits · class does not take a 'segmentation' condition; it "
        "accepts: class"),
    # PoEBindSketch
    "NaN sketch image": (
        lambda t: sketch(analytic(), NAN_IMAGE),
        "PoEBindSketch: input 'image' contains NaN or Inf values; fix the node that produced it"),
    "low threshold above high": (
        lambda t: sketch(analytic(), torch.zeros(1, 8, 8, 3), low=300.0, high=200.0),
        "PoEBindSketch: input 'low_threshold' (300.0) is above high_threshold (200.0); swap them"),
    "sketch on an expert without sketches": (
        lambda t: sketch(t["class"], torch.zeros(1, 32, 32, 3)),
        "PoEBindSketch: input 'expert': Tiny digits · class does not take a 'sketch' condition; it accepts: class"),
    # PoEBindImage
    "NaN low-res image": (
        lambda t: bindings.PoEBindImage.execute(expert=analytic(), image=NAN_IMAGE, weight=1.0, reliability=0.0),
        "PoEBindImage: input 'image' contains NaN or Inf values; fix the node that produced it"),
    # PoEBindingSchedule
    "schedule index out of range": (
        lambda t: schedule(chain_of(), index=3),
        "PoEBindingSchedule: input 'index' is 3 but the chain has 1 binding(s); use 0..0 or -1 for the last"),
    "sigma window reversed": (
        lambda t: schedule(chain_of(), sigma_min=5.0, sigma_max=1.0),
        "PoEBindingSchedule: input 'sigma_min' (5.0) must be below sigma_max (1.0)"),
    "ramp reversed": (
        lambda t: schedule(chain_of(), ramp_high=0.5, ramp_low=2.0),
        "PoEBindingSchedule: input 'ramp_sigma_low' (2.0) must be below ramp_sigma_high (0.5)"),
    "window that leaves noise levels uncovered": (
        lambda t: ksample(schedule(chain_of(), sigma_min=1.0, sigma_max=2.0).args[0]),
        re.compile(r"PoEKSampler: input 'experts': no binding is active at sigma=[0-9.]+; the sampler runs from "
                   r"[0-9.]+ down to [0-9.]+: widen a binding's noise window so that every noise level is covered")),
    # PoEKSampler, PoEGuider, PoEScheduler
    "height other than the experts'": (
        lambda t: ksample(chain_of(), height=16),
        "PoEKSampler: input 'height': binding 0 (gauss · class 1: b) makes 8 x 8 images, and the canvas is 16 x 8: "
        "an expert smaller than the canvas runs on its k x k pooled image, so the canvas must be the same integer "
        "multiple of its size on both sides; sample at 8 x 8, the largest expert's size"),
    "denoise below 1 without a latent": (
        lambda t: ksample(chain_of(), denoise=0.5),
        "PoEKSampler: input 'denoise' is 0.5 but there is no latent_image to refine; connect one or set denoise to 1"),
    # Not all zeros: like the stock KSampler, PoEKSampler gives an empty (all-zero) latent the product's channels.
    "latent of another shape": (
        lambda t: ksample(chain_of(), latent={"samples": torch.ones(1, 4, 16, 16)}),
        "PoEKSampler: input 'latent_image': the latent has 4 channels, but the experts work on pixels (3 channels); "
        "make the latent with EmptyChromaRadianceLatentImage, or VAEEncode with the pixel_space VAE"),
    "NaN latent": (
        lambda t: ksample(chain_of(), latent={"samples": torch.full((1, 3, 8, 8), float("nan"))}),
        "PoEKSampler: input 'latent_image': the latent contains NaN or Inf values; fix the node that produced it"),
    "weights without a pooled null": (
        lambda t: ksample(bind_class(analytic(), weight=3.0, reliability=0.0).args[0]),
        "PoEKSampler: input 'experts': the weights sum to 3, not 1, so the rule needs a pooled null, but every "
        "reliability is 0: give at least one binding with a null a reliability > 0"),
    "empty guider": (
        lambda t: sampling.PoEGuider.execute(experts=[]),
        "PoEGuider: input 'experts' is empty: connect a PoEBind* node"),
    "empty scheduler": (
        lambda t: sampling.PoEScheduler.execute(experts=[], scheduler="karras", steps=4, denoise=1.0),
        "PoEScheduler: input 'experts' is empty: connect a PoEBind* node"),
    # PoEReliabilitySweep, PoEImageGrid
    "sweep values not numbers": (
        lambda t: sweep(chain_of(), "0.5, lots"),
        "PoEReliabilitySweep: input 'values' must be comma-separated numbers, like '0, 0.25, 0.5'"),
    "sweep values empty": (
        lambda t: sweep(chain_of(), " , ;"),
        "PoEReliabilitySweep: input 'values' is empty; give comma-separated numbers"),
    "sweep negative reliability": (
        lambda t: sweep(chain_of(), "0.5, -0.25"),
        "PoEReliabilitySweep: input 'values': reliabilities must be >= 0, got -0.25"),
    "sweep index out of range": (
        lambda t: sweep(chain_of(), "1", index=-2),
        "PoEReliabilitySweep: input 'index' is -2 but the chain has 1 binding(s); use 0..0 or -1 for the last"),
    "grid of mixed sizes": (
        lambda t: utilities.PoEImageGrid.execute(images=[torch.ones(1, 8, 8, 3), torch.ones(2, 4, 4, 3)],
                                                 columns=[0], padding=[2]),
        "PoEImageGrid: input 'images' mixes sizes [(4, 4, 3), (8, 8, 3)]; resize them to one size first"),
}


def test_refusals_leave_the_upstream_chain_untouched(tiny):
    """A refused binding must not have appended itself to the (cached) chain it was given."""
    chain = bind_class(tiny["class"], choice="3").args[0]
    with pytest.raises(ValueError):
        text(tiny["colour"], "purple", experts=chain)
    with pytest.raises(ValueError):
        schedule(chain, index=5)
    assert len(chain) == 1 and chain[0].label == "class 3" and chain[0].sigma_window == (0.0, float("inf"))


# --- inputs that ComfyUI's own validation lets through (V3 combos, NaN), refused by the nodes --------

GAPS = {
    "loader: missing file": (
        lambda t: loaders.PoEExpertLoader.execute(expert_name="nope.safetensors", family="auto", dtype="auto",
                                                  schedule="published"),
        "PoEExpertLoader: input 'expert_name': nope.safetensors is not in models/experts"),
    "class picker not a number": (
        lambda t: bind_class(analytic(), index=-1, choice="tiger"),
        "PoEBindClass: input 'class': 'tiger' is not a class of gauss, whose 3 classes are: 0: a, 1: b, 2: c. "
        "Pick one of them (the picker lists the connected expert's own classes)"),
    "NaN weight": (
        lambda t: bind_class(analytic(), weight=float("nan")),
        "PoEBindClass: input 'weight' is nan"),
    "Inf reliability": (
        lambda t: bind_class(analytic(), reliability=float("inf")),
        "PoEBindClass: input 'reliability' is inf"),
    "NaN mask (message prefixed twice)": (
        lambda t: bind_class(analytic(), mask=NAN_IMAGE[..., 0]),
        "PoEBindClass: input 'mask' contains NaN or Inf values; fix the node that produced it"),
    "mask values above 1": (
        lambda t: bind_class(analytic(), mask=torch.full((1, 8, 8), 5.0)),
        "PoEBindClass: input 'mask' must lie in [0, 1]"),
    "unknown slot": (
        lambda t: bindings.PoEBindSegmentation.execute(expert=t["layout"], source="mask", slot="C: eyes", weight=1.0,
                                                       reliability=1.0, map_mask=torch.ones(1, 32, 32)),
        "PoEBindSegmentation: input 'slot': unknown slot 'C: eyes'"),
    "layout map out of [0, 1] blamed on 'expert'": (
        lambda t: segmentation(t["layout"], map_mask=torch.full((1, 32, 32), 5.0)),
        "PoEBindSegmentation: input 'map_mask'"),
    "unknown sketch edge mode": (
        lambda t: bindings.PoEBindSketch.execute(
            expert=analytic_sketch(), image=torch.zeros(1, 8, 8, 3), edges="sobel", low_threshold=1.0,
            high_threshold=2.0, weight=1.0, reliability=0.0),
        "PoEBindSketch: input 'edges': unknown edge mode 'sobel'"),
    "NaN sigma window": (
        lambda t: schedule(chain_of(), sigma_min=float("nan")),
        "PoEBindingSchedule: input 'sigma_min' is nan"),
    "unknown sampler": (
        lambda t: ksample(chain_of(), sampler="euler_x"),
        "PoEKSampler: input 'sampler_name': unknown sampler 'euler_x'"),
    "unknown scheduler": (
        lambda t: ksample(chain_of(), scheduler="linear_x"),
        "PoEKSampler: input 'scheduler': unknown scheduler 'linear_x'"),
    "mask batch other than the sampler's": (
        lambda t: sampling.PoEKSampler.execute(
            experts=bind_class(analytic(), mask=torch.ones(3, 8, 8)).args[0], seed=0, steps=2, sampler_name="euler",
            scheduler="karras", denoise=1.0, width=0, height=0, batch_size=2),
        "PoEKSampler: input 'experts'"),
    "sweep NaN value": (
        lambda t: sweep(chain_of(), "0.5, nan"),
        "PoEReliabilitySweep: input 'values'"),
    "sweep unknown field": (
        lambda t: sweep(chain_of(), "1", field="expert"),
        "PoEReliabilitySweep: input 'field'"),
}


@pytest.mark.parametrize("case", [*HANDLED, *GAPS])
def test_bad_input_is_refused_naming_node_input_and_fix(tiny, case):
    """HANDLED pins each whole message; GAPS, what ComfyUI's own validation lets through, its start."""
    call, expected = HANDLED[case] if case in HANDLED else GAPS[case]
    with pytest.raises(ValueError) as err:
        call(tiny)
    message = str(err.value)
    if case in GAPS:
        assert message.startswith(expected)
    elif isinstance(expected, re.Pattern):
        assert expected.fullmatch(message), message
    else:
        assert message == expected
