"""Baselines: uniform, OWL, ECoFLaP and random search each give genomes on the budget, by their own rules."""
import pytest
import torch

from efficientllava.policy import SearchSpace
from efficientllava.pruning import get_linear, select_layers
from efficientllava.pruning.toy_calibration import toy_model_and_batches
from efficientllava.search import baselines
from efficientllava.data.collate import Collator
from efficientllava.pruning.toy_calibration import toy_records
from efficientllava.toy_model import ToyArchitecture, build_toy_llava

CHOICES = [round(0.05 * i, 2) for i in range(19)]


@pytest.fixture(scope="module")
def setup():
    model, processor, batches = toy_model_and_batches()
    space = SearchSpace(select_layers(model), CHOICES, "linear", 0.5)
    records = toy_records(8, "val")
    loss_batches = [Collator(processor).answers(records, ["letter"] * len(records))]
    return model, space, batches, loss_batches


def test_uniform_is_every_layer_at_the_target(setup):
    _, space, _, _ = setup
    (genome,) = baselines.uniform_genomes(space)
    assert set(space.ratios(genome).values()) == {0.5}


def test_random_search_meets_the_budget_and_is_seeded(setup):
    _, space, _, _ = setup
    genomes = baselines.random_genomes(space, 6, seed=0)
    assert len({space.key(g) for g in genomes}) == 6
    assert all(space.on_budget(g) for g in genomes)
    assert genomes == baselines.random_genomes(space, 6, seed=0)


def test_owl_prunes_blocks_with_more_outliers_less(setup):
    model, space, batches, _ = setup
    block = baselines.block_space(space)
    (genome,), info = baselines.owl_genomes(model, block, batches, M=5, lam=0.08)
    assert block.on_budget(genome)
    outliers, sparsity = info["outlier_ratio"], info["block_sparsity"]
    order = sorted(outliers, key=outliers.get)
    assert [sparsity[k] for k in order] == sorted((sparsity[k] for k in order), reverse=True)
    assert max(sparsity.values()) - min(sparsity.values()) == pytest.approx(0.16)
    mean = sum(sparsity[g.name] * w for g, w in zip(block.groups, block.weights))
    assert mean == pytest.approx(0.5)


def test_ecoflap_scores_restore_weights_and_allocation_respects_floor(setup):
    model, space, _, loss_batches = setup
    block = baselines.block_space(space)
    before = {n: get_linear(model, n).weight.detach().clone() for n in space.layers}
    (genome,), info = baselines.ecoflap_genomes(model, block, loss_batches, eps=1e-3, directions=2)
    assert all(torch.equal(get_linear(model, n).weight, w) for n, w in before.items())
    assert block.on_budget(genome)
    assert all(v >= 0 for v in info["block_scores"].values())
    sparsity = info["block_sparsity"]
    assert max(sparsity.values()) <= 0.6 + 1e-9  # keep-floor: at most target + 0.1
    mean = sum(sparsity[g.name] * w for g, w in zip(block.groups, block.weights))
    assert mean == pytest.approx(0.5)


def test_ecoflap_allocation_follows_scores_with_caps():
    model, _ = build_toy_llava(ToyArchitecture(layers=4))
    block = SearchSpace(select_layers(model), CHOICES, "block", 0.5)
    names = [g.name for g in block.groups]
    scores = {names[0]: 100.0, names[1]: 1.0, names[2]: 1.0, names[3]: 0.0}
    sparsity = baselines.ecoflap_sparsities(block, scores, s_max_offset=0.1)
    assert sparsity[names[0]] == pytest.approx(1 - (0.4 + 0.4 * 100 / 102))  # floor + share of the rest
    assert sparsity[names[3]] == pytest.approx(0.6)  # no score: the floor only
    sparsity = baselines.ecoflap_sparsities(block, scores, s_max_offset=0.4)
    assert sparsity[names[0]] == pytest.approx(0.0)  # capped at the densest choice, overflow redistributed
    assert sparsity[names[3]] == pytest.approx(0.9)
    assert sparsity[names[1]] == pytest.approx(sparsity[names[2]]) == pytest.approx(0.55)
    assert sum(sparsity.values()) / 4 == pytest.approx(0.5)
