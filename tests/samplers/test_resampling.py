"""RePaint's jump schedule and re-noising step (samplers/resampling.py)."""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.samplers import resampling


def test_plain_walk_when_count_is_one_or_the_jump_is_longer_than_the_schedule():
    assert resampling.jump_schedule(4, 2, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert resampling.jump_schedule(3, 5, 4) == [(0, 1), (1, 2), (2, 3)]
    assert resampling.jump_schedule(0, 1, 3) == []


def test_every_block_of_j_intervals_runs_count_times():
    moves = resampling.jump_schedule(4, 2, 3)
    assert moves == [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2), (2, 0), (0, 1), (1, 2),
                     (2, 3), (3, 4), (4, 2), (2, 3), (3, 4), (4, 2), (2, 3), (3, 4)]
    assert resampling.intervals(moves) == 4 * 3


def test_jump_length_one_redoes_each_interval():
    assert resampling.jump_schedule(2, 1, 2) == [(0, 1), (1, 0), (0, 1), (1, 2), (2, 1), (1, 2)]


@pytest.mark.parametrize("steps, j, r", [(10, 3, 4), (7, 7, 2), (12, 4, 5), (9, 2, 3)])
def test_schedule_is_a_connected_walk_that_ends_at_the_last_level(steps, j, r):
    moves = resampling.jump_schedule(steps, j, r)
    assert moves[0][0] == 0 and moves[-1][1] == steps
    assert all(a[1] == b[0] for a, b in zip(moves, moves[1:]))
    assert all(b == a + 1 or b == a - j for a, b in moves)
    # Intervals inside a full block run r times; a tail shorter than J (N not a multiple of J) runs once.
    runs = [sum(1 for a, b in moves if (a, b) == (i, i + 1)) for i in range(steps)]
    full = steps // j * j
    assert runs == [r] * full + [1] * (steps - full)
    assert resampling.intervals(moves) == r * full + steps - full


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"^jump_length must be >= 1, got 0$"):
        resampling.jump_schedule(10, 0, 2)
    with pytest.raises(ValueError, match=r"^count must be >= 1, got 0$"):
        resampling.jump_schedule(10, 2, 0)


def test_renoise_adds_exactly_the_missing_variance():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, generator=g) * 0.5 + 2.0
    x = x0 + 0.3 * torch.randn(200_000, generator=g)                # level 0.3
    y = resampling.renoise(x, 0.3, 1.2, torch.randn(200_000, generator=g))
    # x0 + sigma eps at sigma = 1.2: variance 0.25 + 1.44, mean unchanged.
    assert y.mean().item() == pytest.approx(2.0, abs=0.01)
    assert y.var().item() == pytest.approx(0.25 + 1.44, rel=0.01)
    z = torch.ones(3)
    torch.testing.assert_close(resampling.renoise(torch.zeros(3), 3.0, 5.0, z), torch.full((3,), 4.0))
    assert torch.equal(resampling.renoise(torch.ones(3), 0.0, 0.0, z), torch.ones(3))
    with pytest.raises(ValueError, match=r"^re-noising goes up the schedule: sigma_back \(1\) is below sigma \(2\)$"):
        resampling.renoise(x, 2.0, 1.0, z)


def test_segments_merge_intervals_within_a_block_and_keep_jumps():
    moves = resampling.jump_schedule(6, 3, 2)
    assert resampling.segments(moves, 3) == [(0, 3), (3, 0), (0, 3), (3, 6), (6, 3), (3, 6)]
    # A tail after the last full block is its own run; plain walks split at block boundaries too.
    assert resampling.segments(resampling.jump_schedule(5, 2, 2), 2) == [
        (0, 2), (2, 0), (0, 2), (2, 4), (4, 2), (2, 4), (4, 5)]
    assert resampling.segments(moves, 3, single=True) == moves
