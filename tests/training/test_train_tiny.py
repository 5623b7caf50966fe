"""tools/train_tiny.py: its loss weighting, and short runs that write loadable experts."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from unite_and_conquer import model_loaders
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.tools import train_tiny


def test_min_snr_weight_caps_only_the_low_noise_levels():
    ac = alphas_cumprod_for("cosine")
    snr = ac / (1 - ac)
    w = train_tiny.example_weight(ac, 5.0)
    assert torch.equal(train_tiny.example_weight(ac, 0.0), torch.ones_like(ac))
    assert torch.all(w[snr <= 5] == 1)
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5])
    assert float(w[0]) < 0.01 and float(w[-1]) == 1.0


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_short_runs_write_loadable_experts_and_keep_or_switch_the_target(tmp_path):
    torch.set_num_threads(1)
    small = ["--modality", "colour", "--steps", "3", "--batch", "4", "--pool", "8"]
    train_tiny.main(small + ["--out", str(tmp_path / "v"), "--checkpoint-every", "2"])
    path = tmp_path / "v" / "tiny_colour.safetensors"
    meta = _meta(path)
    assert json.loads(meta["uac_config"])["prediction"] == "v"
    assert "steps=3 " in meta["uac_training"] and "prediction=v" in meta["uac_training"]
    assert not (tmp_path / "v" / "tiny_colour.tmp").exists()
    expert = model_loaders.load_expert(str(path))
    assert expert.prediction == "v"
    eps = expert.eps(torch.zeros(1, 3, 32, 32), torch.tensor([500.0]), expert.encode("colour", "red"))
    assert eps.shape == (1, 3, 32, 32) and torch.isfinite(eps).all()

    # A later stage keeps its --init file's target unless told otherwise, and records the history.
    train_tiny.main(small + ["--out", str(tmp_path / "eps"), "--init", str(tmp_path / "v"), "--prediction", "eps"])
    train_tiny.main(small + ["--out", str(tmp_path / "kept"), "--init", str(tmp_path / "eps")])
    assert json.loads(_meta(tmp_path / "eps" / "tiny_colour.safetensors")["uac_config"])["prediction"] == "eps"
    kept = _meta(tmp_path / "kept" / "tiny_colour.safetensors")
    assert json.loads(kept["uac_config"])["prediction"] == "eps"
    assert kept["uac_training"].count("; then ") == 2


def test_a_coarser_expert_starts_from_a_full_size_one_and_learns_pooled_canvases(tmp_path):
    torch.set_num_threads(1)
    small = ["--modality", "class", "--steps", "2", "--batch", "4", "--pool", "8"]
    train_tiny.main(small + ["--out", str(tmp_path / "full")])
    train_tiny.main(small + ["--out", str(tmp_path / "half"), "--init", str(tmp_path / "full"), "--resolution", "16",
                             "--name", "tiny_class_16"])
    path = tmp_path / "half" / "tiny_class_16.safetensors"
    assert json.loads(_meta(path)["uac_config"])["resolution"] == 16
    assert "resolution=16" in _meta(path)["uac_training"]
    expert = model_loaders.load_expert(str(path))
    assert expert.resolution == 16 and expert.name == "Tiny digits · class · 16px"
    x0, *_ = next(train_tiny.noisy_batches("class", "cosine", 2, 8, 0, 0.0, 16))
    assert x0.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="--resolution must divide 32, got 12"):
        next(train_tiny.noisy_batches("class", "cosine", 2, 8, 0, 0.0, 12))


def test_unknown_prediction_is_refused():
    with pytest.raises(SystemExit):
        train_tiny.main(["--prediction", "x0"])


@pytest.mark.parametrize("t", [1, 40, 400, 950])
def test_x0_nll_is_smallest_where_the_implied_x0_variance_is_the_squared_error(t):
    """The variance head's loss, over IDDPM's values, has its minimum where Var[x0 | x_t] (as the
    sampler reads it, samplers/variance_reliability.py) equals the mean squared error of x0."""
    from unite_and_conquer.samplers import variance_reliability as vr

    ac = alphas_cumprod_for("cosine")
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(1, 3, 8, 8, generator=g)
    x0_pred = x0 + 0.03 * torch.randn(x0.shape, generator=g)
    grid = torch.linspace(-1, 1, 200001, dtype=torch.float64).view(-1, 1, 1, 1)
    tt = torch.full((len(grid),), t)
    best = grid[train_tiny.x0_nll(x0, x0_pred, grid, tt, ac).argmin()].view(1, 1, 1, 1)
    implied = vr.x0_variance_from_values(best, ac, tt[:1].double()).item()
    mse = (x0 - x0_pred).pow(2).mean().item()
    if vr.x0_variance_from_values(torch.ones(1, 1, 1, 1), ac, tt[:1].double()).item() < mse:
        assert best.item() == 1.0       # more error than the step can hold: the largest variance
    else:
        assert implied == pytest.approx(mse, rel=1e-2)   # the grid step in V is up to 0.6% of it


def test_variance_head_keeps_the_expert_exactly_and_learns_the_variance(tmp_path):
    torch.set_num_threads(1)
    small = ["--modality", "class", "--batch", "8", "--pool", "16", "--fp32"]
    train_tiny.main(small + ["--steps", "2", "--out", str(tmp_path / "base")])
    train_tiny.main(small + ["--steps", "4", "--out", str(tmp_path / "head"), "--init", str(tmp_path / "base"),
                             "--variance-head"])
    base = model_loaders.load_expert(str(tmp_path / "base" / "tiny_class.safetensors"))
    head = model_loaders.load_expert(str(tmp_path / "head" / "tiny_class.safetensors"))
    meta = _meta(tmp_path / "head" / "tiny_class.safetensors")
    assert json.loads(meta["uac_config"])["learned_sigma"] is True and "variance_head=x0_nll" in meta["uac_training"]
    assert head.prediction == "v_learned_sigma" and base.prediction == "v"
    x, t, cond = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 600.0]), {"y": torch.tensor([4, 10])}
    with torch.no_grad():
        eps, values = head.predict(x, t, cond)
        assert torch.equal(eps, base.eps(x, t, cond)) and values.shape == (2, 3, 32, 32)
    # The head trained: it no longer matches a fresh head of the same seed.
    untrained = {k: v for k, v in head.network.state_dict().items()}
    assert any(k.startswith("variance.") for k in untrained)
    with pytest.raises(ValueError, match="--variance-head trains a head on a finished expert: give it --init"):
        train_tiny.train("class", 1, 2, 0, 1e-3, 0.1, 0.9, 4, variance_head=True)
    # Training the network further drops the head, which was calibrated on the old predictions.
    train_tiny.main(small + ["--steps", "2", "--out", str(tmp_path / "more"), "--init", str(tmp_path / "head")])
    more = model_loaders.load_expert(str(tmp_path / "more" / "tiny_class.safetensors"))
    assert more.prediction == "v" and json.loads(_meta(tmp_path / "more" / "tiny_class.safetensors")["uac_config"])[
        "learned_sigma"] is False
    assert not any(k.startswith("variance.") for k in more.network.state_dict())
    # So does a coarser expert started from it; its head is trained afterwards, at its own size.
    train_tiny.main(small + ["--steps", "1", "--out", str(tmp_path / "half"), "--init", str(tmp_path / "head"),
                             "--resolution", "16"])
    half = json.loads(_meta(tmp_path / "half" / "tiny_class.safetensors")["uac_config"])
    assert (half["resolution"], half["learned_sigma"]) == (16, False)
    with pytest.raises(ValueError, match="--variance-head trains a head for a finished expert at its own size; "
                                         "train the 16 px network first, then its head with --init on that file"):
        train_tiny.train("class", 1, 2, 0, 1e-3, 0.1, 0.9, 4, init=tmp_path / "head" / "tiny_class.safetensors",
                         variance_head=True, resolution=16)


@pytest.mark.parametrize("modality", ["class", "layout"])
def test_refined_patches_compute_the_full_size_network_through_the_pooling(modality):
    """``refine_patches``: the patch-1 network at 16 px is exactly pool_2(net(up_2(x))) of the patch-2 one."""
    from einops import repeat

    torch.manual_seed(0)
    config = {**model_loaders.tiny.default_config(modality), "learned_sigma": False}
    net = model_loaders.tiny.network_from_config(config).eval()
    with torch.no_grad():  # random, not zero-initialised, output weights, so every term counts
        for p in net.parameters():
            p.normal_(0, 0.2)
    fine = model_loaders.tiny.network_from_config({**config, "patch": 1}).eval()
    fine.load_state_dict(train_tiny.refine_patches(net.state_dict(), 2, 1))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300.0, 700.0])
    cond = {"y": torch.tensor([3, 10])} if modality == "class" else {"layout": torch.rand(1, 2, 16, 16)}
    up = lambda z: repeat(z, "b c h w -> b c (h 2) (w 2)")  # noqa: E731
    full_cond = cond if modality == "class" else {"layout": up(cond["layout"])}
    with torch.no_grad():
        want = torch.nn.functional.avg_pool2d(net(up(x), t, **full_cond), 2)
        got = fine(x, t, **cond)
    assert want.abs().mean() > 0.1
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    with pytest.raises(ValueError, match=r"--patch 3 must divide the --init network's patch 2"):
        train_tiny.refine_patches(net.state_dict(), 2, 3)


def test_a_coarser_expert_can_keep_the_full_size_token_grid(tmp_path):
    torch.set_num_threads(1)
    small = ["--modality", "class", "--steps", "2", "--batch", "4", "--pool", "8"]
    train_tiny.main(small + ["--out", str(tmp_path / "full")])
    train_tiny.main(small + ["--out", str(tmp_path / "half"), "--init", str(tmp_path / "full"), "--resolution", "16",
                             "--patch", "1", "--name", "tiny_class_16"])
    path = tmp_path / "half" / "tiny_class_16.safetensors"
    config = json.loads(_meta(path)["uac_config"])
    assert (config["resolution"], config["patch"]) == (16, 1)
    assert "resolution=16 patch=1" in _meta(path)["uac_training"]
    expert = model_loaders.load_expert(str(path))
    out = expert.eps(torch.zeros(1, 3, 16, 16), torch.tensor([500.0]), expert.encode("class", 3))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"--patch changes the network, and --variance-head trains a head"):
        train_tiny.main(small + ["--out", str(tmp_path / "x"), "--init", str(tmp_path / "full"), "--patch", "1",
                                 "--variance-head"])


def test_a_new_network_takes_its_own_level_widths_and_patch(tmp_path):
    torch.set_num_threads(1)
    small = ["--modality", "class", "--steps", "2", "--batch", "4", "--pool", "8"]
    train_tiny.main(small + ["--out", str(tmp_path / "wide"), "--widths", "8", "8", "16", "24", "--patch", "1"])
    path = tmp_path / "wide" / "tiny_class.safetensors"
    config = json.loads(_meta(path)["uac_config"])
    assert (config["widths"], config["patch"]) == ([8, 8, 16, 24], 1)
    assert "patch=1 widths=8/8/16/24" in _meta(path)["uac_training"]
    expert = model_loaders.load_expert(str(path))
    out = expert.eps(torch.zeros(1, 3, 32, 32), torch.tensor([500.0]), expert.encode("class", 3))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="--widths sets the levels of a new network; an --init network keeps its own"):
        train_tiny.main(small + ["--out", str(tmp_path / "x"), "--init", str(tmp_path / "wide"), "--widths", "8", "16"])
    with pytest.raises(ValueError, match="--patch must divide the canvas side 32, got 3"):
        train_tiny.main(small + ["--out", str(tmp_path / "x"), "--patch", "3"])


def test_x0_error_grows_with_the_noise_band_and_reads_the_training_split(capsys):
    torch.set_num_threads(1)
    shipped = train_tiny.REPO / "models_tiny" / "tiny_class.safetensors"
    errors = list(train_tiny.x0_errors(shipped, "heldout", n=64).values())
    assert len(errors) == len(train_tiny.NOISE_BANDS)
    assert all(a < b for a, b in zip(errors, errors[1:])) and errors[0] < 0.01
    table = train_tiny.x0_error_table([shipped], ["own", "heldout"], 16)
    assert "| widths 16/32/64, patch 2 | class |" in table and "| widths 16/32/64, patch 2 | heldout |" in table
