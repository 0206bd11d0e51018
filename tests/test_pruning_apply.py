"""prune_model: policy checks before any change, roll-back on failure, masks, modes, and save_pretrained."""
import pytest
import torch

import efficientllava.pruning.apply as apply_module
from efficientllava.pruning.apply import PolicyError, check_policy, prune_model, pruner_options, sparsity
from efficientllava.pruning.calibration import model_inputs
from efficientllava.pruning.layers import get_linear, select_layers
from efficientllava.pruning.toy_calibration import toy_model_and_batches

UP = "model.language_model.layers.0.mlp.up_proj"


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_prune_model_modes(method, sequential):
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model))
    policy = {name: (0.5 if i % 3 else "2:4") for i, name in enumerate(names)}
    policy[names[1]] = 0.0
    masks = prune_model(model, policy, method, batches, sequential=sequential)
    assert list(masks) == names
    for name in names:
        weight = get_linear(model, name).weight
        assert torch.equal(masks[name], weight != 0)
    assert masks[names[1]].all()
    assert sparsity(model, [names[0]]) == 0.5


def test_vision_tower_and_projector_can_be_pruned():
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model, components=["vision_tower", "projector", "language_model"]))
    prune_model(model, {n: 0.3 for n in names}, "sparsegpt", batches)
    for name in names:
        layer = get_linear(model, name)
        assert ((layer.weight == 0).sum(1) == round(0.3 * layer.in_features)).all()


@pytest.mark.parametrize("policy, message", [
    ({UP: 0.5, "model.language_model.layers.9.mlp.up_proj": 0.5},
     "'model.language_model.layers.9.mlp.up_proj', which does not exist.*did you mean"),
    ({UP: 0.5, "lm_head": 0.5}, "'lm_head', which is not prunable"),
    ({UP: 0.5, "model.language_model.layers.3.mlp.down_proj": 1.2},
     r"layer 'model.language_model.layers.3.mlp.down_proj' asks for sparsity 1.2; ratios must be in \[0, 1\)"),
    ({UP: -0.1}, r"asks for sparsity -0.1; ratios must be in \[0, 1\)"),
    ({UP: "3:7"}, "'model.language_model.layers.0.mlp.up_proj' has 128 input features, not a multiple of M=7"),
    ([0.5], "policy is a list; expected a mapping"),
])
def test_bad_policy_raises_before_touching(policy, message):
    model, _, batches = toy_model_and_batches()
    before = weights(model)
    with pytest.raises(PolicyError, match=message):
        prune_model(model, policy, "wanda", batches)
    assert same_weights(model, before)


def test_bad_method_and_missing_calibration():
    model, _, _ = toy_model_and_batches()
    with pytest.raises(ValueError, match="pruning method 'obc' is unknown"):
        prune_model(model, {UP: 0.5}, "obc")
    with pytest.raises(ValueError, match="calibration set is empty"):
        prune_model(model, {UP: 0.5}, "wanda", batches=None)
    prune_model(model, {UP: 0.5}, "magnitude")  # magnitude needs no calibration


def test_failure_midway_restores_dense_weights(monkeypatch):
    model, _, batches = toy_model_and_batches()
    before = weights(model)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # block 1: the layers of block 0 are pruned by then
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    real = apply_module.prune_weight
    monkeypatch.setattr(apply_module, "prune_weight", failing)
    with pytest.raises(RuntimeError, match="simulated") as info:
        prune_model(model, {n: 0.5 for n in select_layers(model)}, "sparsegpt", batches)
    assert "9 layer(s) had been pruned; their dense weights were restored" in "".join(info.value.__notes__)
    assert same_weights(model, before)

    calls.clear()
    with pytest.raises(RuntimeError) as info:
        prune_model(model, {n: 0.5 for n in select_layers(model)}, "sparsegpt", batches, backup=False)
    assert "HALF-PRUNED" in "".join(info.value.__notes__)
    assert not same_weights(model, before)


def test_check_policy_returns_targets():
    model, _, _ = toy_model_and_batches()
    targets = check_policy(model, {UP: "2:4", "model.language_model.layers.1.mlp.up_proj": 0.25})
    assert [str(t) for t in targets.values()] == ["2:4", "0.25"]


def test_pruner_configs_compose():
    from pathlib import Path

    from omegaconf import OmegaConf

    for path in sorted(Path(__file__).resolve().parents[1].joinpath("conf", "pruner").glob("*.yaml")):
        options = pruner_options(OmegaConf.load(path))
        assert options["method"] == path.stem


def test_save_pretrained_round_trip(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, _, batches = toy_model_and_batches()
    masks = prune_model(model, {n: 0.6 for n in select_layers(model)}, "sparsegpt", batches)
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name, mask in masks.items():
        assert torch.equal(get_linear(loaded, name).weight, get_linear(model, name).weight)
        assert torch.equal(get_linear(loaded, name).weight != 0, mask)
    with torch.no_grad():
        for batch in batches:
            inputs = model_inputs(batch, "cpu")
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)
