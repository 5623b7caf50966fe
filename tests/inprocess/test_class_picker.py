"""PoEBindClass's picker: the labels the route offers are the loaded expert's own, read without its weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.checkpoints import small_adm
from support.fuzz import write_tiny
from unite_and_conquer.model_loaders import labels as labels_lib
from unite_and_conquer.model_loaders import load_expert
from unite_and_conquer.nodes import bindings, class_picker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("class_picker")
    return {
        "tiny_class": REPO / "models_tiny" / "tiny_class.safetensors",
        "tiny_colour": REPO / "models_tiny" / "tiny_colour.safetensors",
        "small_tiny_class": write_tiny(d / "small_class.safetensors", "class"),
        "adm_imagenet": small_adm(d / "adm_1000.safetensors"),
        "adm_10": small_adm(d / "adm_10.safetensors", num_classes=10),
        "adm_uncond": small_adm(d / "adm_uncond.safetensors", num_classes=None),
    }


@pytest.mark.parametrize("name", ["tiny_class", "tiny_colour", "small_tiny_class", "adm_imagenet", "adm_10",
                                  "adm_uncond"])
def test_labels_without_weights_equal_the_loaded_experts(files, name):
    path = str(files[name])
    expert = load_expert(path)
    assert labels_lib.class_names(path) == (list(expert.class_names) if "class" in expert.encoders else [])
    assert class_picker.labels(labels_lib.class_names(path)) == class_picker.expert_labels(expert)


def test_label_format(files):
    assert class_picker.labels(labels_lib.class_names(str(files["tiny_class"]))) == [str(k) for k in range(10)]
    imagenet = class_picker.labels(labels_lib.class_names(str(files["adm_imagenet"])))
    assert len(imagenet) == 1000 and imagenet[292] == "292: tiger" and imagenet[7] == "7: cock"
    assert class_picker.labels(labels_lib.class_names(str(files["adm_10"]))) == [str(k) for k in range(10)]
    # The picker before an expert is connected: the ImageNet list, the paper's class expert.
    assert bindings.imagenet_choices() == imagenet


def test_labels_read_only_the_header(files, monkeypatch):
    """No tensor data is read for a safetensors file: the builder runs on the meta device."""
    import safetensors.torch

    def refuse(*a, **k):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    assert len(labels_lib.class_names(str(files["adm_imagenet"]))) == 1000


def test_the_family_can_be_given_and_a_wrong_one_is_refused(files):
    assert labels_lib.class_names(str(files["adm_10"]), "adm") == [str(k) for k in range(10)]
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        labels_lib.class_names(str(files["adm_10"]), "nope")


def test_ranges_are_checked_when_comfys_own_check_is_off():
    schema = bindings.PoEBindClass.define_schema()
    ok = {"class": "7", "class_index": -1, "weight": 4.0, "reliability": 1.0, "null_k": 8}
    assert bindings.PoEBindClass.validate_inputs(**ok) is True
    assert bindings.PoEBindClass.validate_inputs(**dict(ok, weight=101.0)) == \
        "PoEBindClass: input 'weight' is 101.0, above its maximum 100.0"
    assert class_picker.check_ranges(schema, dict(ok, null_k=0)) == \
        "PoEBindClass: input 'null_k' is 0, below its minimum 1"
