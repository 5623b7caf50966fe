"""Bad checkpoints: nothing in a file runs, every refusal names the file and what was wrong, and
loading never writes next to the checkpoint.

Each bad file is refused twice: by ``model_loaders.load_expert`` (the Python entry point) and by the
``PoEExpertLoader`` node inside an in-process ComfyUI (the harness of ``tests/comfy``).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unite_and_conquer import model_loaders
from support.fuzz import tiny_state, write_tiny

LOADERS = Path(model_loaders.__file__).parent


class Payload:
    """Unpickling this object runs ``code``: what a malicious checkpoint does."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def malicious_pt(path: Path, marker: Path) -> Path:
    """A .pt whose pickle would create ``marker`` if it were unpickled with weights_only=False."""
    torch.save({"weight": torch.zeros(2, 2), "payload": Payload(f"open({str(marker)!r}, 'w').close()")}, path)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (ns)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


# --- in-process ComfyUI: the loader node ---------------------------------------------------------

@pytest.fixture(scope="module")
def node_loader(tmp_path_factory):
    """``load(path)``: run PoEExpertLoader on a file of a fresh folder registered under models/experts,
    both by calling the node class and through ComfyUI's validation and executor (the error text the
    UI shows). Returns the node's ValueError message."""
    import folder_paths

    from support.comfy_harness import PromptFailed, comfy_nodes, run_prompt
    from unite_and_conquer.nodes import loaders

    comfy_nodes()
    folder = tmp_path_factory.mktemp("experts_registered")
    folder_paths.add_model_folder_path("experts", str(folder))

    def load(path: Path) -> str:
        target = folder / path.name
        target.write_bytes(path.read_bytes())
        with pytest.raises(ValueError) as direct:
            loaders.PoEExpertLoader.execute(expert_name=path.name, family="auto", dtype="fp32", schedule="published")
        prompt = {
            "1": {"class_type": "PoEExpertLoader", "inputs": {"expert_name": path.name, "family": "auto",
                                                              "dtype": "fp32", "schedule": "published"}},
            "2": {"class_type": "PoEBindPrior", "inputs": {"expert": ["1", 0], "reliability": 1.0, "weight": 0.0}},
            "3": {"class_type": "PoEKSampler", "inputs": {"experts": ["2", 0], "seed": 0, "steps": 1,
                                                          "sampler_name": "euler", "scheduler": "karras",
                                                          "denoise": 1.0, "width": 0, "height": 0, "batch_size": 1}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        }
        with pytest.raises(PromptFailed) as graph:
            run_prompt(prompt)
        assert graph.value.kind == "execution"
        assert graph.value.detail["node_id"] == "1" and graph.value.detail["node_type"] == "PoEExpertLoader"
        assert graph.value.detail["exception_message"].strip() == str(direct.value)
        target.unlink()
        return str(direct.value)

    return load


# --- pickles that would run code ------------------------------------------------------------------

def test_the_payload_is_real(tmp_path):
    """Control: the test file really runs code when unpickled unsafely (so the refusals below mean something)."""
    marker = tmp_path / "control_marker"
    path = malicious_pt(tmp_path / "control.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_pickle_is_refused_by_load_expert(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious_pt(tmp_path / "evil.pt", marker)
    for family in ("auto", "tiny"):
        with pytest.raises(ValueError) as err:
            model_loaders.load_expert(str(path), family=family)
        assert str(err.value).startswith("evil.pt: refused to load. Only plain tensor checkpoints are read "
                                         "(torch.load with weights_only=True)")
        assert str(err.value).endswith("Convert it to .safetensors from a trusted source.")
    assert not marker.exists(), "the checkpoint's pickle payload ran"


def test_malicious_pickle_is_refused_by_the_loader_node(tmp_path, node_loader):
    marker = tmp_path / "pwned_node"
    message = node_loader(malicious_pt(tmp_path / "evil_node.pt", marker))
    assert message.startswith("PoEExpertLoader: input 'expert_name': evil_node.pt: refused to load. Only plain "
                              "tensor checkpoints are read")
    assert not marker.exists(), "the checkpoint's pickle payload ran inside ComfyUI"


def test_malicious_pickle_message_names_the_global_and_never_advises_unsafe_loading(tmp_path):
    path = malicious_pt(tmp_path / "evil.pt", tmp_path / "pwned")
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(path))
    message = str(err.value)
    assert "Unsupported global: GLOBAL exec" in message
    assert "\x1b" not in message and "weights_only` set to `False`" not in message


def test_pickled_non_tensor_objects_are_refused_without_running(tmp_path):
    """A pickle of a plain object (no payload) is refused too: only tensors and containers load."""
    path = tmp_path / "module.pt"
    torch.save({"net": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match=r"^module\.pt: refused to load\. Only plain tensor checkpoints are read"):
        model_loaders.load_expert(str(path))


# --- damaged safetensors ------------------------------------------------------------------------

def _valid_tiny(tmp_path: Path, name: str = "tiny_ok.safetensors") -> Path:
    return write_tiny(tmp_path / name, "class")


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    out = path.with_name("truncated.safetensors")
    out.write_bytes(data[: len(data) // 2])
    return out


def _corrupt_header(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"       # the JSON header starts at byte 8
    out = path.with_name("bad_header.safetensors")
    out.write_bytes(bytes(data))
    return out


def _huge_header_length(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    out = path.with_name("huge_header.safetensors")
    out.write_bytes(bytes(data))
    return out


def _empty(path: Path) -> Path:
    out = path.with_name("empty.safetensors")
    out.write_bytes(b"")
    return out


DAMAGE = {
    "truncated": (_truncate, "truncated.safetensors", "incomplete metadata, file not fully covered"),
    "corrupt header": (_corrupt_header, "bad_header.safetensors", "invalid JSON in header"),
    "huge header length": (_huge_header_length, "huge_header.safetensors", "header too large"),
    "empty": (_empty, "empty.safetensors", "header too small"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_safetensors_name_the_file_and_the_damage(tmp_path, damage, node_loader):
    make, name, what = DAMAGE[damage]
    path = make(_valid_tiny(tmp_path))
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(path))
    assert re.fullmatch(rf"{re.escape(name)}: not a readable safetensors file \(.*{re.escape(what)}.*\)",
                        str(err.value)), str(err.value)
    assert node_loader(path) == f"PoEExpertLoader: input 'expert_name': {err.value}"


def test_a_truncated_pt_is_refused_with_its_name(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"weight": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^cut\.pt: refused to load\. .*this file is corrupt or holds other Python "
                                         r"objects"):
        model_loaders.load_expert(str(path))


def test_a_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint not found: {re.escape(str(path))}$"):
        model_loaders.load_expert(str(path))


# --- the wrong family, missing and extra keys ----------------------------------------------------

def test_a_random_state_dict_matches_no_family(tmp_path, node_loader):
    path = tmp_path / "random.safetensors"
    save_file({"encoder.weight": torch.randn(4, 4), "encoder.bias": torch.randn(4)}, str(path))   # keys come back sorted
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(path))
    assert str(err.value).startswith("random.safetensors: no known expert family matches this file (2 tensors; "
                                     "first keys: encoder.bias, encoder.weight). Supported families: tiny")
    assert str(err.value).endswith("Pick the family by hand on the loader if you know it.")
    assert node_loader(path) == f"PoEExpertLoader: input 'expert_name': {err.value}"


def test_a_file_of_another_family_is_refused_when_the_family_is_forced(tmp_path):
    path = tmp_path / "random.pt"
    torch.save({"encoder.weight": torch.randn(4, 4)}, path)
    with pytest.raises(ValueError, match=r"^random\.pt: this file is not a 'tiny' checkpoint \(first keys: "
                                         r"encoder\.weight\)\. Try family 'auto'\.$"):
        model_loaders.load_expert(str(path), family="tiny")


def test_a_state_dict_holding_a_non_tensor_is_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(2), "step": 1000}, path)
    with pytest.raises(ValueError, match=r"^mixed\.pt: expected a state dict of tensors, found dict$"):
        model_loaders.load_expert(str(path))


def _drop_key(sd, meta):
    del sd["out.2.bias"]


def _extra_key(sd, meta):
    sd["unexpected_block.weight"] = torch.zeros(3)


def _wrong_shape(sd, meta):
    sd["conv_in.weight"] = torch.zeros(4, 3, 3, 3)


def _no_config(sd, meta):
    del meta["uac_config"]


TINY_DEFECTS = {
    "missing key": (_drop_key, r"missing \['out\.2\.bias'\]"),
    "extra key": (_extra_key, r"unexpected \['unexpected_block\.weight'\]"),
    "wrong shape": (_wrong_shape, r"conv_in\.weight.*\[4, 3, 3, 3\]"),
    "no config": (_no_config, r"uac_config"),
}


def _tiny_defect_message(tmp_path: Path, defect: str) -> tuple[Path, str]:
    path = write_tiny(tmp_path / f"tiny_{defect.replace(' ', '_')}.safetensors", "class", edit=TINY_DEFECTS[defect][0])
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(path))
    return path, str(err.value)


@pytest.mark.parametrize("defect", list(TINY_DEFECTS))
def test_tiny_checkpoint_defects_say_what_is_wrong(tmp_path, defect):
    _, message = _tiny_defect_message(tmp_path, defect)
    assert re.search(TINY_DEFECTS[defect][1], message), message


@pytest.mark.parametrize("defect", list(TINY_DEFECTS))
def test_tiny_checkpoint_defects_name_the_file(tmp_path, defect):
    path, message = _tiny_defect_message(tmp_path, defect)
    assert message.startswith(f"{path.name}: "), message


def test_an_intact_tiny_checkpoint_loads_exactly(tmp_path):
    """Control for the defects above: the unedited file loads, and its weights are the saved ones."""
    path = _valid_tiny(tmp_path)
    expert = model_loaders.load_expert(str(path))
    sd, _ = tiny_state("class")
    loaded = expert.network.state_dict()
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert expert.family == "tiny" and expert.info["path"] == str(path)


def _small_adm_state_dict() -> dict[str, torch.Tensor]:
    """A small class-conditional ADM (guided-diffusion's own UNet, published key names)."""
    from guided_diffusion.script_util import create_model

    torch.manual_seed(0)
    net = create_model(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
                       class_cond=True, attention_resolutions="16", num_head_channels=16,
                       use_scale_shift_norm=True, resblock_updown=True)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# What the weights cannot tell for a configuration outside guided-diffusion's published table.
ADM_META = {"resolution": "32", "attention_order": "legacy", "num_head_channels": "16", "schedule": "linear"}


@pytest.fixture
def adm_file(tmp_path):
    if importlib.util.find_spec("model_loaders.adm") is None:
        pytest.skip("model_loaders/adm.py does not exist yet: the ADM missing/extra-key checks need it")
    pytest.importorskip("guided_diffusion", reason="guided-diffusion-sdk builds the small ADM state dict")
    sd = _small_adm_state_dict()
    path = tmp_path / "small_adm.safetensors"
    save_file(sd, str(path), metadata=ADM_META)
    try:
        model_loaders.load_expert(str(path), family="adm")
    except ValueError as err:
        pytest.skip(f"model_loaders/adm.py does not load a small intact ADM ({err}); the key checks need one")
    return path, sd


def _adm_defect_message(tmp_path: Path, adm_file, defect: str) -> tuple[Path, str, str]:
    path, sd = adm_file
    sd = dict(sd)
    if defect == "missing key":
        key = "out.2.bias"
        del sd[key]
    else:
        key = "label_emb_extra.weight"
        sd[key] = torch.zeros(3)
    bad = tmp_path / f"adm_{defect.replace(' ', '_')}.safetensors"
    save_file(sd, str(bad), metadata=ADM_META)
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(bad), family="adm")
    return bad, key, str(err.value)


@pytest.mark.parametrize("defect", ["missing key", "extra key"])
def test_adm_checkpoint_defects_name_the_key(tmp_path, adm_file, defect):
    _, key, message = _adm_defect_message(tmp_path, adm_file, defect)
    kind = "Missing" if defect == "missing key" else "Unexpected"
    assert message.split(": ", 1)[1].startswith("ADM checkpoint does not match the inferred architecture (32px, "
                                                "32ch x (1, 2), 1 res blocks"), message
    assert message.endswith(f'{kind} key(s) in state_dict: "{key}".'), message


@pytest.mark.parametrize("defect", ["missing key", "extra key"])
def test_adm_checkpoint_defects_name_the_file(tmp_path, adm_file, defect):
    bad, _, message = _adm_defect_message(tmp_path, adm_file, defect)
    assert message.startswith(f"{bad.name}: "), message


# --- loading never writes next to the checkpoint --------------------------------------------------

def test_loading_never_writes_next_to_the_checkpoint(tmp_path):
    folder = tmp_path / "experts"
    folder.mkdir()
    good = _valid_tiny(folder, "good.safetensors")
    torch.save(_tiny_pt_state(), folder / "good_as_pt.pt")
    malicious_pt(folder / "evil.pt", tmp_path / "pwned")
    _truncate(good)
    (folder / "random.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    before = snapshot(folder)
    loaded = 0
    for name in sorted(before):
        try:
            model_loaders.load_expert(str(folder / name))
            loaded += 1
        except ValueError:
            pass
    assert loaded == 1                  # good.safetensors; the others are refused
    assert snapshot(folder) == before
    assert not (tmp_path / "pwned").exists()


def _tiny_pt_state() -> dict[str, torch.Tensor]:
    sd, _ = tiny_state("class")
    return sd
