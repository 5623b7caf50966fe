"""API-prompt pieces shared by the server and scale-out tiers (plain dicts: nothing imported)."""
from __future__ import annotations


def two_unet_product(unets: tuple[str, str], weights: tuple[float, float] = (1.5, 1.0),
                     reliability: float = 0.5) -> dict:
    """Nodes "1" to "6" of a prompt: two UNETLoaders, each bound by PoEBindModel with the stock Lotus
    prompt and its zeroed null as the negative; the chain is output 0 of node "6"."""
    bind = {"positive": ["3", 0], "negative": ["4", 0], "reliability": reliability}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unets[0], "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": unets[1], "weight_dtype": "default"}},
        "3": {"class_type": "LotusConditioning", "inputs": {}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "PoEBindModel", "inputs": {"model": ["1", 0], "weight": weights[0], **bind}},
        "6": {"class_type": "PoEBindModel", "inputs": {"model": ["2", 0], "weight": weights[1], **bind,
                                                       "experts": ["5", 0]}},
    }
