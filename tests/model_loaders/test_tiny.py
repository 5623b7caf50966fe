"""The tiny digit family: the shipped experts load through ``load_expert``, their encoders and
their errors, and the loader's round trip of a saved network."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unite_and_conquer import model_loaders
from unite_and_conquer.model_loaders import tiny
from unite_and_conquer.model_loaders.expert import v_to_eps
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_at, alphas_cumprod_for
from unite_and_conquer.samplers import noise_levels
from unite_and_conquer.tools import digits

MODELS = Path(__file__).resolve().parents[2] / "models_tiny"
SCHEDULES = {"class": "cosine", "colour": "linear", "layout": "cosine"}


@pytest.fixture(scope="module")
def shipped():
    return {m: model_loaders.load_expert(str(MODELS / f"tiny_{m}.safetensors"), family="auto")
            for m in tiny.MODALITIES}


def test_shipped_files_are_small():
    sizes = [(MODELS / f"tiny_{m}.safetensors").stat().st_size for m in tiny.MODALITIES]
    assert sum(sizes) < 10 * 2**20


@pytest.mark.parametrize("modality", tiny.MODALITIES)
def test_shipped_expert_loads_and_predicts(shipped, modality):
    e = shipped[modality]
    assert e.family == "tiny"
    assert e.name == tiny.NAMES[modality]
    assert e.resolution == 32 and e.prediction == "v_learned_sigma"
    assert e.info["schedule"] == SCHEDULES[modality]
    assert torch.equal(e.alphas_cumprod, alphas_cumprod_for(SCHEDULES[modality]))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 700.5])
    null = e.eps(x, t, e.null_condition)
    assert null.shape == (2, 3, 32, 32) and null.dtype == torch.float32
    assert torch.isfinite(null).all()
    # A trained expert denoises real held-out digits under its own condition: the x0 it implies at
    # t = 300 is close to the canvas (MSE 0.0066 class, 0.0205 colour, 0.0079 layout observed for the
    # shipped files; an untrained network 0.23 to 0.60, the mean canvas 0.133).
    images, labels = digits.split("heldout")
    target = digits.make_canvases(images, labels, 32, seed=5)
    cond = {"class": {"y": target.label}, "colour": {"colour": target.colour},
            "layout": {"layout": torch.cat([target.layout, torch.ones_like(target.layout)], 1)}}[modality]
    t = torch.full((32,), 300.0)
    a = alphas_cumprod_at(t, e.alphas_cumprod).float().view(-1, 1, 1, 1)
    noise = torch.randn(target.images.shape, generator=torch.Generator().manual_seed(0))
    x_t = a.sqrt() * target.images + (1 - a).sqrt() * noise
    with torch.no_grad():
        x0 = (x_t - (1 - a).sqrt() * e.eps(x_t, t, cond)) / a.sqrt()
    assert float((x0 - target.images).pow(2).mean()) < 0.04


@pytest.mark.parametrize("modality", tiny.MODALITIES)
def test_shipped_variance_heads_know_how_wrong_their_expert_is(shipped, modality):
    """On held-out digits the Var[x0 | x_t] a shipped head reports tracks the squared error of its
    expert's x0: within a factor 2.5 on average at every noise level tested, and higher where the
    error is (pixel correlation; observed ratios 0.9 to 2.1 and correlations 0.15 to 0.4, see
    BENCHMARKS.md; a constant head has correlation 0, an untrained one ratios of 10 to 700)."""
    from unite_and_conquer.samplers import variance_reliability as vr

    e = shipped[modality]
    images, labels = digits.split("heldout")
    target = digits.make_canvases(images, labels, 64, seed=7)
    cond = {"class": {"y": target.label}, "colour": {"colour": target.colour},
            "layout": {"layout": torch.cat([target.layout, torch.ones_like(target.layout)], 1)}}[modality]
    g = torch.Generator().manual_seed(1)
    for step in (100, 400, 700, 900):
        t = torch.full((64,), float(step))
        a = alphas_cumprod_at(t, e.alphas_cumprod).float().view(-1, 1, 1, 1)
        x_t = a.sqrt() * target.images + (1 - a).sqrt() * torch.randn(target.images.shape, generator=g)
        with torch.no_grad():
            eps, values = e.predict(x_t, t, cond)
        err = ((x_t - (1 - a).sqrt() * eps) / a.sqrt() - target.images).pow(2)
        var = vr.x0_variance_from_values(values, e.alphas_cumprod, t)
        ratio = float(var.mean() / err.mean())
        r = float(torch.corrcoef(torch.stack([var.flatten(), err.flatten()]))[0, 1])
        assert 1 / 2.5 < ratio < 2.5 and r > 0.1, (step, ratio, r)


def test_class_names_and_nulls(shipped):
    assert shipped["class"].class_names == [str(k) for k in range(10)]
    assert shipped["colour"].class_names == ["red", "green", "blue", "yellow", "magenta", "cyan"]
    assert torch.equal(shipped["class"].null_condition["y"], torch.tensor([10]))
    assert torch.equal(shipped["colour"].null_condition["colour"], torch.tensor([6]))
    assert torch.equal(shipped["layout"].null_condition["layout"], torch.zeros(1, 2, 32, 32))


def test_class_encoder(shipped):
    e = shipped["class"]
    assert torch.equal(e.encode("class", 7)["y"], torch.tensor([7]))
    assert torch.equal(e.encode("class", torch.tensor(4))["y"], torch.tensor([4]))
    for bad in (10, -1, 2.0, "3", True):
        with pytest.raises(ValueError, match=re.escape(f"Tiny digits · class: the class must be an integer digit "
                                                       f"0..9, got {bad!r}")):
            e.encode("class", bad)
    with pytest.raises(ValueError, match=re.escape("Tiny digits · class does not take a 'text' condition; "
                                                   "it accepts: class")):
        e.encode("text", "seven")


def test_colour_encoder_through_colour_and_text(shipped):
    e = shipped["colour"]
    assert torch.equal(e.encode("colour", "blue")["colour"], torch.tensor([2]))
    assert torch.equal(e.encode("text", "  Magenta ")["colour"], torch.tensor([4]))
    with pytest.raises(ValueError, match=re.escape("Tiny digits · colour: unknown colour 'purple'; the vocabulary "
                                                   "is: red, green, blue, yellow, magenta, cyan")):
        e.encode("text", "purple")
    with pytest.raises(ValueError, match=re.escape("unknown colour 3;")):
        e.encode("colour", 3)


def test_layout_encoder_resizes_and_flags(shipped):
    e = shipped["layout"]
    big = torch.zeros(2, 1, 64, 64)
    big[:, :, 16:48, 8:40] = 1
    cond = e.encode("segmentation", big, slot=None)["layout"]
    assert cond.shape == (2, 2, 32, 32)
    assert torch.equal(cond[:, 1], torch.ones(2, 32, 32))
    # The box is 16 x 16 at 32 px; antialiased bilinear keeps its mass.
    assert abs(float(cond[0, 0].sum()) - 256) < 1e-3
    assert float(cond[0, 0, 12, 10]) == pytest.approx(1.0) and float(cond[0, 0, 2, 2]) == 0.0
    same = e.encode("segmentation", big[:, 0, ::2, ::2])["layout"]      # B x H x W at 32 px
    assert torch.equal(same[:, 0], big[:, 0, ::2, ::2])
    with pytest.raises(ValueError, match=re.escape("Tiny digits · layout: the layout map must lie in [0, 1], "
                                                   "got [0, 2]")):
        e.encode("segmentation", big * 2)
    with pytest.raises(ValueError, match=re.escape("Tiny digits · layout: the layout map must be B x 1 x H x W, "
                                                   "got shape (1, 3, 32, 32)")):
        e.encode("segmentation", torch.zeros(1, 3, 32, 32))


def _small(modality: str, tmp_path: Path, **changes) -> tuple[Path, torch.nn.Module]:
    config = tiny.default_config(modality) | {"widths": [8, 16, 16]} | changes
    torch.manual_seed(1)
    net = tiny.network_from_config(config)
    path = tmp_path / f"small_{modality}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=tiny.metadata_for(config))
    return path, net.eval()


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("modality", tiny.MODALITIES)
def test_round_trip_is_exact(tmp_path, modality, prediction):
    path, net = _small(modality, tmp_path, prediction=prediction)
    e = model_loaders.load_expert(str(path))
    assert e.family == "tiny" and e.prediction == prediction
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0.0, 250.25, 999.0])
    cond = {"class": {"y": torch.tensor([1, 2, 10])}, "colour": {"colour": torch.tensor([0, 5, 6])},
            "layout": {"layout": torch.rand(3, 2, 32, 32)}}[modality]
    with torch.no_grad():
        raw = net(x, t, **cond)
        expected = raw if prediction == "eps" else v_to_eps(raw, x, alphas_cumprod_at(t, e.alphas_cumprod))
        assert torch.equal(e.eps(x, t, cond), expected)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_learned_sigma_round_trip_keeps_the_prediction_and_adds_the_values(tmp_path, prediction):
    """A variance head changes nothing in the first half of the output: the same weights without
    the head predict bit for bit the same; the second half comes back from Expert.predict."""
    path, net = _small("class", tmp_path, prediction=prediction, learned_sigma=True)
    e = model_loaders.load_expert(str(path))
    assert e.prediction == f"{prediction}_learned_sigma" and e.learned_sigma
    plain = tiny.network_from_config(tiny.default_config("class") | {"widths": [8, 16, 16], "prediction": prediction})
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("variance.") for k in unexpected)
    x, t, cond = torch.randn(3, 3, 32, 32), torch.tensor([1.0, 250.25, 999.0]), {"y": torch.tensor([1, 2, 10])}
    with torch.no_grad():
        raw = net(x, t, **cond)
        assert raw.shape == (3, 6, 32, 32)
        assert torch.equal(raw[:, :3], plain.eval()(x, t, **cond))
        eps, values = e.predict(x, t, cond)
        expected = raw[:, :3] if prediction == "eps" else v_to_eps(raw[:, :3], x, alphas_cumprod_at(t, e.alphas_cumprod))
        assert torch.equal(eps, expected) and torch.equal(e.eps(x, t, cond), expected)
        assert torch.equal(values, raw[:, 3:])
    path, _ = _small("class", tmp_path, prediction=prediction)
    assert model_loaders.load_expert(str(path)).predict(x, t, cond)[1] is None


def test_alphas_cumprod_at_matches_the_table_and_the_bridge():
    table = alphas_cumprod_for("cosine")
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(alphas_cumprod_at(t, table), table, rtol=1e-12, atol=0)
    t = torch.tensor([0.3, 17.5, 500.25, 998.9])
    sigma = noise_levels.sigma_from_timestep(t, table)
    assert torch.allclose(alphas_cumprod_at(t, table), 1 / (1 + sigma**2), rtol=1e-10, atol=0)
    assert torch.allclose(alphas_cumprod_at(torch.tensor([-3.0, 2000.0]), table), table[[0, -1]], rtol=1e-12, atol=0)


def test_v_prediction_gives_back_the_noise():
    """A network that predicts the exact v of a noised image is turned into the exact eps."""
    table = alphas_cumprod_for("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 10.5, 400.0, 999.0])
    a = alphas_cumprod_at(t, table).float().view(-1, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(v_to_eps(v, x, a.flatten()), eps, atol=1e-5)


def test_patch_one_network_runs(tmp_path):
    path, _ = _small("class", tmp_path, patch=1, attention=False)
    e = model_loaders.load_expert(str(path), family="tiny")
    assert e.eps(torch.zeros(1, 3, 32, 32), torch.tensor([5.0]), e.null_condition).shape == (1, 3, 32, 32)


def test_detect_claims_only_tiny_metadata():
    assert tiny.detect({}, {"uac_family": "tiny"}, "tiny")
    assert not tiny.detect({}, {}, "tiny")
    assert not tiny.detect({}, {"uac_family": "face"}, "tiny")


def test_bad_metadata_is_named(tmp_path):
    path, _ = _small("colour", tmp_path)
    sd = model_loaders.load_state_dict(str(path))
    with pytest.raises(ValueError, match=re.escape("tiny checkpoint: 'uac_config' lacks schedule")):
        tiny.build(sd, {"uac_family": "tiny", "uac_config": json.dumps({"modality": "colour", "widths": [8, 16, 16],
                                                                       "res_blocks": 1, "attention": True})}, "tiny")
    with pytest.raises(ValueError, match="tiny checkpoint: its metadata has no readable 'uac_config' JSON"):
        tiny.build(sd, {"uac_family": "tiny"}, "tiny")
    config = tiny.default_config("colour") | {"widths": [8, 16, 32]}
    with pytest.raises(ValueError, match=r"tiny colour checkpoint does not match its config"):
        tiny.build(sd, tiny.metadata_for(config), "tiny")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_variance_head_values_give_back_its_x0_variance(schedule):
    """tiny.iddpm_values is the inverse of what the sampler reads (variance_reliability)."""
    from unite_and_conquer.samplers import variance_reliability as vr

    table = alphas_cumprod_for(schedule)
    t = torch.tensor([0.0, 1.0, 37.5, 400.0, 998.25, 999.0])
    log_var = torch.linspace(-9, 0, 6, dtype=torch.float64).view(1, 1, 1, 6).expand(6, 3, 2, 6)
    values = tiny.iddpm_values(log_var, t, table)
    assert values.min() > -1
    back = vr.x0_variance(vr.learned_log_variance(values, vr.step_coefficients(table, t)), vr.step_coefficients(table, t))
    torch.testing.assert_close(back.log(), log_var, rtol=0, atol=1e-6)
