"""experiments/wanda_by_role.py: one role pruned by one operator, the rest by the other."""
import pytest
import torch

from efficientllava.pruning import find_layers, get_linear, prune_model, select_layers
from efficientllava.pruning.operators import magnitude
from efficientllava.pruning.toy_calibration import toy_model_and_batches
from experiment_scripts import load_experiment

by_role = load_experiment("wanda_by_role")


def zero_masks(model, names):
    return {name: get_linear(model, name).weight.detach() != 0 for name in names}


def test_the_role_gets_wandas_masks_and_the_rest_magnitudes():
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model))
    roles = {name: find_layers(model)[name].role for name in names}
    assert by_role.layer_roles(model, names) == roles
    assert list(dict.fromkeys(roles.values())) == ["q", "k", "v", "o", "gate", "up", "down"]
    original = {name: get_linear(model, name).weight.detach().clone() for name in names}
    alone, _, _ = toy_model_and_batches()
    queries = [name for name in names if roles[name] == "q"]
    prune_model(alone, {name: 0.5 for name in queries}, "wanda", batches)  # what the first of the two prunes does

    by_role.prune_split(model, names, "q", "wanda", 0.5, batches, roles)
    kept = zero_masks(model, names)
    for name in names:
        if name in queries:
            assert torch.equal(kept[name], zero_masks(alone, [name])[name])
        else:  # magnitude's mask depends on the weights alone
            assert torch.equal(kept[name], magnitude(original[name], 0.5)[1])
    # Wanda moved at least one query layer's mask away from magnitude's (so the check above could tell them apart)
    assert any(not torch.equal(kept[name], magnitude(original[name], 0.5)[1]) for name in queries)


def test_one_operator_everywhere_when_no_role_is_named():
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model))
    original = {name: get_linear(model, name).weight.detach().clone() for name in names}
    by_role.prune_split(model, names, None, "magnitude", 0.5, batches, {})
    kept = zero_masks(model, names)
    assert all(torch.equal(kept[name], magnitude(original[name], 0.5)[1]) for name in names)


def test_bad_input_is_named():
    model, _, batches = toy_model_and_batches()
    names = list(select_layers(model))
    roles = {name: find_layers(model)[name].role for name in names}
    with pytest.raises(ValueError, match="no selected layer has role 'fc1'"):
        by_role.prune_split(model, names, "fc1", "wanda", 0.5, batches, roles)
    with pytest.raises(ValueError, match="operator 'sparsegpt'"):
        by_role.prune_split(model, names, "q", "sparsegpt", 0.5, batches, roles)
    with pytest.raises(SystemExit, match="--ratio is 1.0; expected a sparsity in"):
        by_role.main(["--ratio", "1.0"])
    with pytest.raises(SystemExit, match="--n-calib is 0"):
        by_role.main(["--n-calib", "0"])
