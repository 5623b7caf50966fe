"""The GPU step benchmark on a CPU at reduced widths: it runs every configuration and prints every
column, its two modes compute the same product, and it writes only its own section."""
from __future__ import annotations

import torch

from unite_and_conquer.benchmarks import bench_poe, report
from unite_and_conquer.samplers import poe
from support.small_models import one_thread  # noqa: F401  (autouse)


def test_small_run_on_the_cpu_prints_every_column(capsys):
    rows = bench_poe.main(["--small", "--device", "cpu", "--no-write", "--batches", "1", "--iters", "1",
                           "--warmup", "0", "--strict"])
    out = capsys.readouterr().out
    names = [c.name for c in bench_poe.configurations(torch.device("cpu"), None)]
    assert [r.config.name for r in rows] == names and not any(r.error for r in rows)
    header = next(line for line in out.splitlines() if line.startswith("| configuration |"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(bench_poe.COLUMNS)
    table_rows = [line for line in out.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in names]
    assert len(table_rows) == len(names)
    for line in table_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(bench_poe.COLUMNS)
        step, adm_ms, glide_ms, ratio, speedup = (float(cells[i].rstrip("x")) for i in (3, 4, 5, 6, 7))
        assert step > 0 and adm_ms > 0 and glide_ms > 0 and ratio > 0 and speedup > 0
        assert cells[8] == "-" and cells[9] == "-"  # no GPU memory on a CPU, no compile row without --compile
    by_name = {r.config.name: r for r in rows}
    assert by_name["B + no ADM null forward (its reliability 0)"].rows == (1, 2)
    assert all(r.rows == (2, 2) for r in rows if "null" not in r.config.name)
    assert f"torch {torch.__version__}" in out and "Machine: no GPU, " in out


def test_modes_a_and_b_compute_the_same_product():
    """Mode A (plain tensor ops, explicit attention) and mode B (the pack's path) in fp32."""
    device = torch.device("cpu")
    experts = bench_poe.build_experts(True, device, torch.float32)
    denoisers = [bench_poe.Denoiser(e, device) for e in experts]
    cls, cls_null, text, text_null = bench_poe.conditions(experts[1].network.config.text_ctx)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), bench_poe.SIGMA)
    staged = [poe.stack_conditions([a, b], 2) for a, b in ((cls, cls_null), (text, text_null))]
    bindings = [poe.Binding(experts[0], cls, 3.0, 0.5, (cls_null,)),
                poe.Binding(experts[1], text, 3.0, 0.5, (text_null,))]
    by_id = {id(e): d for e, d in zip(experts, denoisers)}
    with torch.inference_mode():
        b, _ = poe.product_prediction(x, sigma, bindings, lambda e, xr, sr, c: by_id[id(e)](xr, sr, c), {})
        a = bench_poe.reference_step(x, sigma, denoisers, staged, (3.0, 3.0), (0.5, 0.5))
        assert (a - b).abs().max().item() <= 1e-5
        for e in experts:
            bench_poe.speed.configure(e, attention="math")
        a_math = bench_poe.reference_step(x, sigma, denoisers, staged, (3.0, 3.0), (0.5, 0.5))
    assert (a_math - b).abs().max().item() <= 1e-4
    assert b.abs().max() > 0.1


def test_published_sizes():
    with torch.device("meta"):
        adm_net = bench_poe.adm.ADMUNet(bench_poe.adm64_config(False))
        glide_net = bench_poe.glide.GlideUNet(bench_poe.glide_base_config(False))
    assert round(sum(p.numel() for p in adm_net.parameters()) / 1e6) == 296
    assert round(sum(p.numel() for p in glide_net.parameters()) / 1e6) == 385


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## One\n\nfirst\n\n## Two\n\nsecond\n")
    report.write_section("## One", "newer first", path)
    report.write_section("## Three", "third", path)
    report.write_section("## One", "newest first", path)
    assert path.read_text() == "# Benchmarks\n\n## One\n\nnewest first\n\n## Two\n\nsecond\n\n## Three\n\nthird\n"
