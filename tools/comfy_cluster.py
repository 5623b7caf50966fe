"""A ComfyUI-Distributed cluster on this machine: a master and remote workers, each an ordinary ComfyUI.

ComfyUI-Distributed (Apache-2.0) adds ``DistributedSeed`` and ``DistributedCollector`` to a workflow and
queues it on the master and on every worker; the workers send their images back to the master's
collector. Its ``docs/worker-setup-guides.md`` sets up a remote worker as a ComfyUI started on its own
port, added on the master's panel as "Remote" with a host and a port. This module does the same
without a browser:

- each server gets a folder of its own, used as ComfyUI's ``--base-directory`` (as ComfyUI Desktop
  does): ``custom_nodes/`` holds this pack and a copy of ComfyUI-Distributed (whose ``gpu_config.json``
  lives in its own folder, so each server has its own), ``models/`` the checkpoints;
- every server listens on 127.0.0.1 only;
- the master learns its workers through Distributed's own configuration routes, the ones its panel's
  "Add Worker" and "Save" call, and prompts go through ``/distributed/queue``, the route its "Queue"
  button and its documented API use.

Used by the scale-out tier (``tests/scaleout``) and ``benchmarks/bench_scaleout.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from comfy_client import PACK_NAME, ROOT, ComfyServer

VERSION = "1.4.4"
TARBALL = ROOT.parent / "shared" / "distributed" / f"ComfyUI-Distributed-{VERSION}.tar.gz"
# tools/setup_env.sh unpacks the tarball here.
DISTRIBUTED = Path(os.environ.get("UAC_DISTRIBUTED", ROOT / ".cache" / f"ComfyUI-Distributed-{VERSION}"))
FOLDER = "ComfyUI-Distributed"
# Three servers share this machine's cores: one torch thread each keeps them from fighting over them.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
# How long the master's collector waits for a silent worker before it probes it and, if the worker is
# gone, goes on without it (Distributed's "worker timeout" setting; its default is 60 s). A live worker
# that answers the probe (within 2 s) as busy is waited for again, so this bounds how long a dead one
# holds up the prompt; 20 s keeps live workers on a loaded machine from being probed often.
WORKER_TIMEOUT_S = 20


def unavailable() -> str | None:
    """Why no cluster can be built here, or None."""
    if (DISTRIBUTED / "pyproject.toml").is_file():
        return None
    if not TARBALL.is_file():
        return (f"ComfyUI-Distributed {VERSION} is not available: {TARBALL} is absent (../shared/distributed), "
                f"so tools/setup_env.sh could not unpack it into {DISTRIBUTED}")
    return f"ComfyUI-Distributed {VERSION} is not unpacked at {DISTRIBUTED}: run tools/setup_env.sh"


def install_server(folder: Path, models: dict[str, Iterable[Path]] | None = None, distributed: bool = True) -> Path:
    """A user's ComfyUI folder: the pack (linked, as tools/setup_env.sh places it) and, with
    ``distributed``, a fresh copy of ComfyUI-Distributed in ``custom_nodes/``; each checkpoint of
    ``models`` (``{"diffusion_models": [path, ...]}``) in ``models/<kind>/``."""
    folder = Path(folder)
    nodes = folder / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    (nodes / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    if distributed:
        # A fresh install has no gpu_config.json: Distributed writes its defaults on first start.
        shutil.copytree(DISTRIBUTED, nodes / FOLDER, ignore=shutil.ignore_patterns("gpu_config.json", "__pycache__"))
    for kind, files in (models or {}).items():
        (folder / "models" / kind).mkdir(parents=True, exist_ok=True)
        for f in files:
            (folder / "models" / kind / Path(f).name).symlink_to(Path(f).resolve())
    for sub in ("input", "user"):     # ComfyUI keeps its database in user/
        (folder / sub).mkdir(exist_ok=True)
    return folder


def server(folder: Path, env: dict[str, str] | None = None) -> ComfyServer:
    """A ComfyUI on ``folder`` (``--base-directory``), CPU, 127.0.0.1, a free port. The worker guide's
    ``--enable-cors-header`` lets the master's panel in a browser reach it."""
    return ComfyServer(folder, python=sys.executable, env=SERVER_ENV if env is None else env,
                       extra_args=("--base-directory", str(folder), "--enable-cors-header"))


def start_servers(servers: Iterable[ComfyServer], timeout: float = 300) -> None:
    """Start the servers side by side; if one fails, stop them all and raise its error."""
    servers = list(servers)
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(s.start, timeout) for s in servers]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        stop_servers(servers)
        raise failed[0]


def stop_servers(servers: Iterable[ComfyServer]) -> None:
    """Stop the servers side by side (each may take a few seconds to shut down)."""
    servers = list(servers)
    with ThreadPoolExecutor(max(1, len(servers))) as pool:
        list(pool.map(lambda s: s.stop(), servers))


def participant_seeds(seed: int, workers_online: int) -> list[int]:
    """The seed ``DistributedSeed`` gives each participant, master first, as ComfyUI-Distributed 1.4.4
    does it (``nodes/utilities.py`` ``DistributedSeed.distribute``, ``api/orchestration/prompt_transform.py``
    ``_override_seed_nodes``): the master keeps ``seed``; the worker at 0-based position i among the
    workers that answered the master's probe when the prompt was queued, in the master's configuration
    order, gets ``seed + i + 1``. A worker that is offline at dispatch moves the ones after it down.
    ``DistributedCollector`` returns the images in the same order: the master's, then each worker's."""
    return [seed] + [seed + i + 1 for i in range(workers_online)]


def distribute(prompt: dict, sampler_id: str, save_id: str, image_output: int = 1) -> dict:
    """A copy of ``prompt`` with the two nodes a user adds: ``DistributedSeed`` feeding the sampler's
    seed (its widget value becomes the master's seed), and ``DistributedCollector`` between the
    sampler's IMAGE output and the ``SaveImage`` node ``save_id``."""
    prompt = json.loads(json.dumps(prompt))
    seed_id, collector_id = (str(max(int(k) for k in prompt) + i) for i in (1, 2))
    sampler = prompt[sampler_id]["inputs"]
    prompt[seed_id] = {"class_type": "DistributedSeed", "inputs": {"seed": sampler["seed"]}}
    sampler["seed"] = [seed_id, 0]
    prompt[collector_id] = {"class_type": "DistributedCollector",
                            "inputs": {"images": [sampler_id, image_output], "load_balance": False}}
    prompt[save_id]["inputs"]["images"] = [collector_id, 0]
    return prompt


class Cluster:
    """A master and ``workers`` remote workers in folders under ``workdir``, each with the pack,
    ComfyUI-Distributed and ``models``."""

    def __init__(self, workdir: Path, workers: int = 2, models: dict[str, Iterable[Path]] | None = None,
                 env: dict[str, str] | None = None):
        models = {kind: list(files) for kind, files in (models or {}).items()}
        self.master = server(install_server(Path(workdir) / "master", models), env)
        self.workers = {str(i): server(install_server(Path(workdir) / f"worker{i}", models), env)
                        for i in range(1, workers + 1)}

    @property
    def servers(self) -> list[ComfyServer]:
        return [self.master, *self.workers.values()]

    def start(self, timeout: float = 300) -> "Cluster":
        start_servers(self.servers, timeout)
        self.configure()
        return self

    def configure(self, worker_timeout_s: int = WORKER_TIMEOUT_S) -> None:
        """Add each worker on the master as a remote worker at 127.0.0.1:port (the panel's "Add
        Worker", "Remote", "Save"), and set the worker timeout."""
        for worker_id, w in self.workers.items():
            self._post("/distributed/config/update_worker", {
                "worker_id": worker_id, "name": f"Worker {worker_id}", "type": "remote", "host": "127.0.0.1",
                "port": w.port, "cuda_device": None, "extra_args": None, "enabled": True})
        self._post("/distributed/config", {"worker_timeout_seconds": worker_timeout_s})

    def config(self) -> dict:
        return self.master.get_json("/distributed/config")

    def _post(self, path: str, data: dict) -> dict:
        status, body = self.master.request(path, data)
        if status != 200:
            raise RuntimeError(f"POST {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def queue(self, prompt: dict) -> dict:
        """``POST /distributed/queue`` with every enabled worker; returns ``prompt_id`` (the master's)
        and ``worker_count`` (the workers that answered the probe and got the prompt)."""
        enabled = [w["id"] for w in self.config()["workers"] if w.get("enabled")]
        return self._post("/distributed/queue", {"prompt": prompt, "client_id": self.master.client_id,
                                                 "enabled_worker_ids": enabled})

    def run(self, prompt: dict, timeout: float = 600) -> tuple[dict, int]:
        """Queue ``prompt`` and wait for the master's result: (its history entry, workers dispatched)."""
        answer = self.queue(prompt)
        return self.master.wait(answer["prompt_id"], timeout), answer["worker_count"]

    def master_log(self, lines: int = 3000) -> str:
        """The master's log as Distributed's panel shows it (``/distributed/local_log``)."""
        return self.master.get_json(f"/distributed/local_log?lines={lines}")["content"]

    def stop(self) -> None:
        stop_servers(self.servers)
