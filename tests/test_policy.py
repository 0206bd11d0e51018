"""Policies: repair lands on the budget, sparsity is parameter-weighted, JSON round trip, mismatch errors."""
import json

import numpy as np
import pytest

from efficientllava.policy import (
    BudgetError,
    ModelIdentity,
    Policy,
    PolicyMismatchError,
    SearchSpace,
    build_groups,
)
from efficientllava.pruning.layers import select_layers
from efficientllava.toy_model import ToyArchitecture, build_toy_llava

CHOICES = [round(0.05 * i, 2) for i in range(19)]


@pytest.fixture(scope="module")
def toy():
    model, _ = build_toy_llava(seed=0)
    return model


@pytest.fixture(scope="module")
def layers(toy):
    return select_layers(toy)


def test_groups_cover_every_layer_once(layers):
    blocks = ToyArchitecture().layers
    for granularity, count in (("linear", 7 * blocks), ("block", blocks), ("role", 7)):
        groups = build_groups(layers, granularity)
        assert len(groups) == count
        names = [n for g in groups for n in g.layers]
        assert sorted(names) == sorted(layers)
        assert sum(g.params for g in groups) == sum(i.params for i in layers.values())


def test_sparsity_is_parameter_weighted(layers):
    space = SearchSpace(layers, CHOICES, "role", 0.5)
    genome = [0] * space.n_groups
    mlp = [i for i, g in enumerate(space.groups) if g.name.endswith(("gate", "up", "down"))]
    for i in mlp:
        genome[i] = CHOICES.index(0.8)
    expected = 0.8 * sum(space.groups[i].params for i in mlp) / space.total
    assert space.sparsity(genome) == pytest.approx(expected)
    ratios = space.ratios(genome)
    assert ratios["model.language_model.layers.2.mlp.up_proj"] == 0.8
    assert ratios["model.language_model.layers.2.self_attn.q_proj"] == 0.0


@pytest.mark.parametrize("granularity", ["linear", "block", "role"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_repair_lands_on_budget_deterministically(layers, granularity, target):
    space = SearchSpace(layers, CHOICES, granularity, target, tolerance=0.005)
    rng = np.random.default_rng(0)
    for _ in range(25):
        genome = [int(i) for i in rng.integers(space.n_choices, size=space.n_groups)]
        repaired = space.repair(genome)
        assert abs(space.sparsity(repaired) - target) <= 0.005 + 1e-12
        assert repaired == space.repair(genome)  # deterministic
        assert space.repair(repaired) == repaired  # on budget: unchanged


def test_repair_moves_the_most_extreme_groups(layers):
    space = SearchSpace(layers, CHOICES, "block", 0.5, tolerance=0.005)
    genome = [CHOICES.index(0.9), CHOICES.index(0.5), CHOICES.index(0.5), CHOICES.index(0.5)]
    repaired = space.repair(genome)
    assert repaired[0] < genome[0]  # the sparsest block gave up sparsity, not the others
    assert repaired[1:] == genome[1:]


@pytest.mark.parametrize("target, match", [(0.95, "above the largest"), (0.02, "below the smallest")])
def test_infeasible_budget_is_named(layers, target, match):
    with pytest.raises(BudgetError, match=match):
        SearchSpace(layers, [0.1, 0.5, 0.9], "linear", target)


def test_unreachable_tolerance_is_named(layers):
    with pytest.raises(BudgetError, match="cannot be met within tolerance"):
        SearchSpace(layers, [0.0, 0.9], "block", 0.5, tolerance=0.001)


def test_policy_json_round_trip(tmp_path, toy, layers):
    space = SearchSpace(layers, [*CHOICES, "2:4"], "linear", 0.5)
    genome = space.uniform()
    genome[0] = space.choices.index("2:4")
    identity = ModelIdentity.of(toy, "toy")
    policy = space.policy(genome, identity, {"method": "sparsegpt", "sequential": True}, fitness=0.5)
    path = policy.save(tmp_path / "policy.json")
    loaded = Policy.load(path, toy)
    assert loaded.ratios == policy.ratios
    assert loaded.ratios["model.language_model.layers.0.self_attn.q_proj"] == "2:4"
    assert loaded.model.hash == identity.hash
    assert loaded.sparsity() == pytest.approx(policy.sparsity())
    assert loaded.search["genome"] == genome and loaded.pruner["method"] == "sparsegpt"
    data = json.loads(path.read_text())
    assert data["format"] == "efficientllava.policy/1" and data["budget"]["target_sparsity"] == 0.5
    assert space.from_ratios(loaded.ratios) == genome


def test_policy_for_another_model_names_the_mismatch(tmp_path, toy, layers):
    space = SearchSpace(layers, CHOICES, "linear", 0.5)
    path = space.policy(space.uniform(), ModelIdentity.of(toy, "toy-a")).save(tmp_path / "p.json")
    arch = ToyArchitecture()
    wider, _ = build_toy_llava(ToyArchitecture(intermediate=2 * arch.intermediate))
    shapes = rf"\[{arch.intermediate}, {arch.hidden}\].*\[{2 * arch.intermediate}, {arch.hidden}\]"
    with pytest.raises(PolicyMismatchError, match=rf"mlp.gate_proj' has shape {shapes}"):
        Policy.load(path, wider)
    shallower, _ = build_toy_llava(ToyArchitecture(layers=arch.layers - 1))
    with pytest.raises(PolicyMismatchError, match=f"layers.{arch.layers - 1}.self_attn.q_proj"):
        Policy.load(path, shallower)


def test_bad_policy_files(tmp_path, toy):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PolicyMismatchError, match="not a policy file"):
        Policy.load(path)
    identity = ModelIdentity.of(toy, "toy")
    with pytest.raises(PolicyMismatchError, match="ratios must be in"):
        Policy(identity, {"model.language_model.layers.0.mlp.up_proj": 1.2})
    with pytest.raises(PolicyMismatchError, match="not a prunable layer"):
        Policy(identity, {"model.language_model.layers.0.mlp.nope": 0.5})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Policy.load(tmp_path / "missing.json")


def test_flops_follow_sparsity(toy, layers):
    space = SearchSpace(layers, CHOICES, "linear", 0.5)
    policy = space.policy(space.uniform(), ModelIdentity.of(toy))
    flops = policy.flops_per_token()
    assert flops["kept"] == pytest.approx(flops["dense"] * (1 - policy.sparsity()))
