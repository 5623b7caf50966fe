"""Small networks with random weights, for parity tests against reference implementations in fp32."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: one thread is faster than several that spin on a shared 2-core machine.

    Import it into a test module to use it there (autouse, once per module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise(module: torch.nn.Module, seed: int, unit_fan_in: Callable[[str], bool]) -> None:
    """Random non-zero weights everywhere, the zero-initialised output layers included, scaled by
    1/sqrt(fan-in) so that activations stay O(1). ``unit_fan_in(name)`` names the matrices scaled as if
    their fan-in were 1: at least the embedding tables, since a lookup reads one row and sums nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = 1 if unit_fan_in(name) else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm gains
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
