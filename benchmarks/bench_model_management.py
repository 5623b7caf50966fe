"""ComfyUI's model management under the pack: two MODEL experts and the native experts in one product, through
20 prompts on one server.

    .venv/bin/python benchmarks/bench_model_management.py                 # both ComfyUIs, into BENCHMARKS.md
    .venv/bin/python benchmarks/bench_model_management.py --no-write --comfyui 0.33.0 --prompts 8

Each prompt samples two products from one seed. The first, the headline, holds two MODEL experts and
the three native tiny experts in ONE product: two Chroma Radiance models (pixel-space flow MODELs, two
seeds of random weights, read from files by the stock UNETLoader), bound by PoEBindModel with a stock
CLIPTextEncode conditioning (a random-weight CLIP-L read by the stock CLIPLoader) and its
ConditioningZeroOut as one binding's negative, then the class, colour and layout experts
(PoEExpertLoader) chained after them; it samples on the natives' 32 px canvas (2 x 2 of Chroma
Radiance's 16 px patches). The second is a latent product: two tiny SD2-architecture UNets with the stock
LotusConditioning (a latent MODEL cannot share a product with a pixel expert; the pack refuses it). So
ComfyUI's model management holds ten models at once: two Chroma Radiance, the CLIP-L and two SD2 UNets as
ComfyUI builds them, the three native experts and the two products' weightless models as the pack builds
them.

Why Chroma Radiance is big and why CLIP-L: ComfyUI's model detection fixes every width of a Chroma
Radiance file but the block counts and the context width (tests/support/tiny_comfy_models.py,
CHROMA_RADIANCE_FILE_CONFIG), so the smallest it reads is 1.1e9 parameters, 4.2 GB each in fp32 on a
CPU. And on ComfyUI 0.3.75, Flux-family models read ``pooled_output`` from the CONDITIONING
unconditionally (``model_base.Flux.encode_adm``), which LotusConditioning lacks (KeyError); CLIPTextEncode
sets it (0.33.0 reads it with ``.get``).

The seeds repeat (``SEEDS``). Before a prompt whose seed was seen, ``POST /free`` with ``unload_models``
and ``free_memory`` makes ComfyUI unload every model and drop its caches (0.33.0's RAM-pressure cache
would otherwise answer a repeated graph), so that prompt loads every model again and must sample the
same latents and the same image as the first time. Per prompt: its wall time, whether both samplers ran,
how many models ComfyUI logged as loaded, and the server's resident memory afterwards. A new seed
without /free reuses the loaded models.

The server runs on each ComfyUI with that ComfyUI's own venv (``.venv`` for 0.3.75, ``.cache/venv-0.33.0``
for 0.33.0, both made by tools/setup_env.sh); this script's own Python writes the model files once.
tests/server/test_model_management.py runs the same series, shorter, as a correctness test.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import runpy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: ComfyUI 0.3.75 writes the model files; register the pack's package
    sys.path.insert(0, str(REPO / ".cache" / "ComfyUI"))
    from comfy.cli_args import args as comfy_args  # its device is chosen at the first import of model_management

    comfy_args.cpu = True
    runpy.run_path(str(REPO / "__init__.py"))
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))

from comfy_client import ComfyServer  # noqa: E402

SECTION = "## ComfyUI 0.3.75 and 0.33.0: model management over 20 prompts"
# 20 prompts, 12 seeds; 8 prompts repeat a seed, none right after itself.
SEEDS = (1, 2, 3, 1, 4, 2, 5, 6, 1, 7, 3, 8, 2, 9, 10, 4, 1, 11, 5, 12)
RADIANCE = ("uac_mm_radiance_a.safetensors", "uac_mm_radiance_b.safetensors")
CLIP = "uac_mm_clip_l.safetensors"
UNETS = ("uac_mm_sd2_a.safetensors", "uac_mm_sd2_b.safetensors")
NATIVE = {"class": "uac_mm_class.safetensors", "colour": "uac_mm_colour.safetensors",
          "layout": "uac_mm_layout.safetensors"}
# The two samplers and the SaveLatent of each: the mixed product (two Chroma Radiance MODELs and the three
# native experts, the headline) and the latent product (two SD2 UNets).
MIXED_SAMPLER, MIXED_LATENT, LATENT_SAMPLER, LATENT_LATENT = "17", "19", "27", "28"
COMFYUIS = {"0.3.75": (REPO / ".cache" / "ComfyUI", REPO / ".venv" / "bin" / "python"),
            "0.33.0": (REPO / ".cache" / "ComfyUI-0.33.0", REPO / ".cache" / "venv-0.33.0" / "bin" / "python")}
# ComfyUI's log lines (0.33 prefixes them with a coloured level): one "got prompt" as a prompt is queued,
# "Requested to load <model class>" per model it loads, "Prompt executed in" when the prompt ends.
LOAD_LINE = re.compile(r"Requested to load (\w+)")


def write_models(folder: Path) -> Path:
    """The two Chroma Radiance models, the CLIP-L, the two SD2 UNets and the three native experts (fixed
    random weights), and an extra_model_paths file that lists them; returns that file."""
    import torch
    from safetensors.torch import save_file

    from unite_and_conquer.model_loaders import tiny
    from unite_and_conquer.tests.support.tiny_comfy_models import (write_chroma_radiance_file, write_clip_l,
                                                                   write_tiny_sd2_unet)

    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(RADIANCE):
        write_chroma_radiance_file(folder / name, seed)
    write_clip_l(folder / CLIP, 0)
    for seed, name in enumerate(UNETS):
        write_tiny_sd2_unet(folder / name, seed)
    for seed, (modality, name) in enumerate(NATIVE.items()):
        config = dict(tiny.default_config(modality), widths=[8, 16, 16])
        torch.manual_seed(seed)
        net = tiny.network_from_config(config)
        save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(folder / name),
                  metadata=tiny.metadata_for(config))
    paths = folder / "extra_model_paths.yaml"
    paths.write_text(f"uac_model_management:\n  diffusion_models: {folder}\n  text_encoders: {folder}\n"
                     f"  experts: {folder}\n")
    return paths


def prompt(seed: int, steps: int = 2, prefix: str = "uac_mm") -> dict:
    """Both products from one seed. The mixed product: Chroma Radiance A (UNETLoader) with a CLIPTextEncode
    positive and its ConditioningZeroOut as negative, Chroma Radiance B with the positive alone (reliability
    0), then the class, colour and layout experts, on the natives' 32 px canvas; it saves its latent and
    image. The latent product: the two SD2 UNets with LotusConditioning; it saves its latent."""
    def loader(name):
        return {"class_type": "PoEExpertLoader",
                "inputs": {"expert_name": name, "family": "auto", "dtype": "fp32", "schedule": "published"}}

    def sampler(experts, scheduler, size):
        return {"class_type": "PoEKSampler", "inputs": {
            "experts": [experts, 0], "seed": seed, "steps": steps, "sampler_name": "euler", "scheduler": scheduler,
            "denoise": 1.0, "width": size, "height": size, "batch_size": 1}}

    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": RADIANCE[0], "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": RADIANCE[1], "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "stable_diffusion"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a red square on grey"}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "PoEBindModel", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                       "weight": 1.0, "reliability": 0.5}},
        "7": {"class_type": "PoEBindModel", "inputs": {"model": ["2", 0], "positive": ["4", 0], "weight": 0.5,
                                                       "reliability": 0.0, "experts": ["6", 0]}},
        "8": loader(NATIVE["class"]), "9": loader(NATIVE["colour"]), "10": loader(NATIVE["layout"]),
        "11": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}},
        "12": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 12, "height": 16}},
        "13": {"class_type": "MaskComposite", "inputs": {"destination": ["11", 0], "source": ["12", 0], "x": 10,
                                                         "y": 8, "operation": "add"}},
        "14": {"class_type": "PoEBindClass", "inputs": {"expert": ["8", 0], "class": "3", "class_index": -1,
                                                        "weight": 1.0, "reliability": 1.0, "null": "trained",
                                                        "null_k": 8, "experts": ["7", 0]}},
        "15": {"class_type": "PoEBindText", "inputs": {"expert": ["9", 0], "text": "red", "weight": 1.0,
                                                       "reliability": 1.0, "experts": ["14", 0]}},
        "16": {"class_type": "PoEBindSegmentation", "inputs": {"expert": ["10", 0], "source": "mask", "slot": "auto",
                                                               "weight": 1.0, "reliability": 1.0,
                                                               "map_mask": ["13", 0], "label_colour": "#ffffff",
                                                               "experts": ["15", 0]}},
        MIXED_SAMPLER: sampler("16", "karras", 0),
        "18": {"class_type": "SaveImage", "inputs": {"images": [MIXED_SAMPLER, 1], "filename_prefix": prefix}},
        MIXED_LATENT: {"class_type": "SaveLatent", "inputs": {"samples": [MIXED_SAMPLER, 0],
                                                              "filename_prefix": f"{prefix}_mixed"}},
        "21": {"class_type": "UNETLoader", "inputs": {"unet_name": UNETS[0], "weight_dtype": "default"}},
        "22": {"class_type": "UNETLoader", "inputs": {"unet_name": UNETS[1], "weight_dtype": "default"}},
        "23": {"class_type": "LotusConditioning", "inputs": {}},
        "24": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["23", 0]}},
        "25": {"class_type": "PoEBindModel", "inputs": {"model": ["21", 0], "positive": ["23", 0],
                                                        "negative": ["24", 0], "weight": 1.5, "reliability": 0.5}},
        "26": {"class_type": "PoEBindModel", "inputs": {"model": ["22", 0], "positive": ["23", 0],
                                                        "negative": ["24", 0], "weight": 1.0, "reliability": 0.5,
                                                        "experts": ["25", 0]}},
        LATENT_SAMPLER: sampler("26", "normal", 32),
        LATENT_LATENT: {"class_type": "SaveLatent", "inputs": {"samples": [LATENT_SAMPLER, 0],
                                                               "filename_prefix": f"{prefix}_latent"}},
    }


@dataclass
class PromptRecord:
    seed: int
    freed: bool                 # /free (unload every model, drop the caches) just before it
    seconds: float
    samplers_ran: bool          # neither sampler's output came from ComfyUI's cache
    loads: list[str]            # the models ComfyUI logged "Requested to load" for, in order
    rss_mb: float               # the server's resident memory after it (with its children)
    mixed_latent: str           # sha256 of the mixed product's latent (float32 bytes)
    mixed_image: str            # sha256 of the mixed product's saved pixels
    sd2_latent: str             # sha256 of the latent product's latent

    @property
    def outputs(self) -> tuple[str, str, str]:
        return self.mixed_latent, self.mixed_image, self.sd2_latent


@dataclass
class Series:
    comfyui: str
    startup_s: float
    torch: str = ""
    records: list[PromptRecord] = field(default_factory=list)

    def same_seed_same_output(self) -> bool:
        first: dict[int, tuple[str, str, str]] = {}
        return all(first.setdefault(r.seed, r.outputs) == r.outputs for r in self.records)

    def distinct_seeds_differ(self) -> bool:
        by_seed = {r.seed: r.outputs for r in self.records}
        return all(len({v[k] for v in by_seed.values()}) == len(by_seed) for k in range(3))

    def rss_growth_mb(self, settle: int = 4) -> float:
        """The last prompt's RSS over the lowest after the first ``settle`` prompts (imports, pools)."""
        rss = [r.rss_mb for r in self.records]
        return rss[-1] - min(rss[settle:])


def rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def cached_nodes(entry: dict) -> set[str]:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def prompt_log(server: ComfyServer, index: int, timeout: float = 30) -> str:
    """What the server logged for its ``index``-th prompt (0-based), once that prompt's last line is written."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log_path.read_text(errors="replace")
        if text.count("Prompt executed in") > index or time.monotonic() > deadline:
            return text.split("got prompt")[index + 1].split("Prompt executed in")[0]
        time.sleep(0.1)


def latent_hash(server: ComfyServer, entry: dict, node: str) -> str:
    from safetensors.torch import load as load_safetensors

    (item,) = entry["outputs"][node]["latents"]
    data = (server.workdir / "output" / item["subfolder"] / item["filename"]).read_bytes()
    return hashlib.sha256(load_safetensors(data)["latent_tensor"].numpy().tobytes()).hexdigest()


def run_series(server: ComfyServer, seeds=SEEDS, steps: int = 2, timeout: float = 1200) -> list[PromptRecord]:
    """``seeds`` as prompts, one after another on ``server``, with /free before each repeated seed."""
    from PIL import Image

    records, seen = [], set()
    for i, seed in enumerate(seeds):
        freed = seed in seen
        if freed:
            server.request("/free", {"unload_models": True, "free_memory": True})
            time.sleep(1.0)  # the worker thread applies the flags when it wakes, before the next prompt
        seen.add(seed)
        t0 = time.monotonic()
        entry = server.run(prompt(seed, steps, prefix=f"uac_mm_{i:02d}"), timeout=timeout)
        seconds = time.monotonic() - t0
        ((_, png),) = server.images(entry)
        pixels = Image.open(io.BytesIO(png)).convert("RGB").tobytes()
        records.append(PromptRecord(
            seed=seed, freed=freed, seconds=seconds,
            samplers_ran=not ({MIXED_SAMPLER, LATENT_SAMPLER} & cached_nodes(entry)),
            loads=LOAD_LINE.findall(prompt_log(server, i)), rss_mb=rss_mb(server.proc.pid),
            mixed_latent=latent_hash(server, entry, MIXED_LATENT), mixed_image=hashlib.sha256(pixels).hexdigest(),
            sd2_latent=latent_hash(server, entry, LATENT_LATENT)))
        print(f"  prompt {i + 1}: seed {seed}{' after /free' if freed else ''}, {seconds:.1f} s, "
              f"RSS {records[-1].rss_mb:.0f} MB, loaded {records[-1].loads}", flush=True)
    return records


def measure(version: str, models: Path, workdir: Path, seeds=SEEDS, steps: int = 2) -> Series:
    comfy_dir, python = COMFYUIS[version]
    t0 = time.monotonic()
    server = ComfyServer(workdir, python=str(python), comfy_dir=comfy_dir,
                         extra_args=("--extra-model-paths-config", str(models)))
    server.start(timeout=300)
    try:
        system = server.get_json("/system_stats")["system"]
        assert system["comfyui_version"] == version, f"{comfy_dir} runs ComfyUI {system['comfyui_version']}, not {version}"
        series = Series(version, time.monotonic() - t0, system.get("pytorch_version", "?"))
        series.records = run_series(server, seeds, steps)
        assert server.alive()
    finally:
        server.stop()
    return series


def table(series: Series) -> str:
    rows = ["| prompt | seed | /free before | s | both samplers ran | models loaded | RSS MB |",
            "|---:|---:|:---:|---:|:---:|---|---:|"]
    for i, r in enumerate(series.records, 1):
        loads = ", ".join(f"{n} x{r.loads.count(n)}" for n in dict.fromkeys(r.loads)) or "none"
        rows.append(f"| {i} | {r.seed} | {'yes' if r.freed else ''} | {r.seconds:.2f} | "
                    f"{'yes' if r.samplers_ran else 'NO'} | {loads} | {r.rss_mb:.0f} |")
    return "\n".join(rows)


def summary(series: Series) -> str:
    rec = series.records
    rss = [r.rss_mb for r in rec]
    fresh = [r.seconds for r in rec[1:] if not r.freed]
    freed = [r.seconds for r in rec if r.freed]
    return (f"| ComfyUI {series.comfyui} | {series.startup_s:.1f} | {rec[0].seconds:.2f} | "
            f"{statistics.median(fresh):.2f} | {statistics.median(freed) if freed else float('nan'):.2f} | "
            f"{'yes' if all(r.samplers_ran for r in rec) else 'NO'} | "
            f"{'yes' if series.same_seed_same_output() else 'NO'} | {'yes' if series.distinct_seeds_differ() else 'NO'} | "
            f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} | {series.rss_growth_mb():+.0f} |")


def main(argv: list[str] | None = None) -> list[Series]:
    import torch

    from report import cpu_name, publish  # noqa: E402  (benchmarks/, on sys.path when run as a script)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", action="append", choices=sorted(COMFYUIS),
                    help="which ComfyUI to run (repeatable; default: every one tools/setup_env.sh made)")
    ap.add_argument("--prompts", type=int, default=len(SEEDS), help="the first N seeds of SEEDS")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cli = argv if argv is not None else sys.argv[1:]
    started = time.time()
    versions = args.comfyui or [v for v, (c, p) in COMFYUIS.items() if (c / "comfyui_version.py").is_file()
                                and p.exists()]
    results, load = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        models = write_models(Path(tmp) / "models")
        written = time.monotonic() - t0
        for version in versions:
            results.append(measure(version, models, Path(tmp) / version, SEEDS[:args.prompts], args.steps))
            print(f"ComfyUI {version}\n{table(results[-1])}\n", flush=True)
    n = len(SEEDS[:args.prompts])
    body = [
        "Each prompt samples two products from one seed. The mixed product, the headline: two Chroma Radiance "
        "MODELs (pixel space, random weights, read by `UNETLoader` from bf16 files and run in fp32; the smallest "
        "that ComfyUI's detection reads, 1.1e9 parameters, 4.2 GB each once loaded) with a `CLIPTextEncode` "
        "conditioning (a random-weight CLIP-L read by `CLIPLoader`), bound by `PoEBindModel`, and the three native "
        "tiny experts (class, colour, layout; `PoEExpertLoader`) chained after them, on the natives' 32 px canvas. "
        "The latent product: two tiny SD2-architecture UNets with `LotusConditioning`. "
        f"{args.steps} euler steps each; {n} prompts in a row on one `main.py --cpu` server per ComfyUI, with that "
        "ComfyUI's own venv. Before each repeated seed, `POST /free` (`unload_models`, `free_memory`) unloads "
        "every model and drops the caches, so that prompt loads all ten models again. Correctness is checked by "
        "`tests/server/test_model_management.py` (three prompts, one step) on both ComfyUIs.",
        "",
        f"- command: `{' '.join(['.venv/bin/python benchmarks/bench_model_management.py', *cli])}`",
        f"- machine: {cpu_name()} (2 cores, shared with other jobs: load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end), CPU; torch "
        + ", ".join(f"{s.torch} (ComfyUI {s.comfyui})" for s in results),
        f"- date: {time.strftime('%Y-%m-%d')}, total {(time.time() - started) / 60:.1f} min "
        f"(writing the model files {written:.0f} s)",
        "",
        "| ComfyUI | start-up s | first prompt s (loads all) | new seed s (median) | after /free s (median) "
        "| every sampler ran | same seed, same latents and image | distinct seeds differ "
        "| RSS MB first / max / last | RSS last - min after prompt 4 |",
        "|---|---:|---:|---:|---:|:---:|:---:|:---:|---:|---:|",
        *[summary(s) for s in results],
    ]
    for s in results:
        body += ["", f"Per prompt, ComfyUI {s.comfyui} (models loaded: ComfyUI's \"Requested to load\" log lines):",
                 "", table(s)]
    publish(SECTION, "\n".join(body), write=not args.no_write)
    return results


if __name__ == "__main__":
    main()
