"""Scale-out tier: the pack's workflows across ComfyUI-Distributed workers.

One master and two workers, each an ordinary ComfyUI server started here (CPU, 127.0.0.1, its own
port and folder, the pack and ComfyUI-Distributed 1.4.4 in its custom_nodes), the workers added on
the master as remote workers at 127.0.0.1:PORT through Distributed's configuration routes
(``tools/comfy_cluster.py``). Two workflows get ``DistributedSeed`` and ``DistributedCollector``: the
tiny digit product with the MCMC corrector, and a product of two tiny SD2-architecture UNets. Each
participant samples a batch of four, so one prompt brings 12 images to the master.

Every image is checked, pixel for pixel, against a fourth server that has only the pack (no
Distributed) running the workflow as it was, at the seed Distributed gave that image's participant
(``comfy_cluster.participant_seeds``), and each worker's own copy of its images is checked too. Then a
worker is killed in the middle of sampling: the master reports it, keeps every image the others made,
none twice, and the next prompt runs on the master and the worker that is left.
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import comfy_cluster  # noqa: E402
from support.scaleout import BATCH, distributed_prompt, pixels, single_prompt, write_models  # noqa: E402

WORKERS = 2
DIGITS_SEED, MODEL_SEED, KILL_SEED = 100, 300, 500


# --- servers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    reason = comfy_cluster.unavailable()
    if reason:
        pytest.skip(f"scale-out tier skipped: {reason}")
    work = tmp_path_factory.mktemp("scaleout")
    models = write_models(work / "checkpoints")
    cluster = comfy_cluster.Cluster(work, workers=WORKERS, models=models)
    single = comfy_cluster.server(comfy_cluster.install_server(work / "single", models, distributed=False))
    comfy_cluster.start_servers([*cluster.servers, single])
    try:
        cluster.configure()
        yield cluster, single
    finally:
        comfy_cluster.stop_servers([*cluster.servers, single])
    for s in [*cluster.servers, single]:
        failed = [line for line in s.log_path.read_text(errors="replace").splitlines()
                  if "IMPORT FAILED" in line and (comfy_cluster.PACK_NAME in line or comfy_cluster.FOLDER in line)]
        assert not failed, "\n".join(failed)


@pytest.fixture(scope="module")
def cluster(servers):
    return servers[0]


@pytest.fixture(scope="module")
def reference(servers):
    """reference(workflow, seed): the pixels a single server (the pack, no Distributed) saves for
    that workflow and seed, computed once."""
    single = servers[1]
    done: dict = {}

    def get(name: str, seed: int) -> list[bytes]:
        if (name, seed) not in done:
            done[name, seed] = pixels(single, single.run(single_prompt(name, seed), timeout=300))
            assert len(done[name, seed]) == BATCH
        return done[name, seed]
    return get


def job_of(entry: dict) -> str:
    """The collector's job id in a prompt's history entry (the same on the master and its workers)."""
    prompt = entry["prompt"][2]
    (job,) = [n["inputs"]["multi_job_id"] for n in prompt.values() if n["class_type"] == "DistributedCollector"]
    return job


def worker_run(worker, job: str, timeout: float = 60) -> dict:
    """A worker's finished history entry for the collector job ``job``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in worker.get_json("/history").values():
            if job_of(entry) == job and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.3)
    raise TimeoutError(f"no finished prompt for {job} on the worker at port {worker.port}")


def expected(reference, name: str, seeds: list[int]) -> list[bytes]:
    return [img for seed in seeds for img in reference(name, seed)]


def assert_same_images(got: list[bytes], want: list[bytes], seeds: list[int]) -> None:
    """Equal, image by image; a failure names the image's participant seed."""
    assert len(got) == len(want), f"{len(got)} images arrived, {len(want)} expected"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"image {i} (seed {seeds[i // BATCH]}, row {i % BATCH}) differs from the single server's"


# --- the tier ------------------------------------------------------------------------------------

def test_workers_are_remote_workers_on_the_loopback(cluster):
    workers = cluster.config()["workers"]
    assert [(w["id"], w["type"], w["host"], w["port"], w["enabled"]) for w in workers] == \
        [(i, "remote", "127.0.0.1", s.port, True) for i, s in cluster.workers.items()]
    ports = {s.port for s in cluster.servers}
    assert len(ports) == 1 + WORKERS
    for s in cluster.servers:
        assert s.proc.args[s.proc.args.index("--listen") + 1] == "127.0.0.1"
        # What the process really listens on: its one port, on the loopback only.
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(s.proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", s.port)}
        info = s.get_json("/object_info/DistributedCollector")
        assert "DistributedCollector" in info and "PoEKSampler" in s.get_json("/object_info/PoEKSampler")


@pytest.mark.parametrize("name,seed", [("digits", DIGITS_SEED), ("model", MODEL_SEED)])
def test_every_image_arrives_on_the_master_as_a_single_server_makes_it(cluster, reference, name, seed):
    entry, dispatched = cluster.run(distributed_prompt(name, seed), timeout=600)
    assert dispatched == WORKERS
    seeds = comfy_cluster.participant_seeds(seed, WORKERS)
    got = pixels(cluster.master, entry)
    assert len(got) == BATCH * (1 + WORKERS)
    assert len(set(got)) == len(got), "an image arrived twice"
    assert_same_images(got, expected(reference, name, seeds), seeds)
    # Each worker's own result (its auto-added preview) is its seed's batch: the seed rule, seen from the worker.
    for i, worker in enumerate(cluster.workers.values(), 1):
        run = worker_run(worker, job_of(entry))
        assert run["status"]["status_str"] == "success"
        assert pixels(worker, run) == reference(name, seeds[i])


def wait_for_progress(server, client_id: str, at_least: int, timeout: float = 300) -> dict:
    """The first sampler progress message at step ``at_least`` or later, over ``server``'s websocket."""
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                msg = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(msg, str):
                data = json.loads(msg)
                if data["type"] == "progress" and data["data"]["value"] >= at_least:
                    return data["data"]
    finally:
        ws.close()
    raise TimeoutError(f"no progress at step {at_least} on port {server.port} within {timeout:.0f}s")


def test_a_worker_killed_mid_run_is_reported_and_no_image_is_lost(cluster, reference):
    ids = list(cluster.workers)
    victim_id = ids[-1]
    victim = cluster.workers[victim_id]
    seeds = comfy_cluster.participant_seeds(KILL_SEED, WORKERS)

    with ThreadPoolExecutor(1) as pool:
        # Listen before queueing: Distributed hands the master's client id to the workers.
        progress = pool.submit(wait_for_progress, victim, cluster.master.client_id, 2)
        time.sleep(0.5)
        answer = cluster.queue(distributed_prompt("digits", KILL_SEED))
        step = progress.result()
    assert answer["worker_count"] == WORKERS
    assert step["value"] < step["max"], "the worker finished before it could be killed"
    victim.kill()

    entry = cluster.master.wait(answer["prompt_id"], timeout=300)
    log = cluster.master_log()
    assert f"Master - Heartbeat timeout: worker={victim_id}," in log
    got = pixels(cluster.master, entry)
    # The master's batch and the surviving worker's arrive, once each; the killed worker's never came.
    survivors = seeds[:-1]
    assert_same_images(got, expected(reference, "digits", survivors), survivors)
    assert not set(got) & set(reference("digits", seeds[-1]))

    # The next prompt runs. Queued at the killed worker's seed, it makes the missing batch on the
    # master, and the worker that is left (still first in the configuration) takes the next seed.
    entry, dispatched = cluster.run(distributed_prompt("digits", seeds[-1]), timeout=600)
    assert dispatched == WORKERS - 1
    name = next(w["name"] for w in cluster.config()["workers"] if w["id"] == victim_id)
    assert f"Worker {name} ({victim_id}) is offline, skipping." in cluster.master_log()
    again = comfy_cluster.participant_seeds(seeds[-1], WORKERS - 1)
    after = pixels(cluster.master, entry)
    assert_same_images(after, expected(reference, "digits", again), again)
    # Over both prompts every seed's batch is on the master exactly once: none lost, none twice.
    arrived = got + after
    assert len(set(arrived)) == len(arrived) == BATCH * (1 + WORKERS + 1)
    assert set(arrived) == set(expected(reference, "digits", seeds + [seeds[-1] + 1]))
