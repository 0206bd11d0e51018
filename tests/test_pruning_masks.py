"""Masks on disk: round trip, model identity, re-application."""
import pytest
import torch

from efficientllava.pruning.apply import prune_model
from efficientllava.pruning.layers import get_linear, select_layers
from efficientllava.pruning.masks import (
    MaskMismatchError,
    apply_masks,
    load_masks,
    mask_metadata,
    model_identity,
    save_masks,
)
from efficientllava.pruning.toy_calibration import toy_model_and_batches
from test_pruning_layers import fake_model


def test_save_load_apply_round_trip(tmp_path):
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model))
    masks = prune_model(model, {n: 0.5 for n in names}, "wanda", batches)
    path = save_masks(tmp_path / "masks.safetensors", masks, model, metadata={"method": "wanda"})
    fresh, _, _ = toy_model_and_batches()
    loaded = load_masks(path, fresh)
    assert all(torch.equal(loaded[n], masks[n]) for n in names)
    assert mask_metadata(path) == {"method": "wanda"}
    apply_masks(fresh, loaded)  # magnitude and Wanda change no kept weight: masks alone reproduce them
    for name in names:
        assert torch.equal(get_linear(fresh, name).weight, get_linear(model, name).weight)


def test_masks_for_another_model_raise(tmp_path):
    model, _, _ = toy_model_and_batches()
    name = "model.language_model.layers.0.mlp.up_proj"
    path = save_masks(tmp_path / "m.safetensors", {name: torch.ones(352, 128, dtype=torch.bool)}, model)
    wider = fake_model({name: (704, 128)}, device="cpu")
    with pytest.raises(MaskMismatchError, match=r"layer 'model.language_model.layers.0.mlp.up_proj' with shape "
                                                r"\[352, 128\]; this model's layer is \[704, 128\]"):
        load_masks(path, wider)
    other = fake_model({"model.language_model.layers.0.mlp.down_proj": (128, 352)}, device="cpu")
    with pytest.raises(MaskMismatchError, match="'model.language_model.layers.0.mlp.up_proj', which this model "
                                                "does not have"):
        load_masks(path, other)
    with pytest.raises(MaskMismatchError, match="this model's layer is"):
        apply_masks(model, {name: torch.ones(128, 352, dtype=torch.bool)})
    with pytest.raises(MaskMismatchError, match="which this model does not have"):
        save_masks(tmp_path / "x.safetensors", {"lm_head": torch.ones(2, 2, dtype=torch.bool)}, model)


def test_not_a_mask_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(MaskMismatchError, match="is not a mask file"):
        load_masks(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_masks(tmp_path / "missing.safetensors")


def test_model_identity():
    model, _, _ = toy_model_and_batches()
    identity = model_identity(model)
    assert identity["model.language_model.layers.3.mlp.down_proj"] == [128, 352]
    assert len(identity) == 48
