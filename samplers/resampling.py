"""RePaint resampling: jump back and redo, so a completed region harmonises with the known one
(Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", Alg. 1
and sec. 4.2 "Resampling").

Known-region completion replaces the known pixels at every step with a noised copy of the known
image. The unknown pixels then follow the model's score given a known half that was noised
*independently* of them, so the two halves only agree to the extent that one step lets the model
react: the seam shows. RePaint's fix is to go back up the noise schedule by re-noising the
current sample and to run the same steps again, several times, so the generated region is
denoised repeatedly against the known one.

Everything is in k-diffusion's variance-exploding space, ``x = x0 + sigma * eps``, where one
forward-diffusion move from level sigma to a higher level sigma_back is (RePaint eq. 1 and Alg. 1
line 9, written for VE levels)

    x <- x + sqrt(sigma_back^2 - sigma^2) * z,          z ~ N(0, I).

The schedule of moves over the sampler's levels ``sigmas[0] > ... > sigmas[N]`` (indices 0..N):
intervals ``(i, i + 1)`` run the sampler; after the interval that reaches a level whose index k is
a multiple of the jump length J, the walk jumps back ``(k, k - J)`` and redoes those J intervals,
``count - 1`` extra times in all (RePaint's ``jump_length`` and ``jump_n_sample``, sec. 4.2 and
their ``get_schedule_jump``). With J dividing N every interval runs exactly ``count`` times, so the
cost is ``count`` times the plain sampler's.
"""
from __future__ import annotations

import torch

Move = tuple[int, int]


def renoise(x: torch.Tensor, sigma: float, sigma_back: float, noise: torch.Tensor) -> torch.Tensor:
    """Diffuse a VE point at level ``sigma`` forward to the higher level ``sigma_back``."""
    if sigma_back < sigma:
        raise ValueError(f"re-noising goes up the schedule: sigma_back ({sigma_back:.4g}) is below sigma ({sigma:.4g})")
    return x + (sigma_back**2 - sigma**2) ** 0.5 * noise


def jump_schedule(steps: int, jump_length: int, count: int) -> list[Move]:
    """The moves of a RePaint walk over ``steps`` intervals, as (from, to) sigma indices.

    A move with ``to == from + 1`` is one sampler interval; ``to < from`` is a jump back by
    re-noising. ``count = 1`` (or a jump length above ``steps``) is the plain walk.

    Args:
        steps (`int`): N, the number of sampler intervals (``len(sigmas) - 1``).
        jump_length (`int`): J >= 1, how many levels one jump goes back.
        count (`int`): R >= 1, how many times each block of J intervals runs in all.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if jump_length < 1:
        raise ValueError(f"jump_length must be >= 1, got {jump_length}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    jumps_left = {k: count - 1 for k in range(jump_length, steps + 1, jump_length)}
    moves: list[Move] = []
    i = 0
    while i < steps:
        moves.append((i, i + 1))
        i += 1
        if jumps_left.get(i, 0) > 0:
            jumps_left[i] -= 1
            moves.append((i, i - jump_length))
            i -= jump_length
    return moves


def segments(moves: list[Move], jump_length: int, single: bool = False) -> list[Move]:
    """Merge a walk's consecutive intervals into runs ``(a, b)`` with ``b > a`` that one sampler call
    can do, keeping jumps as they are. A run never crosses a multiple of J (a block boundary), so
    every interval of a run is on the same pass of its block; ``single`` keeps one interval per run.
    """
    out: list[Move] = []
    for a, b in moves:
        if out and b == a + 1 and not single:
            pa, pb = out[-1]
            if pb == a and pb > pa and a % jump_length != 0:
                out[-1] = (pa, b)
                continue
        out.append((a, b))
    return out


def intervals(moves: list[Move]) -> int:
    """How many sampler intervals a walk runs (its progress-bar length)."""
    return sum(1 for a, b in moves if b == a + 1)
