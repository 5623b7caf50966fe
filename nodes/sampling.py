"""Sampling nodes: a KSampler for products, a GUIDER for SamplerCustomAdvanced, and its SIGMAS."""
from __future__ import annotations

import comfy.sample
import torch
from comfy_api.v0_0_2 import io

from ..samplers import correctors, validation
from ..samplers.comfy import sampling as comfy_sampling
from ..samplers.comfy.correctors import with_corrector
from ..samplers.comfy.guider import ProductGuider, latent_facts
from ..samplers.comfy.model_experts import is_pixel_space
from ..samplers.comfy.resampling import with_resampling
from ..samplers.describe import describe_corrector, describe_rule
from . import composition
from .common import (CATEGORY, Experts, check_choice, log, node_input, pixels_to_image, product_input, sigma_window,
                     sigma_window_inputs)

Corrector = io.Custom("POE_CORRECTOR")
# ComfyUI's samplers and the pack's own SDE step (which alone runs OR / AND groups).
KSAMPLER_NAMES = comfy_sampling.SAMPLER_NAMES + [composition.comfy_sde.SAMPLER_NAME]


def _guider(node: str, experts) -> ProductGuider:
    """The product of a chain, checked as far as it can be before a latent arrives (``validation.prepare``)."""
    if not experts:
        raise ValueError(f"{node}: input 'experts' is empty: connect a PoEBind* node")
    with product_input(node):
        return ProductGuider(experts, node)


def _latent(node: str, guider: ProductGuider, width, height, batch_size, latent_image, particles=None):
    """The LATENT PoEKSampler samples, validated with the product (``validation.validate``): latent_image, or
    zeros of width x height (0: the largest expert's size) in the product's space, each image repeated for its
    particles when there are any. Returns (samples, noise mask)."""
    product = guider.product
    latent_input = "latent_image"
    if latent_image is not None:
        # As ComfyUI's own KSampler does: an empty (all-zero) latent takes the product's channels.
        samples = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_image["samples"]).float()
    else:
        if product.size is None and (width == 0 or height == 0):
            raise ValueError(f"{node}: inputs 'width' and 'height' must be set (a product of MODELs has no native "
                             "size), or connect a latent_image")
        # ComfyUI's image latents are 1/8 of the image; pixel latents are the image.
        down = 1 if product.space == validation.PIXELS else 8
        h, w = (height or product.size * down) // down, (width or product.size * down) // down
        samples = torch.zeros(batch_size, product.channels, h, w)
        latent_input = "height" if height and h != product.size else "width"
    noise_mask = None if latent_image is None else latent_image.get("noise_mask")
    if particles is not None:
        # Validated at the sampled batch, which the particles' repeated conditions match.
        samples = composition.particle_latent(node, samples, noise_mask, particles)
    with product_input(node, latent_input):
        guider.fit(latent_facts(samples))
    return samples, noise_mask


def _image(guider, samples):
    """The IMAGE output: the pixels, or for a latent product ComfyUI's latent-to-RGB preview."""
    fmt = guider.model_patcher.model.latent_format
    if is_pixel_space(fmt) or fmt.latent_rgb_factors is None:
        return pixels_to_image(samples[:, :3])
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->brhw", fmt.process_in(samples.float()), factors)
    return pixels_to_image(rgb)


class PoEKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEKSampler",
            display_name="KSampler (Product of Experts)",
            category=f"{CATEGORY}/sampling",
            description="Samples one image that satisfies every bound condition: at each step every distinct "
                        "expert runs once on all its conditions (and its null when needed), and the predictions "
                        "are combined with the Unite-and-Conquer rule. Works with every ComfyUI sampler and scheduler.",
            inputs=[
                Experts.Input("experts", tooltip="The chained bindings (PoEBind* nodes)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed. The same seed and graph give the same image."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Sampling steps."),
                io.Combo.Input("sampler_name", options=KSAMPLER_NAMES, default="dpmpp_2m",
                               tooltip="Any ComfyUI sampler. CFG++ variants use the pooled null as their "
                                       "unconditional prediction. 'ddim' is ComfyUI's DDIM (eta 0). "
                                       "'poe_euler_maruyama' is the pack's SDE step, which OR / AND groups need."),
                io.Combo.Input("scheduler", options=comfy_sampling.SCHEDULER_NAMES, default="karras",
                               tooltip="Any ComfyUI scheduler, over the noise range every expert can serve."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 samples from noise; below 1 refines latent_image (img2img)."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="0 = the largest expert's size. Native experts are never resized: the canvas "
                                     "is the largest one's size, and a smaller expert whose size divides it runs on "
                                     "the pooled canvas; with a ComfyUI MODEL in the product, any multiple of it."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8,
                             tooltip="0 = the largest expert's size (see width)."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Images per run."),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="Optional pixel latent (B x 3 x H x W in [-1, 1]) to start from; its noise "
                                        "mask (SetLatentNoiseMask) keeps the unmasked pixels exactly."),
                io.Float.Input("noise_temperature", default=1.0, min=0.0, max=2.0, step=0.001, optional=True,
                               tooltip="Scales the initial noise. GLIDE samples its upsampler at 0.997; 1 is "
                                       "the usual."),
                Corrector.Input("corrector", optional=True,
                                tooltip="Optional MCMC correction at every noise level (PoECorrector). Each corrector "
                                        "step costs one more product evaluation per level."),
                io.Int.Input("resample_count", default=1, min=1, max=20, optional=True,
                             tooltip="RePaint resampling (Lugmayr et al. 2022) for known-region completion: every "
                                     "block of resample_jump steps runs this many times, re-noising in between, "
                                     "so the completion harmonises with the kept pixels. 1 = off."),
                io.Int.Input("resample_jump", default=10, min=1, max=1000, optional=True,
                             tooltip="RePaint jump length: steps per resampled block."),
                composition.Particles.Input("particles", optional=True,
                                            tooltip="Optional weighted particles (PoEParticles): K particles per "
                                                    "image, batch_size x K in all; needs a stochastic sampler "
                                                    "(poe_euler_maruyama or an ancestral / SDE one). The corrector "
                                                    "input becomes their move step."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="Pixel-space latent in [-1, 1] (ComfyUI's "
                                 "pixel_space VAE convention)."),
                io.Image.Output(display_name="IMAGE"),
                io.String.Output(display_name="rule", tooltip="The combined rule that ran, as text."),
            ],
        )

    @classmethod
    def execute(cls, experts, seed, steps, sampler_name, scheduler, denoise, width, height, batch_size,
                latent_image=None, noise_temperature=1.0, corrector=None, resample_count=1,
                resample_jump=10, particles=None) -> io.NodeOutput:
        node = "PoEKSampler"
        check_choice(node, "sampler_name", sampler_name, KSAMPLER_NAMES, "sampler")
        check_choice(node, "scheduler", scheduler, comfy_sampling.SCHEDULER_NAMES, "scheduler")
        if particles is not None:
            experts = composition.particle_chain(node, experts, particles)
        guider = _guider(node, experts)
        latent, noise_mask = _latent(node, guider, width, height, batch_size, latent_image, particles)
        if latent_image is None and denoise < 1.0:
            raise ValueError(f"{node}: input 'denoise' is {denoise} but there is no latent_image to refine; "
                             "connect one or set denoise to 1")
        sigmas = comfy_sampling.compute_sigmas(guider, sampler_name, scheduler, steps, denoise)
        rule = describe_rule(guider.bindings, latent.shape) + composition.describe_chain(guider.bindings)
        sampler = composition.sampler_for(node, sampler_name, guider.bindings, corrector, particles, resample_count)
        corrected = None
        if particles is not None:
            sampler = composition.with_particles(node, sampler, particles, corrector)
            rule += f"\nparticles: {composition.describe_particles(particles)}"
        elif corrector is not None:
            with node_input(node, "sampler_name" if corrector.method != "none" else "corrector"):
                sampler = corrected = with_corrector(sampler, corrector)
            rule += f"\ncorrector: {describe_corrector(corrector)}"
        if resample_count > 1:
            with node_input(node, "resample_count"):
                sampler = with_resampling(sampler, resample_jump, resample_count)
            rule += f"\nresampling: blocks of {resample_jump} step(s), each run {resample_count} times"
        log.info("%s: %s sampler, %s scheduler, %d steps\n%s", node, sampler_name, scheduler, steps, rule)
        samples = comfy_sampling.sample(guider, latent, seed, sampler, sigmas, noise_mask=noise_mask,
                                      noise_scale=noise_temperature)
        report = getattr(corrected, "last_report", None)
        if report is not None:
            rule += f"\ncorrector did: {report.summary()}"
            log.info("%s: corrector did: %s", node, report.summary())
        rule += composition.report_lines(sampler)
        out = {"samples": samples}
        if noise_mask is not None:
            out["noise_mask"] = noise_mask
        return io.NodeOutput(out, _image(guider, samples), rule, ui={"text": (rule,)})


class PoEGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEGuider",
            display_name="Product-of-Experts Guider",
            category=f"{CATEGORY}/sampling",
            description="The product as a GUIDER for SamplerCustomAdvanced. Use PoEScheduler for SIGMAS inside "
                        "the experts' common noise range (other schedules are clamped to it). The product is checked "
                        "when the sampler hands it its latent, exactly as PoEKSampler checks it: the canvas against "
                        "every expert's size, the channels, the batch, and the nulls the rule needs there.",
            inputs=[Experts.Input("experts", tooltip="The chained bindings (PoEBind* nodes).")],
            outputs=[io.Guider.Output(display_name="GUIDER")],
        )

    @classmethod
    def execute(cls, experts) -> io.NodeOutput:
        guider = _guider("PoEGuider", experts)
        size = guider.product.size
        rule = describe_rule(guider.bindings, (size, size) if size else None) + composition.describe_chain(guider.bindings)
        return io.NodeOutput(guider, ui={"text": (rule,)})


class PoEScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEScheduler",
            display_name="Product-of-Experts Scheduler",
            category=f"{CATEGORY}/sampling",
            description="SIGMAS from a ComfyUI scheduler over the noise range that every expert of the product can "
                        "serve (the intersection of their training schedules), on the canvas of the largest expert. A "
                        "smaller expert serves sigma where sigma/k is in its range, so with a ComfyUI MODEL and a "
                        "larger latent the range moves; the guider then clamps the sigmas to it.",
            inputs=[
                Experts.Input("experts", tooltip="The chained bindings whose common noise range is used."),
                io.Combo.Input("scheduler", options=comfy_sampling.SCHEDULER_NAMES, default="karras",
                               tooltip="Any ComfyUI scheduler."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1, only the last part of the schedule (img2img)."),
            ],
            outputs=[io.Sigmas.Output(display_name="SIGMAS")],
        )

    @classmethod
    def execute(cls, experts, scheduler, steps, denoise) -> io.NodeOutput:
        check_choice("PoEScheduler", "scheduler", scheduler, comfy_sampling.SCHEDULER_NAMES, "scheduler")
        guider = _guider("PoEScheduler", experts)
        return io.NodeOutput(comfy_sampling.compute_sigmas(guider, "euler", scheduler, steps, denoise))


class PoECorrector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = correctors.CorrectorConfig()  # the node's defaults are the library's: one default
        return io.Schema(
            node_id="PoECorrector",
            display_name="MCMC Corrector (PoE)",
            category=f"{CATEGORY}/sampling",
            description="MCMC correction of the product at each noise level of its window (Du et al. 2023, "
                        "'Reduce, Reuse, Recycle'; Sjöberg et al. 2023). Summing scores is exact only at sigma = 0; "
                        "the corrector pulls each level towards the product of the diffused experts. Each corrector "
                        "step costs one product evaluation per level (U-HMC: one per leapfrog step). By default "
                        "each step is sized from the product's own score (a target signal-to-noise ratio), so one "
                        "setting adapts to sharp and broad products; PoEKSampler's rule output reports the steps "
                        "taken. See BENCHMARKS.md for how the defaults were chosen.",
            inputs=[
                io.Combo.Input("method", options=list(correctors.METHODS), default=d.method,
                               tooltip="uhmc: underdamped Langevin / HMC without accept (exact on Gaussians); ula: "
                                       "unadjusted Langevin; mala: Langevin with a Metropolis-Hastings accept using "
                                       "the score line-integral energy; none: off."),
                io.Int.Input("steps", default=d.steps, min=0, max=100,
                             tooltip="Corrector steps per noise level; each costs one product evaluation."),
                io.Float.Input("step_scale", default=d.step_scale, min=0.001, max=10.0, step=0.005,
                               tooltip="With step_rule sigma2: the Langevin step as a multiple of sigma^2, one "
                                       "constant for every product. Unused with step_rule snr."),
                *sigma_window_inputs(d.sigma_window[0], "Correction runs for sigma_min <= sigma <= sigma_max (images "
                                                        "in [-1, 1]); never at sigma = 0. Sharp products need it "
                                                        "down to about 0.06 (BENCHMARKS.md, 'Corrector windows'); "
                                                        "image experts lose less there with reliabilities "
                                                        "equal to the weights (README, 'Choosing reliabilities').",
                                     "the correction window"),
                io.Int.Input("leapfrog_steps", default=d.leapfrog_steps, min=1, max=100,
                             tooltip="U-HMC leapfrog steps per step."),
                io.Float.Input("momentum_refresh", default=d.refresh, min=0.01, max=1.0, step=0.01,
                               tooltip="U-HMC partial momentum refresh per step; 1 = full refresh."),
                io.Combo.Input("step_rule", options=list(correctors.STEP_RULES), default=d.step_rule, optional=True,
                               tooltip="snr: each step sized per image from the product's score for a target "
                                       "signal-to-noise ratio (Song et al. 2021), so it follows the product's own "
                                       "spread; sigma2: step_scale x sigma^2 at every level."),
                io.Float.Input("snr", default=d.snr, min=0.001, max=2.0, step=0.005, optional=True,
                               tooltip="The target signal-to-noise ratio of step_rule snr: larger moves further per "
                                       "step, smaller is more accurate per step."),
            ],
            outputs=[Corrector.Output(display_name="corrector")],
        )

    @classmethod
    def execute(cls, method, steps, step_scale, sigma_min, sigma_max, leapfrog_steps, momentum_refresh,
                step_rule=None, snr=None) -> io.NodeOutput:
        node = "PoECorrector"
        d = correctors.CorrectorConfig()
        step_rule = d.step_rule if step_rule is None else step_rule
        snr = d.snr if snr is None else snr
        check_choice(node, "method", method, correctors.METHODS, "method")
        check_choice(node, "step_rule", step_rule, correctors.STEP_RULES, "step rule")
        if sigma_min > sigma_max:
            raise ValueError(f"{node}: input 'sigma_min' ({sigma_min}) is above sigma_max ({sigma_max})")
        with node_input(node, "snr" if not snr > 0 else "method"):
            config = correctors.CorrectorConfig(
                method=method, steps=steps, step_scale=step_scale,
                sigma_window=sigma_window(sigma_min, sigma_max),
                leapfrog_steps=leapfrog_steps, refresh=momentum_refresh, step_rule=step_rule, snr=snr)
        return io.NodeOutput(config, ui={"text": (describe_corrector(config),)})


class PoECorrectedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoECorrectedSampler",
            display_name="Corrected Sampler (PoE)",
            category=f"{CATEGORY}/sampling",
            description="Wraps a SAMPLER (from KSamplerSelect) so that it runs the MCMC corrector at every noise "
                        "level, for SamplerCustomAdvanced with PoEGuider. Multistep samplers restart their history "
                        "at each level when correction is on.",
            inputs=[io.Sampler.Input("sampler", tooltip="A sampler from KSamplerSelect (not dpm_fast/dpm_adaptive)."),
                    Corrector.Input("corrector", tooltip="The corrector settings (PoECorrector).")],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls, sampler, corrector) -> io.NodeOutput:
        with node_input("PoECorrectedSampler", "sampler"):
            return io.NodeOutput(with_corrector(sampler, corrector))
