"""Tier (c) fuzz: 300 seeded malformed or extreme prompts posted to a real ComfyUI server on
127.0.0.1. Each must be refused by validation (HTTP 400 with ``error``/``node_errors``) or end in a
clean execution error (``execution_error`` in its history, status ``error``); the server stays up,
and a valid prompt queued after them gives exactly the image it gave before them.

Every request and every wait is bounded; values that pass validation stay small (1 step, batch 1),
and work past the schema's limits (steps, batch, width, height) must be refused by validation.
"""
from __future__ import annotations

import collections
import json
import time

import pytest

from support import fuzz

N_PROMPTS = 300
SEED = 20231
PER_PROMPT_TIMEOUT = 60
# ComfyUI's own /prompt handler (not the pack) answers 500 when a node is not a JSON object or has
# no dict of inputs; the server stays up. Only these structural mutations may get it.
HANDLER_CRASH_KINDS = {"inputs_not_dict"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = fuzz.start_server(tmp_path_factory.mktemp("fuzz"))
    yield srv
    srv.stop()


def post(server, prompt) -> tuple[int, dict]:
    status, body = server.request("/prompt", {"prompt": prompt, "client_id": server.client_id}, timeout=30)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, {"raw": body.decode(errors="replace")}


def execution_error(entry: dict) -> dict | None:
    errors = [d for kind, d in entry["status"].get("messages", []) if kind == "execution_error"]
    return errors[0] if errors else None


@pytest.fixture(scope="module")
def fuzz_run(server):
    """Post the prompts; return the tallies, the reference and final images, and any bad answer."""
    reference = fuzz.product_prompt(seed=77, steps=2, prefix="reference")
    ref_entry = server.run(reference, timeout=120)
    ref_pixels = fuzz.pixels(server, ref_entry)

    base = fuzz.product_prompt(seed=3, steps=1, prefix="fuzz")
    info = server.get_json("/object_info")
    tally: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    bad: list[str] = []
    unnamed: collections.Counter = collections.Counter()   # pack errors that do not name their node
    started = time.monotonic()
    for i, (kind, prompt) in zip(range(N_PROMPTS), fuzz.PromptFuzzer(base, info, seed=SEED)):
        status, answer = post(server, prompt)
        if status == 400:
            outcome = "validation"
            if not (answer.get("error") or answer.get("node_errors")):
                bad.append(f"#{i} {kind}: HTTP 400 without error/node_errors: {answer}")
        elif status == 200:
            entry = fuzz.wait_end(server, answer["prompt_id"], PER_PROMPT_TIMEOUT)
            if entry["status"]["status_str"] == "success":
                outcome = "success"
            else:
                outcome = "execution"
                err = execution_error(entry)
                if err is None or not err.get("exception_message", "").strip():
                    bad.append(f"#{i} {kind}: execution failed without an execution_error: {entry['status']}")
                elif err["node_type"].startswith("PoE") and not err["exception_message"].startswith(err["node_type"]):
                    unnamed[(err["node_type"], err["exception_type"], err["exception_message"].strip()[:120])] += 1
        elif status == 500 and kind in HANDLER_CRASH_KINDS:
            outcome = "handler_500"
        else:
            outcome = f"http_{status}"
            bad.append(f"#{i} {kind}: HTTP {status}: {str(answer)[:300]}")
        tally[outcome] += 1
        by_kind[(kind, outcome)] += 1
        if not server.alive():
            bad.append(f"#{i} {kind}: the server died:\n{server.log_tail()}")
            break
    elapsed = time.monotonic() - started

    final_entry = server.run(reference, timeout=120)
    return {"tally": tally, "by_kind": by_kind, "bad": bad, "unnamed": unnamed, "elapsed": elapsed,
            "ref_pixels": ref_pixels, "final_pixels": fuzz.pixels(server, final_entry), "final_entry": final_entry}


def test_every_malformed_prompt_is_refused_or_fails_cleanly(server, fuzz_run, record_property):
    tally = fuzz_run["tally"]
    print(f"\n{N_PROMPTS} prompts in {fuzz_run['elapsed']:.0f}s: {dict(tally)}")
    for (kind, outcome), n in sorted(fuzz_run["by_kind"].items()):
        print(f"  {kind:22s} {outcome:12s} {n}")
    record_property("fuzz_tally", dict(tally))
    assert not fuzz_run["bad"], "\n".join(fuzz_run["bad"][:20])
    assert sum(tally.values()) == N_PROMPTS
    assert server.alive()
    # The mix must exercise all three paths (the seed is fixed, so these counts are reproducible).
    assert tally["validation"] >= 150 and tally["execution"] >= 20 and tally["success"] >= 10


def test_a_valid_prompt_after_the_fuzz_gives_the_reference_image(fuzz_run):
    assert fuzz.SAMPLER_ID not in fuzz.cached_nodes(fuzz_run["final_entry"]), "the final image came from the cache"
    assert fuzz_run["final_pixels"] and fuzz_run["final_pixels"] == fuzz_run["ref_pixels"]


def test_every_pack_execution_error_names_its_node(fuzz_run):
    unnamed = fuzz_run["unnamed"]
    assert not unnamed, "\n".join(f"{n}x {k}" for k, n in unnamed.items())


# --- graphs of bindings through the real server -----------------------------------------------------------------
# A seeded sample of the in-process graph fuzz (tests/inprocess/test_graph_fuzz.py, support/graph_fuzz.py), written
# as API prompts of stock and pack nodes and posted through each path that samples a product: PoEKSampler,
# PoEGuider + PoEScheduler + SamplerCustomAdvanced, and the stock KSampler on PoEEncodeCondition's MODEL against
# PoEKSampler on that binding alone. The in-process fuzz checks the numbers against the rule; here the server must
# give the same outcome on every path: the same image, or a refusal naming the node and the input in the same
# words, of the kind the oracle expects.

N_GRAPHS = 24
GRAPH_SEED = 4099


@pytest.fixture(scope="module")
def graphs():
    import random

    from support import graph_fuzz as gf
    from support.comfy_harness import comfy_nodes

    comfy_nodes()      # the oracle reads the tiny experts' schedules through the pack's loader
    rnd = random.Random(GRAPH_SEED)
    out = []
    while len(out) < N_GRAPHS:
        spec = gf.graph_spec(rnd.randrange(2**32))
        if gf.server_ready(spec):
            out.append(spec)
    return out


def outcome(server, prompt: dict) -> tuple[str, object]:
    """("image", decoded pixels) or ("refused", execution_error), never an HTTP refusal (the prompts are valid)."""
    status, answer = post(server, prompt)
    assert status == 200, f"HTTP {status}: {str(answer)[:500]}"
    entry = fuzz.wait_end(server, answer["prompt_id"], 120)
    if entry["status"]["status_str"] == "success":
        return "image", fuzz.pixels(server, entry)
    return "refused", execution_error(entry)


def test_graphs_give_one_outcome_on_every_path_through_the_server(server, graphs):
    import numpy as np

    from support import graph_fuzz as gf

    tally: collections.Counter = collections.Counter()
    started = time.monotonic()
    for n, spec in enumerate(graphs):
        where = f"graph {n} (seed {spec.seed}):\n{spec.describe()}"
        got = {path: outcome(server, gf.api_prompt(spec, path, f"graph{n}_{path}")) for path in ("ksampler", "custom")}
        kinds = {path: kind for path, (kind, _) in got.items()}
        assert len(set(kinds.values())) == 1, f"{where}\npaths disagree: {got}"
        if kinds["ksampler"] == "refused":
            bodies = set()
            for path, (_, err) in got.items():
                m = gf.NAMED.match(err["exception_message"])
                assert m and err["node_type"].startswith(("PoE", "SamplerCustomAdvanced")), f"{where}\n{path}: {err}"
                bodies.add(m.group(3))
            assert len(bodies) == 1, f"{where}\nrefused with different words: {bodies}"
            kind = gf.refusal_kind(bodies.pop())
            assert kind in gf.oracle(spec), f"{where}\nrefused as {kind}, oracle: {gf.oracle(spec)}"
            tally[f"refused: {kind}"] += 1
        else:
            assert not gf.oracle(spec), f"{where}\nsampled, but the oracle expects {gf.oracle(spec)}"
            a, b = (np.frombuffer(got[p][1][0], np.uint8).astype(int) for p in ("ksampler", "custom"))
            tally["sampled"] += 1
            if spec.canvas == max(gf.size_of(x.kind) or 0 for x in spec.bindings):
                # On the largest expert's canvas PoEScheduler's sigmas are PoEKSampler's: the same image.
                assert np.abs(a - b).max() <= 1, f"{where}\nPoEKSampler and SamplerCustomAdvanced differ"
        b = spec.bindings[spec.stock_index]
        if b.weight < 0 or b.mask or b.band:
            continue
        stock = outcome(server, gf.api_prompt(spec, "stock", f"graph{n}_stock"))
        solo = outcome(server, gf.api_prompt(spec.solo(spec.stock_index), "ksampler", f"graph{n}_solo"))
        assert stock[0] == solo[0], f"{where}\nstock {stock} vs PoEKSampler on the binding alone {solo}"
        if stock[0] == "refused":
            s, p = (gf.NAMED.match(x[1]["exception_message"]) for x in (stock, solo))
            assert s and p and s.group(3) == p.group(3), f"{where}\n{stock[1]}\n{solo[1]}"
            tally["stock and solo: refused"] += 1
        else:
            a, c = (np.frombuffer(x[1][0], np.uint8).astype(int) for x in (stock, solo))
            assert np.abs(a - c).max() <= 1, f"{where}\nthe stock KSampler and PoEKSampler differ"
            tally["stock and solo: sampled"] += 1
    print(f"\n{len(graphs)} graphs through the server in {time.monotonic() - started:.0f}s: {dict(tally)}")
    assert tally["sampled"] >= 4 and sum(v for k, v in tally.items() if k.startswith("refused")) >= 4
    assert server.alive()
