"""CPU benchmark of the README's main job: a fresh headless ComfyUI with the pack running the
tiny-expert demo. Reports wall time (start-up included), the demo's own time, and the server's
peak resident memory; writes the "CPU: tiny-expert demo" section of BENCHMARKS.md with --write.

    .venv/bin/python benchmarks/bench_demo_cpu.py --write
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from comfy_client import ComfyServer, load_api_workflow  # noqa: E402
from report import write_section  # noqa: E402

SECTION = "## CPU: tiny-expert demo"


def peak_rss(pid: int, stop: threading.Event, out: dict) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            out["peak"] = max(out.get("peak", 0), proc.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.05)


def run(workflow: Path, repeats: int) -> dict:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work, ComfyServer(Path(work)) as server:
        ready = time.time() - t0
        stop, mem = threading.Event(), {}
        watcher = threading.Thread(target=peak_rss, args=(server.proc.pid, stop, mem), daemon=True)
        watcher.start()
        times = []
        for i in range(repeats):
            wf = load_api_workflow(workflow)
            for node in wf.values():      # a new seed each time, so ComfyUI's cache cannot answer
                if "seed" in node["inputs"]:
                    node["inputs"]["seed"] += i
            t1 = time.time()
            entry = server.run(wf)
            assert server.images(entry)
            times.append(time.time() - t1)
        first_total = ready + times[0]
        stop.set()
        watcher.join()
    return {"startup": ready, "first_total": first_total, "demo": times, "peak_rss_mb": mem.get("peak", 0) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default=str(REPO / "example_workflows" / "api" / "tiny_demo.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    r = run(Path(args.workflow), args.repeats)
    demo = ", ".join(f"{t:.1f}" for t in r["demo"])
    text = (f"Machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPU threads, "
            f"torch {torch.__version__} (CPU). Date: {datetime.date.today()}.\n"
            f"Command: `.venv/bin/python benchmarks/bench_demo_cpu.py --write`\n\n"
            "The README's main job after set-up: a fresh `main.py --cpu` with the pack, then "
            "`example_workflows/api/tiny_demo.json` (4 samplers x 4 images x 30 dpmpp_2m steps at 32 px: each expert "
            "alone, then the product of the three).\n\n"
            "| figure | value |\n|---|---:|\n"
            f"| ComfyUI start-up until /system_stats answers | {r['startup']:.1f} s |\n"
            f"| start-up + first demo run (the README's main command, set-up excluded) | {r['first_total']:.1f} s |\n"
            f"| demo runs in a warm server, each | {demo} s |\n"
            f"| peak resident memory of the server | {r['peak_rss_mb']:.0f} MB |\n")
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
