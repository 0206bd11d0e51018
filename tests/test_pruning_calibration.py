"""Calibration statistics: what the hooks record, padding, bad inputs, and the quality ordering they lead to."""
import pytest
import torch

from efficientllava.pruning.calibration import CalibrationError, calibrate, calibrated_blocks, model_inputs
from efficientllava.pruning.layers import get_linear, select_layers
from efficientllava.pruning.operators import prune_weight
from efficientllava.pruning.toy_calibration import toy_model_and_batches

LAYER = "model.language_model.layers.1.mlp.down_proj"


def direct_inputs(model, batches, name):
    """The layer's inputs at the real (non-padding) positions, from plain whole-model forwards."""
    seen = []
    handle = get_linear(model, name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    rows = []
    with torch.no_grad():
        for batch in batches:
            model(**model_inputs(batch, "cpu"))
            rows.append(seen.pop()[batch["attention_mask"].bool()])
    handle.remove()
    return torch.cat(rows)


def test_statistics_match_their_definition():
    model, _, batches = toy_model_and_batches()
    assert any((b["attention_mask"] == 0).any() for b in batches)  # the batches do hold padding
    X = direct_inputs(model, batches, LAYER)
    stats = calibrate(model, batches, [LAYER, "model.vision_tower.encoder.layers.0.mlp.fc1"])[LAYER]
    assert stats.tokens == X.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
    torch.testing.assert_close(stats.sq_norms, X.pow(2).sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.hessian, X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.column_norms, X.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_vision_statistics_count_every_patch():
    model, _, batches = toy_model_and_batches()
    name = "model.multi_modal_projector.linear_1"
    stats = calibrate(model, batches, [name])[name]
    images = sum(b["pixel_values"].shape[0] for b in batches)
    assert stats.tokens == images * 16  # 4x4 patches per image ('default' strategy drops the CLS token)


def test_offload_gives_the_same_statistics():
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model, include=["*.layers.2.*"]))
    on_device = calibrate(model, batches, names)
    groups = calibrated_blocks(model, batches, names, sequential=False, offload=True)
    offloaded = {k: v for _, stats in groups for k, v in stats.items()}
    for name in names:
        torch.testing.assert_close(on_device[name].hessian, offloaded[name].hessian)


def test_sequential_sees_pruned_blocks_one_shot_does_not():
    model, _, batches = toy_model_and_batches()
    names = [LAYER, "model.language_model.layers.0.mlp.down_proj"]
    dense = calibrate(model, batches, names)
    for sequential in (True, False):
        seen = {}
        for group, stats in calibrated_blocks(model, batches, names, sequential=sequential):
            seen.update(stats)
            for name in group:  # prune hard so that the difference shows
                layer = get_linear(model, name)
                layer.weight.data.copy_(prune_weight("magnitude", layer.weight, 0.9)[0])
        block1_changed = not torch.allclose(seen[LAYER].hessian, dense[LAYER].hessian)
        assert block1_changed == sequential
        model, _, _ = toy_model_and_batches()


def test_empty_calibration_set_raises():
    model, _, _ = toy_model_and_batches()
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        calibrate(model, [], [LAYER])
    with pytest.raises(CalibrationError, match="calibration batch 0 is .*expected a dict with 'input_ids'"):
        calibrate(model, [torch.zeros(3)], [LAYER])


def test_all_padding_raises_naming_the_layer():
    model, _, batches = toy_model_and_batches()
    batch = dict(batches[0], attention_mask=torch.zeros_like(batches[0]["attention_mask"]))
    name = "model.language_model.layers.0.self_attn.q_proj"
    with pytest.raises(CalibrationError, match=f"layer '{name}' saw no calibration tokens"):
        calibrate(model, [batch], [name])


def test_non_finite_activations_raise_naming_the_layer():
    model, _, batches = toy_model_and_batches()
    get_linear(model, "model.language_model.layers.0.mlp.down_proj").weight.data[0, 0] = float("inf")
    name = "model.language_model.layers.1.self_attn.q_proj"
    with pytest.raises(CalibrationError, match=f"inputs of layer '{name}' hold NaN or inf"):
        calibrate(model, batches, [name])


def test_unknown_layer_raises():
    model, _, batches = toy_model_and_batches()
    with pytest.raises(KeyError, match="lm_head"):
        calibrate(model, batches, ["lm_head"])


@pytest.mark.parametrize("target", [0.5, "2:4"])
def test_reconstruction_error_sparsegpt_wanda_magnitude(target):
    """||W X - W' X||^2 over the real calibration inputs of every decoder layer: SparseGPT <= Wanda <= magnitude."""
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model))
    stats = calibrate(model, batches, names)
    for name in names:
        W = get_linear(model, name).weight.detach()
        X = direct_inputs(model, batches, name) if name == LAYER else None
        errors = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            D = W - prune_weight(method, W, target, stats[name])[0]
            errors[method] = float(torch.trace(D @ stats[name].hessian @ D.T)) * stats[name].tokens
            if X is not None:  # the Hessian form is the squared error on the inputs themselves
                assert errors[method] == pytest.approx(float((X @ D.T).pow(2).sum()), rel=1e-3)
        assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"], (name, errors)
