"""Tier (c): ComfyUI's model management under the pack, prompt after prompt on one real server.

benchmarks/bench_model_management.py's series, shorter: every prompt samples a product of two MODEL
experts (tiny SD2 UNets, stock UNETLoader) and a product of the three native tiny experts from one seed;
before each repeated seed, /free unloads every model and drops ComfyUI's caches. Run on each ComfyUI the
tiers run (0.3.75, and 0.33.0 with its RAM-pressure cache and its own model patchers). Timings are
the benchmark's; this checks what must hold on any machine.
"""
from __future__ import annotations

import sys

import pytest

from unite_and_conquer.benchmarks import bench_model_management as bench
from comfy_client import ComfyServer  # noqa: E402  (tools/, put on sys.path by the benchmark module)

# 7 prompts: three seeds, four of them repeats after /free.
SEEDS = (1, 2, 1, 3, 2, 1, 3)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    work = tmp_path_factory.mktemp("model_management")
    models = bench.write_models(work / "models")
    server = ComfyServer(work / "comfy", python=sys.executable, extra_args=("--extra-model-paths-config", str(models)))
    server.start(timeout=240)
    try:
        records = bench.run_series(server, SEEDS, steps=2)
        assert server.alive()
    finally:
        server.stop()
    for r in records:
        print(r)
    return records


def test_every_prompt_runs_both_samplers(series):
    assert [r.samplers_ran for r in series] == [True] * len(SEEDS)


def test_the_same_seed_gives_the_same_latent_and_image_after_the_models_were_unloaded(series):
    first = {}
    for r in series:
        assert first.setdefault(r.seed, (r.latent, r.image)) == (r.latent, r.image), f"seed {r.seed} changed"
    assert sum(r.freed for r in series) == 4
    # And distinct seeds give distinct latents and images.
    assert len({v[0] for v in first.values()}) == len({v[1] for v in first.values()}) == len(first) == 3


def test_models_load_first_stay_loaded_for_a_new_seed_and_load_again_after_free(series):
    first = series[0].loads
    # ComfyUI loads both UNets (its BaseModel), the three native experts, and each product's weightless model.
    assert (first.count("BaseModel"), first.count("ExpertModel"), first.count("ProductModel")) == (2, 3, 2), first
    for r in series[1:]:
        if r.freed:
            assert sorted(r.loads) == sorted(first), (r.seed, r.loads)
        else:
            # Every run builds its products anew (their weightless models load again); the experts stay loaded.
            assert r.loads == ["ProductModel", "ProductModel"], (r.seed, r.loads)


def test_resident_memory_stays_flat(series):
    rss = [r.rss_mb for r in series]
    # After the first prompts (imports, allocator pools) it may wobble, but seven prompts that load and
    # unload five models must not leave them behind: each SD2 UNet alone is about 100 MB in fp32.
    growth = rss[-1] - min(rss[2:])
    assert growth < 60, f"RSS grew by {growth:.0f} MB: {[round(x) for x in rss]}"
