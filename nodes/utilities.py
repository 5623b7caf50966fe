"""Utility nodes: sweeps over a binding's settings, and image grids to compare results."""
from __future__ import annotations

import dataclasses
import math

import torch
from comfy_api.latest import io

from ..samplers.nulls import with_reliability_share
from .common import CATEGORY, Experts, check_choice, index_input, indexed_chain


def parse_values(node: str, name: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{node}: input '{name}' must be comma-separated numbers, like '0, 0.25, 0.5'") from None
    if not values:
        raise ValueError(f"{node}: input '{name}' is empty; give comma-separated numbers")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{node}: input '{name}' holds {bad[0]}; every value must be a finite number")
    return values


SWEEP_FIELDS = ("reliability share", "reliability", "weight")


class PoEReliabilitySweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEReliabilitySweep",
            display_name="Sweep Reliability or Weight (PoE)",
            category=f"{CATEGORY}/utilities",
            description="One product per value: sets the reliability (or weight) of one binding to each value in "
                        "turn, as a list, so one sampler node renders them all with the same seed (the paper's "
                        "reliability figure).",
            inputs=[
                Experts.Input("experts", tooltip="The chain to vary."),
                index_input(),
                io.Combo.Input("field", options=list(SWEEP_FIELDS), default="reliability share",
                               tooltip="'reliability share': this binding's normalised reliability is the value and "
                                       "the others share the rest in their current proportions (the paper's "
                                       "reliability figure); 'reliability' or 'weight': set that value alone."),
                io.String.Input("values", default="0, 0.25, 0.5, 0.75, 1",
                                tooltip="Comma-separated values, one product (one row of the grid) each."),
            ],
            outputs=[Experts.Output(display_name="experts", is_output_list=True)],
        )

    @classmethod
    def execute(cls, experts, index, field, values) -> io.NodeOutput:
        node = "PoEReliabilitySweep"
        check_choice(node, "field", field, SWEEP_FIELDS, "field")
        bindings = indexed_chain(node, experts, index)
        out = []
        for v in parse_values(node, "values", values):
            if field != "weight" and v < 0:
                raise ValueError(f"{node}: input 'values': reliabilities must be >= 0, got {v}")
            if field == "reliability share":
                if v > 1 or len(bindings) < 2:
                    raise ValueError(f"{node}: input 'values': a reliability share must lie in [0, 1] and needs at "
                                     f"least two bindings, got {v} with {len(bindings)}")
                out.append(with_reliability_share(bindings, index, v))
                continue
            variant = list(bindings)
            variant[index] = dataclasses.replace(bindings[index], **{field: v})
            out.append(variant)
        return io.NodeOutput(out)


class PoEImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEImageGrid",
            display_name="Image Grid (PoE)",
            category=f"{CATEGORY}/utilities",
            description="Tiles images (a batch, or a list from a sweep: one row per list item) into one image.",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="Images of one size; a list makes rows, a batch makes columns."),
                io.Int.Input("columns", default=0, min=0, max=64,
                             tooltip="Images per row; 0 = the batch size of each list item."),
                io.Int.Input("padding", default=2, min=0, max=64, tooltip="Pixels between tiles (white)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, images, columns, padding) -> io.NodeOutput:
        node = "PoEImageGrid"
        columns, padding = columns[0], padding[0]
        sizes = {tuple(im.shape[1:]) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"{node}: input 'images' mixes sizes {sorted(sizes)}; resize them to one size first")
        tiles = torch.cat(list(images))
        cols = columns or images[0].shape[0]
        return io.NodeOutput(tile(tiles, cols, padding))


def tile(images: torch.Tensor, columns: int, padding: int) -> torch.Tensor:
    """B x H x W x C images to one 1 x H' x W' x C grid, row-major, white padding."""
    b, h, w, c = images.shape
    rows = -(-b // columns)
    grid = torch.ones(1, rows * h + (rows - 1) * padding, columns * w + (columns - 1) * padding, c)
    for i in range(b):
        r, q = divmod(i, columns)
        y, x = r * (h + padding), q * (w + padding)
        grid[0, y:y + h, x:x + w] = images[i]
    return grid
