"""Run an API-format workflow on a fresh headless ComfyUI with the pack, and save its images.

    .venv/bin/python tools/run_workflow.py example_workflows/api/tiny_demo.json --out output/demo
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import ComfyServer, load_api_workflow  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", nargs="+", help="API-format workflow JSON file(s)")
    ap.add_argument("--out", default="output", help="folder for the PNGs (created)")
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use a GPU (default: --cpu)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="uac-comfy-") as work:
        with ComfyServer(Path(work), cpu=not args.gpu) as server:
            print(f"ComfyUI ready at {server.url} in {time.time() - t0:.1f}s")
            for wf_path in args.workflow:
                t1 = time.time()
                entry = server.run(load_api_workflow(wf_path), timeout=args.timeout)
                for name, data in server.images(entry):
                    target = out / name
                    target.write_bytes(data)
                    print(f"wrote {target} ({len(data)} bytes)")
                for node_out in entry.get("outputs", {}).values():
                    for text in node_out.get("text", []):
                        print(text)
                print(f"{wf_path}: {time.time() - t1:.1f}s")
    print(f"total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
