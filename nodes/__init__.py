"""The pack's nodes, grouped by what they do: loaders, bindings, sampling."""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .bands import PoEBandWeights
from .composition import PoEAndGroup, PoEOrGroup, PoEParticles, PoEParticleSampler, PoESDESampler
from .bindings import (PoEBindClass, PoEBindImage, PoEBindInpaint, PoEBindingSchedule, PoEBindPrior,
                       PoEBindSegmentation, PoEBindSketch, PoEBindText, PoEReliabilityFromVariance)
from .known_regions import PoEImageToLatent, PoEResample
from .model_bindings import PoEBindModel, PoEEncodeCondition
from .loaders import PoEExpertLoader, PoETextEncoderLoader
from .sampling import PoECorrectedSampler, PoECorrector, PoEGuider, PoEKSampler, PoEScheduler
from .utilities import PoEImageGrid, PoEReliabilitySweep

NODES: list[type[io.ComfyNode]] = [
    PoEExpertLoader, PoETextEncoderLoader,
    PoEBindClass, PoEBindText, PoEBindSegmentation, PoEBindSketch, PoEBindImage, PoEBindInpaint, PoEBindPrior,
    PoEBindModel, PoEEncodeCondition, PoEBindingSchedule, PoEReliabilityFromVariance, PoEBandWeights,
    PoEKSampler, PoEGuider, PoEScheduler, PoECorrector, PoECorrectedSampler,
    PoEParticles, PoEParticleSampler, PoESDESampler, PoEOrGroup, PoEAndGroup,
    PoEReliabilitySweep, PoEImageGrid, PoEResample, PoEImageToLatent,
]


class UniteAndConquerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
