"""Throughput of a ComfyUI-Distributed cluster (a master and two remote workers on this machine)
against one server, on the same images.

    .venv/bin/python benchmarks/bench_scaleout.py                         # into BENCHMARKS.md
    .venv/bin/python benchmarks/bench_scaleout.py --no-write --repeats 1  # a quick look

The workflows are the scale-out tier's (``tests/support/scaleout.py``): the tiny digit product with
the MCMC corrector, and the product of two tiny SD2 UNets. The cluster (``tools/comfy_cluster.py``,
one torch thread per server) makes 12 images in one distributed prompt: the master's batch of 4 at
seed s, each worker's at s + 1 and s + 2. One server makes the same 12 images in three prompts at
those seeds, once with one torch thread and once with torch's default (every core). Each setup runs
one warm-up at the same seed (models loaded, nothing measured), then ``--repeats`` runs at fresh
seeds, so ComfyUI's cache cannot answer; a run's time is from queueing to the last image saved on
the master (or the single server). The setups run one after another, never side by side, and every
cluster image is checked against the single server's, pixel for pixel.
"""
from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / ".cache" / "ComfyUI"))
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

import torch  # noqa: E402
from comfy.cli_args import args as comfy_args  # noqa: E402

comfy_args.cpu = True   # the test UNets are written on the CPU
import comfy_cluster  # noqa: E402

from unite_and_conquer.benchmarks.report import publish, run_facts  # noqa: E402
from unite_and_conquer.tests.support import scaleout  # noqa: E402

HEADING = "## Scale-out: three ComfyUI-Distributed servers against one"
WORKERS = 2
WARMUP_SEED = 1000


def seeds_of(repeats: int) -> list[int]:
    return [WARMUP_SEED] + [2000 + 10 * r for r in range(repeats)]


def time_cluster(work: Path, models, repeats: int) -> tuple[dict, dict]:
    """{workflow: [seconds per run]}, {(workflow, seed): pixels of the 12 images} for the cluster."""
    cluster = comfy_cluster.Cluster(work / "cluster", workers=WORKERS, models=models)
    times, images = {}, {}
    try:
        started = time.time()
        cluster.start()
        times["start"] = [time.time() - started]
        for name in scaleout.WORKFLOWS:
            times[name] = []
            for seed in seeds_of(repeats):
                t = time.time()
                entry, dispatched = cluster.run(scaleout.distributed_prompt(name, seed))
                elapsed = time.time() - t
                assert dispatched == WORKERS
                images[name, seed] = scaleout.pixels(cluster.master, entry)
                if seed != WARMUP_SEED:
                    times[name].append(elapsed)
    finally:
        cluster.stop()
    return times, images


def time_single(work: Path, models, repeats: int, env: dict[str, str]) -> tuple[dict, dict]:
    """The same for one server making each run's 12 images in three prompts."""
    srv = comfy_cluster.server(comfy_cluster.install_server(work, models, distributed=False), env)
    times, images = {}, {}
    try:
        started = time.time()
        srv.start(300)
        times["start"] = [time.time() - started]
        for name in scaleout.WORKFLOWS:
            times[name] = []
            for seed in seeds_of(repeats):
                t = time.time()
                ids = []
                for s in comfy_cluster.participant_seeds(seed, WORKERS):
                    status, answer = srv.queue(scaleout.single_prompt(name, s))
                    assert status == 200, answer
                    ids.append(answer["prompt_id"])
                entries = [srv.wait(i) for i in ids]
                elapsed = time.time() - t
                images[name, seed] = [p for e in entries for p in scaleout.pixels(srv, e)]
                if seed != WARMUP_SEED:
                    times[name].append(elapsed)
    finally:
        srv.stop()
    return times, images


def differences(images: dict, reference: dict) -> str:
    """How many of the images differ from ``reference``'s (same workflow, seed and position), and by
    how much at most, in 8-bit levels."""
    import numpy as np

    pairs = [(a, b) for key in reference for a, b in zip(images[key], reference[key], strict=True)]
    differ = [int(np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8)).max())
              for a, b in pairs if a != b]
    if not differ:
        return f"all {len(pairs)} identical"
    return f"{len(differ)} of {len(pairs)} differ, by at most {max(differ)} level(s) of 255"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per workflow and setup")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    opts = ap.parse_args()
    reason = comfy_cluster.unavailable()
    if reason:
        sys.exit(reason)
    started = time.time()
    load = os.getloadavg()[0]
    n_images = scaleout.BATCH * (1 + WORKERS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = scaleout.write_models(work / "checkpoints")
        setups = {"3 servers (master + 2 workers), 1 thread each": time_cluster(work, models, opts.repeats),
                  "1 server, 1 thread": time_single(work / "single1", models, opts.repeats, {"OMP_NUM_THREADS": "1"}),
                  "1 server, default threads": time_single(work / "single", models, opts.repeats, {})}
    cluster_images = next(iter(setups.values()))[1]
    agreement = "; ".join(f"{setup}: {differences(images, cluster_images)}" for setup, (_, images) in setups.items()
                          if images is not cluster_images)
    base = setups["1 server, 1 thread"][0]
    rows = []
    for name in scaleout.WORKFLOWS:
        for setup, (times, _) in setups.items():
            run = statistics.median(times[name])
            rows.append(f"| {name} | {setup} | {run:.1f} ({', '.join(f'{t:.1f}' for t in times[name])}) | "
                        f"{n_images / run:.2f} | {statistics.median(base[name]) / run:.2f} |")
    starts = ", ".join(f"{setup}: {times['start'][0]:.0f} s" for setup, (times, _) in setups.items())
    body = "\n".join(run_facts("benchmarks/bench_scaleout.py", None,
                               f"{opts.repeats} measured runs of {n_images} images per workflow and setup, after "
                               "one warm-up run", started, 1, torch.__version__)) + "\n"
    body += (f"- load average when it started: {load:.1f} (other jobs share the machine)\n"
             f"- ComfyUI 0.3.75, ComfyUI-Distributed {comfy_cluster.VERSION}; start-up until every server answers: "
             f"{starts}\n"
             f"- the images against the cluster's, pixel for pixel: {agreement}\n\n"
             "| workflow | setup | seconds per run of 12 images: median (each run) | images / s | speed-up over "
             "1 server, 1 thread |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
             "A run is 12 images: on the cluster one distributed prompt (the master's 4 and each worker's 4, "
             "collected on the master), on one server three prompts of 4. The digit run is tiny_mcmc's corrected "
             "sampler at 10 steps with 2 corrector steps per level; the MODEL run is 4 steps at 64 px.\n")
    publish(HEADING, body, write=not opts.no_write)


if __name__ == "__main__":
    main()
