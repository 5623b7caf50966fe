"""tools/train_tiny.py: its loss weighting, and short runs that write loadable experts."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import model_loaders
from model_loaders.schedules import alphas_cumprod_for
from tools import train_tiny


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


def test_unknown_prediction_is_refused():
    with pytest.raises(SystemExit):
        train_tiny.main(["--prediction", "x0"])
