"""Known-region nodes: RePaint resampling for completions, and an image as a pixel latent."""
from __future__ import annotations

from comfy_api.latest import io

from ..samplers.comfy.resampling import with_resampling
from .common import CATEGORY, check_finite, image_to_pixels, node_input


class PoEResample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEResample",
            display_name="Resample Known Regions (PoE)",
            category=f"{CATEGORY}/sampling",
            description="RePaint resampling (Lugmayr et al. 2022) for SamplerCustomAdvanced: after every jump_length "
                        "steps the sample is re-noised back up jump_length levels and those steps run again, count "
                        "times in all, so a region completed under a noise mask (SetLatentNoiseMask) blends with the "
                        "known pixels. Costs count times the steps. Wrap the MCMC corrector (PoECorrectedSampler) "
                        "with it, not the other way round.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="A SAMPLER from KSamplerSelect (or PoECorrectedSampler)."),
                io.Int.Input("jump_length", default=10, min=1, max=1000,
                             tooltip="J: how many levels each jump goes back (RePaint's default is 10 of 250 steps)."),
                io.Int.Input("count", default=10, min=1, max=100,
                             tooltip="R: how many times each block of jump_length steps runs; 1 = off. "
                                     "The run costs count times the steps."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls, sampler, jump_length, count) -> io.NodeOutput:
        with node_input("PoEResample", "sampler"):
            return io.NodeOutput(with_resampling(sampler, jump_length, count))


class PoEImageToLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEImageToLatent",
            display_name="Image to Pixel Latent (PoE)",
            category=f"{CATEGORY}/sampling",
            description="An IMAGE as the pixel LATENT the experts sample (B x 3 x H x W in [-1, 1]; the same as "
                        "VAEEncode with the pixel_space VAE), with an optional MASK as its noise mask "
                        "(1 = generate, 0 = keep), for completing the unmasked part with PoEKSampler.",
            inputs=[
                io.Image.Input("image", tooltip="The image to complete or refine, at the experts' resolution."),
                io.Mask.Input("mask", optional=True, tooltip="Where to generate (1); the rest is kept exactly."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, image, mask=None) -> io.NodeOutput:
        node = "PoEImageToLatent"
        check_finite(node, "image", image)
        out = {"samples": image_to_pixels(image).float()}
        if mask is not None:
            check_finite(node, "mask", mask)
            m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
            if tuple(m.shape[-2:]) != tuple(image.shape[1:3]):
                raise ValueError(f"{node}: input 'mask' is {m.shape[-1]}x{m.shape[-2]} but the image is "
                                 f"{image.shape[2]}x{image.shape[1]}; use a mask of the image's size")
            out["noise_mask"] = m
        return io.NodeOutput(out)
