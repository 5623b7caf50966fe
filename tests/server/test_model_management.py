"""Tier (c): ComfyUI's model management under the pack, prompt after prompt on one real server.

benchmarks/bench_model_management.py's series, shorter: every prompt samples, from one seed, one product
that holds two MODEL experts and the three native tiny experts together (two Chroma Radiance models, the
pixel-space MODELs, read from files by the stock UNETLoader, with a CLIPTextEncode conditioning from a
CLIP-L read by the stock CLIPLoader) and a second product of two SD2 UNets (latent MODELs); before a
repeated seed, /free unloads every model and drops ComfyUI's caches. Run on each ComfyUI the tiers run
(0.3.75, and 0.33.0 with its RAM-pressure cache and its own model patchers). Timings are the benchmark's;
this checks what must hold on any machine.

Three prompts, one step each: the smallest Chroma Radiance ComfyUI detects has 1.1e9 parameters
(tests/support/tiny_comfy_models.py says why), 4.4 GB in fp32, so the server holds about 10 GB and each
prompt is one forward of each model.
"""
from __future__ import annotations

import sys

import pytest

from unite_and_conquer.benchmarks import bench_model_management as bench
from comfy_client import ComfyServer  # noqa: E402  (tools/, put on sys.path by the benchmark module)
from support.locks import exclusive

# Load everything, a new seed with everything loaded, then the first seed again after /free.
SEEDS = (1, 2, 1)
FIRST_LOADS = {"ChromaRadiance": 2, "SD1ClipModel": 1, "ExpertModel": 3, "BaseModel": 2, "ProductModel": 2}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    work = tmp_path_factory.mktemp("model_management")
    # About 10 GB: never beside the same series from the other ComfyUI's run (tools/test.sh runs both at once).
    with exclusive("model-management"):
        models = bench.write_models(work / "models")
        server = ComfyServer(work / "comfy", python=sys.executable,
                             extra_args=("--extra-model-paths-config", str(models)))
        server.start(timeout=240)
        try:
            records = bench.run_series(server, SEEDS, steps=1)
            assert server.alive()
        finally:
            server.stop()
            for f in (work / "models").glob("uac_mm_radiance_*"):
                f.unlink()   # 2.2 GB each
    return records


def test_every_prompt_runs_both_samplers(series):
    assert [r.samplers_ran for r in series] == [True] * len(SEEDS)


def test_the_same_seed_gives_the_same_latents_and_image_after_the_models_were_unloaded(series):
    first, second, again = series
    assert again.freed and not second.freed
    assert again.outputs == first.outputs
    # And another seed gives other latents and another image, in both products.
    assert all(a != b for a, b in zip(first.outputs, second.outputs))


def test_models_load_first_stay_loaded_for_a_new_seed_and_load_again_after_free(series):
    first, second, again = series
    # Both Chroma Radiance models, the CLIP-L, the three native experts, both SD2 UNets (ComfyUI's BaseModel)
    # and each product's weightless model.
    assert {n: first.loads.count(n) for n in set(first.loads)} == FIRST_LOADS, first.loads
    # Every run builds its products anew (their weightless models load again); the rest stays loaded, and
    # CLIPTextEncode's output comes from the cache.
    assert second.loads == ["ProductModel", "ProductModel"], second.loads
    assert sorted(again.loads) == sorted(first.loads), again.loads


def test_resident_memory_stays_flat(series):
    rss = [r.rss_mb for r in series]
    # The third prompt loads every model again after /free: the server must have let the first copies go.
    # The smallest model ComfyUI loads here, an SD2 UNet, is 100 MB in fp32; a Chroma Radiance is 4.2 GB.
    assert rss[2] - min(rss[:2]) < 60, f"RSS grew: {[round(x) for x in rss]} MB"
