"""The band node: a binding's weight as a function of spatial frequency (samplers/bands.py)."""
from __future__ import annotations

import dataclasses

from comfy_api.v0_0_2 import io

from ..samplers import bands
from ..samplers.describe import describe
from .common import CATEGORY, Experts, check_choice, check_number, index_input, indexed_chain, node_input


class PoEBandWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEBandWeights",
            display_name="Band Weights (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Turns one binding's weight into a function of spatial frequency (2D DCT): the binding "
                        "pulls the sample only in its band, and the product rule, null term included, holds band "
                        "by band. One expert low-pass and another high-pass gives the layout of the first and the "
                        "texture of the second. With a mask on the same binding, the band picks which frequencies "
                        "of the binding's pull count and the mask then says where (w * F(eps - u)). For an expert "
                        "smaller than the canvas the band acts on its own grid. Frequencies are fractions of the "
                        "Nyquist frequency (1 = the finest detail along an axis).",
            inputs=[
                Experts.Input("experts", tooltip="The chain whose binding gets the band."),
                io.Combo.Input("mode", options=list(bands.MODES), default="low-pass",
                               tooltip="low-pass: weight below cutoff; high-pass: above it; band-pass: between cutoff "
                                       "and cutoff_high; ramp down/up: a smooth fade from cutoff to cutoff_high; "
                                       "bands: one weight per band, from band_edges and band_weights."),
                io.Float.Input("cutoff", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="The band edge, as a fraction of the Nyquist frequency. A coefficient exactly "
                                       "on a hard edge goes to the band above it: 0.25 sits on the 16th coefficient of "
                                       "a 64-px latent (on every grid whose side is a multiple of 4), which belongs to "
                                       "the high-pass, never to both bands. Complementary low- and high-pass bindings "
                                       "with one cutoff split the frequencies exactly; with weights 1 they need no "
                                       "null."),
                io.Float.Input("cutoff_high", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Upper edge for band-pass, end of the ramp for the ramps."),
                io.Float.Input("transition", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Width of a smooth (raised-cosine) step at each edge; 0 = hard edges."),
                index_input(),
                io.String.Input("band_edges", default="0.25, 0.5", optional=True,
                                tooltip="For mode 'bands': increasing edges, comma separated."),
                io.String.Input("band_weights", default="1, 0.5, 0", optional=True,
                                tooltip="For mode 'bands': one multiplier of the weight per band (one more than "
                                        "the edges)."),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, experts, mode, cutoff, cutoff_high, transition, index=-1, band_edges="0.25, 0.5",
                band_weights="1, 0.5, 0") -> io.NodeOutput:
        node = "PoEBandWeights"
        check_choice(node, "mode", mode, bands.MODES, "mode")
        for name, value in (("cutoff", cutoff), ("cutoff_high", cutoff_high), ("transition", transition)):
            check_number(node, name, value)
        bindings = indexed_chain(node, experts, index)
        what = "band_edges" if mode == "bands" else ("cutoff_high" if mode != "low-pass" else "cutoff")
        with node_input(node, what):
            band = bands.band_from_choice(mode, cutoff, cutoff_high, transition, band_edges, band_weights)
        bindings[index] = dataclasses.replace(bindings[index], band=band)
        return io.NodeOutput(bindings, ui={"text": (describe(bindings[index]),)})
