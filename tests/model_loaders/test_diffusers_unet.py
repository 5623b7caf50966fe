"""diffusers UNet2DModel loader: parity with ``diffusers.UNet2DModel`` (test-only dependency) on small
random configs, folder and single-file loading, scheduler configs, old attention key names, and the
refusals (consistency models, v-prediction, files without a size)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from unite_and_conquer import model_loaders
from unite_and_conquer.model_loaders import diffusers_unet as du
from unite_and_conquer.model_loaders.expert import v_to_eps
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_at
from support import small_models
from support.small_models import one_thread  # noqa: F401  (autouse)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


# google/ddpm-style (no attention head dim, asymmetric padding, sin-first embedding), smaller.
DDPM_STYLE = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  attention_head_dim=None, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                  add_attention=False)
CONFIGS = {
    "no-attention": DDPM_STYLE,
    "attention": {**DDPM_STYLE, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                  "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "add_attention": True},
    "class-cond-multihead-scale-shift": dict(
        sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", num_class_embeds=10, mid_block_scale_factor=math.sqrt(2),
        attn_norm_num_groups=8),
}


def reference(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    small_models.randomise(model, seed + 10, unit_fan_in=lambda name: "embedding" in name)
    return model


def inputs(config: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, config["sample_size"], config["sample_size"], generator=g)
    t = torch.tensor([7.0, 801.0])
    y = torch.tensor([3, 9]) if config.get("num_class_embeds") else None
    return x, t, y


def compare(expert, ref, config, t=None):
    x, t0, y = inputs(config)
    t = t0 if t is None else t
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        got = expert(x, t, **({"y": y} if y is not None else {}))
    assert got.shape == want.shape
    assert want.abs().max() > 0.1
    return (got - want).abs().max().item()


def load_error(path, **options) -> str:
    """The message of the ValueError that loading ``path`` raises."""
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(path), **options)
    return str(err.value)


def write_scheduler(folder, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    sc = {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "num_train_timesteps": 1000, "prediction_type": "epsilon", **kw}
    (folder / "scheduler_config.json").write_text(json.dumps(sc))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folder_parity_with_diffusers(name, tmp_path):
    config = CONFIGS[name]
    ref = reference(config)
    folder = tmp_path / f"ddpm-{name}"
    ref.save_pretrained(str(folder))
    write_scheduler(folder)
    expert = model_loaders.load_expert(str(folder))
    assert expert.family == "diffusers" and expert.name == f"ddpm-{name}" and expert.prediction == "eps"
    assert expert.resolution == config["sample_size"]
    err = compare(expert, ref, config)
    assert err <= TOL, f"{name}: max abs error {err:.2e}"
    # Fractional timesteps embed the same way in both.
    err = compare(expert, ref, config, t=torch.tensor([7.5, 333.25]))
    assert err <= TOL
    acp = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.double()
    assert torch.allclose(expert.alphas_cumprod, acp, atol=1e-6)
    if config.get("num_class_embeds"):
        assert expert.modalities == ["class"] and expert.null_condition is None
        assert torch.equal(expert.encode("class", 9)["y"], torch.tensor([9]))
        with pytest.raises(ValueError) as err_info:
            expert.encode("class", 10)
        assert str(err_info.value) == f"ddpm-{name}: class index 10 is out of range; it takes 0..9"
    else:
        assert expert.modalities == [] and expert.null_condition == {}


def test_channels_last_and_half_precision(tmp_path):
    config = CONFIGS["attention"]
    ref = reference(config)
    ref.save_pretrained(str(tmp_path / "m"))
    expert = model_loaders.load_expert(str(tmp_path / "m"))
    x, t, _ = inputs(config)
    with torch.no_grad():
        want = ref(x, t).sample
        expert.network.to(memory_format=torch.channels_last)
        assert (expert(x.to(memory_format=torch.channels_last), t) - want).abs().max() <= TOL
        half = model_loaders.load_expert(str(tmp_path / "m"), dtype="bf16")
        eps = half.eps(x, t, {})
        ref_half = ref.to(torch.bfloat16)(x.bfloat16(), t).sample.float()
    rel = ((eps - want).norm() / want.norm()).item()
    ref_rel = ((ref_half - want).norm() / want.norm()).item()
    # bfloat16 keeps 8 bits: no better than diffusers' own bf16 run is expected, and no worse.
    assert eps.dtype == torch.float32 and rel < 0.1 and rel < 1.25 * ref_rel, (rel, ref_rel)


def test_pipeline_layout_and_schedules(tmp_path):
    """A pipeline folder: unet/ with the weights, scheduler/ beside it; every beta_schedule kind."""
    config = CONFIGS["no-attention"]
    ref = reference(config)
    ref.save_pretrained(str(tmp_path / "pipe" / "unet"))
    for kind, extra in (("linear", {"beta_start": 0.0002, "beta_end": 0.03}), ("scaled_linear", {}),
                        ("squaredcos_cap_v2", {})):
        write_scheduler(tmp_path / "pipe" / "scheduler", beta_schedule=kind, **extra)
        for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
            expert = model_loaders.load_expert(str(path))
            assert expert.name == "pipe"
            sc = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
            want = diffusers.DDPMScheduler.from_config(sc).alphas_cumprod.double()
            assert torch.allclose(expert.alphas_cumprod, want, atol=1e-6), kind
    assert compare(expert, ref, config) <= TOL
    cosine = model_loaders.load_expert(str(tmp_path / "pipe"), schedule="cosine")
    assert cosine.info["schedule"] == "cosine"
    assert torch.equal(cosine.alphas_cumprod, model_loaders.alphas_cumprod_for("cosine"))


def test_old_attention_key_names(tmp_path):
    config = CONFIGS["attention"]
    ref = reference(config)
    new_names = {v: k for k, v in du.OLD_ATTENTION_NAMES.items()}
    sd = {}
    for key, value in ref.state_dict().items():
        for new, old in new_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        sd[key] = value
    assert "mid_block.attentions.0.query.weight" in sd and "mid_block.attentions.0.proj_attn.bias" in sd
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    expert = model_loaders.load_expert(str(folder))
    assert compare(expert, ref, config) <= TOL
    # The same renamed keys in a single file, whose config is inferred from the keys.
    path = tmp_path / "old_single.safetensors"
    save_file(sd, str(path), metadata={"sample_size": "16"})
    single = model_loaders.load_expert(str(path), family="auto")
    assert single.family == "diffusers" and single.info["config_from"] == "keys (google/ddpm defaults)"
    assert compare(single, ref, config) <= TOL


def test_single_file_config_from_keys_and_metadata(tmp_path):
    config = CONFIGS["class-cond-multihead-scale-shift"]
    ref = reference(config)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / "cond.safetensors"
    full = {"_class_name": "UNet2DModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    save_file(sd, str(path), metadata={"config": json.dumps(full),
                                       "scheduler_config": json.dumps({"beta_schedule": "squaredcos_cap_v2"})})
    expert = model_loaders.load_expert(str(path))
    assert expert.name == "UNet2D-16" and expert.info["schedule"] == "squaredcos_cap_v2"
    assert compare(expert, ref, config) <= TOL
    # Without metadata: the structure comes from the keys, the size is missing.
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    message = load_error(bare)
    assert "diffusers checkpoint: a single file without config (block_out_channels=(16, 32, 32), layers_per_block=1, " \
           "down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D')" in message
    assert "num_class_embeds=10, resnet_time_scale_shift='scale_shift'" not in message  # values are printed plainly
    assert "num_class_embeds=10, resnet_time_scale_shift=scale_shift" in message
    assert message.endswith("set 'sample_size' (or the whole 'config') in the safetensors metadata")


def test_consistency_models_are_refused(tmp_path):
    config = CONFIGS["no-attention"]
    ref = reference(config)
    folder = tmp_path / "diffusers-cd_tiny"
    ref.save_pretrained(str(folder))
    write_scheduler(folder, _class_name="CMStochasticIterativeScheduler")
    assert load_error(folder) == (
        f"{folder / 'scheduler_config.json'}: a CMStochasticIterativeScheduler, so this is a consistency model; "
        "consistency models (openai/diffusers-cd_*, ct_*) map noise to images in one step; they are not eps "
        "predictors, so they cannot join a product of experts")
    # The CD UNets' own layout (residual up/down-sampling), with an ordinary scheduler config.
    cd = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=32,
              down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), resnet_time_scale_shift="scale_shift",
              downsample_type="resnet", upsample_type="resnet", num_class_embeds=10)
    cd_ref = diffusers.UNet2DModel(**cd)
    folder = tmp_path / "cd_layout"
    cd_ref.save_pretrained(str(folder))
    write_scheduler(folder)
    assert load_error(folder) == (
        f"{folder / 'config.json'}: residual up/down-sampling blocks, the layout of OpenAI's consistency-model "
        "UNets; consistency models (openai/diffusers-cd_*, ct_*) map noise to images in one step; they are not "
        "eps predictors, so they cannot join a product of experts")
    single = tmp_path / "cd.safetensors"
    save_file({k: v.contiguous() for k, v in cd_ref.state_dict().items()}, str(single), metadata={"sample_size": "16"})
    with pytest.raises(ValueError, match=r"diffusers checkpoint: residual up/down-sampling blocks, the layout of "
                                         r"OpenAI's consistency-model UNets"):
        model_loaders.load_expert(str(single))


def test_sample_prediction_is_refused(tmp_path):
    ref = reference(CONFIGS["no-attention"])
    folder = tmp_path / "m"
    ref.save_pretrained(str(folder))
    write_scheduler(folder, prediction_type="sample")
    assert load_error(folder, schedule="linear") == (
        f"{folder / 'scheduler_config.json'}: prediction_type 'sample'; only eps- and v-prediction "
        "(prediction_type 'epsilon' or 'v_prediction') experts can join the product")


def test_v_prediction_matches_diffusers_velocity(tmp_path):
    """A v_prediction folder loads as a v expert, and its eps is the noise diffusers' own velocity implies."""
    config = CONFIGS["no-attention"]
    ref = reference(config)
    folder = tmp_path / "v"
    ref.save_pretrained(str(folder))
    write_scheduler(folder, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    expert = model_loaders.load_expert(str(folder))
    assert expert.prediction == "v"
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 400, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    velocity = scheduler.get_velocity(x0, noise, t)
    alpha_bar = alphas_cumprod_at(t.double(), expert.alphas_cumprod)
    assert torch.allclose(v_to_eps(velocity, x_t, alpha_bar), noise, atol=1e-4)
    x = torch.randn(2, 3, config["sample_size"], config["sample_size"], generator=g)
    tt = torch.tensor([7.0, 801.0])
    with torch.no_grad():
        want = v_to_eps(ref(x, tt).sample, x, alphas_cumprod_at(tt, expert.alphas_cumprod))
        assert (expert.eps(x, tt, {}) - want).abs().max() <= TOL


def test_folder_errors_and_detection(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_error(empty).startswith(f"{empty}: a folder without config.json")
    ref = reference(CONFIGS["no-attention"])
    folder = tmp_path / "noweights"
    ref.save_pretrained(str(folder))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert load_error(folder) == (f"{folder}: no weights in the folder (expected diffusion_pytorch_model.safetensors "
                                  "or diffusion_pytorch_model.bin)")
    sd = ref.state_dict()
    assert du.detect(sd, {}, "diffusers") and not du.detect(sd, {}, "adm")
    from unite_and_conquer.model_loaders import adm

    assert not adm.detect(sd, {}, "adm")
    bad = {k: v for k, v in sd.items() if k != "up_blocks.0.resnets.1.conv2.bias"}
    path = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(path), metadata={"sample_size": "16"})
    assert 'Missing key(s) in state_dict: "up_blocks.0.resnets.1.conv2.bias"' in load_error(path)
