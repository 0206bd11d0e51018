"""The joint policy space: gene layout, latency repair onto the budget, policies with structure and tokens, errors."""
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from efficientllava.policy import BudgetError, ModelIdentity, Policy, PolicyMismatchError, SearchSpace
from efficientllava.pruning.layers import select_layers
from efficientllava.pruning.structured import StructureError, decoder_geometry
from efficientllava.search.acceleration import read_acceleration
from efficientllava.search.settings import SettingsError
from efficientllava.search.space import JointSpace, StructureChoices, TokenChoices
from efficientllava.token_pruning import TokenPruningError
from efficientllava.toy_model import build_toy_llava
from test_latency import synthetic_table

MLP = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]


@pytest.fixture(scope="module")
def toy():
    return build_toy_llava(seed=0)[0]


def joint(toy, speedup: float | None = 1.5, attn=(0.0, 0.5)) -> JointSpace:
    weights = SearchSpace(select_layers(toy), [0.0, 0.25, 0.5, 0.75], "block", 0.5)
    structure = StructureChoices(decoder_geometry(toy), MLP, list(attn))
    tokens = TokenChoices(4, [1, 2, 3], [0.25, 0.5, 0.75])
    table = synthetic_table()
    space = JointSpace(weights, structure, tokens)
    space.set_latency(table, table.dense / speedup if speedup else None)
    return space


def test_gene_layout_orders_choices_from_least_to_most_pruning(toy):
    space = joint(toy)
    assert space.gene_names[:4] == [g.name for g in space.unstructured.groups]
    assert space.gene_names[4] == "mlp:model.language_model.layers.0" and space.gene_names[-2:] == [
        "tokens.layer", "tokens.keep"]
    assert space.gene_sizes == [4] * 4 + [7] * 4 + [2] * 4 + [3, 4]
    assert space.tokens.layers == [3, 2, 1] and space.tokens.keeps == [1.0, 0.75, 0.5, 0.25]


def test_repair_meets_the_latency_budget_and_keeps_the_sparsity_band(toy):
    space = joint(toy, speedup=1.5)
    rng = np.random.default_rng(0)
    for genome in [space.uniform(), *[space.random(rng) for _ in range(20)]]:
        assert space.predicted_speedup(genome) >= 1.5 - 1e-9
        assert abs(space.sparsity(genome) - 0.5) <= 0.005 + 1e-12
    uniform = space.uniform()
    assert space.predicted_speedup(uniform) < 1.5 + 0.2  # repair stops once on budget
    free = space.repair([2] * 4 + [0] * 10)  # already fast enough without a latency limit: unchanged
    assert joint(toy, speedup=None).repair(free) == free


def test_speed_key_names_the_structure_and_token_genes_only(toy):
    space = joint(toy, speedup=None)
    genome = [1, 2, 2, 3] + [1, 0, 2, 0] + [0, 1, 0, 0] + [1, 2]
    weights_moved = [2, 1, 3, 2] + genome[4:]
    assert space.speed_key(weights_moved) == space.speed_key(genome) != space.speed_key([1, 2, 2, 3] + [1, 0, 2, 1]
                                                                                        + genome[8:])
    assert space.key(weights_moved) != space.key(genome)
    assert space.speed_key(genome) == "1.0.2.0.0.1.0.0.1.2"


def test_token_layer_means_nothing_without_dropped_tokens(toy):
    space = joint(toy, speedup=None)
    genome = [2] * 4 + [0] * 8 + [2, 0]  # K index 2 but keep 1.0
    assert space.repair(genome)[-2:] == [0, 0] and space.token_setting(space.repair(genome)) is None
    genome[-1] = 3
    assert space.token_setting(genome) == {"layer": 1, "keep": 0.25}


def test_an_unreachable_speedup_is_refused_naming_the_best_reachable(toy):
    with pytest.raises(BudgetError, match=r"speedup >= 9.00x\) cannot be met: the most pruned policy .* \(\d\.\d\dx\)"):
        joint(toy, speedup=9.0)


def test_policy_with_structure_and_tokens_round_trips(toy, tmp_path):
    space = joint(toy, speedup=1.5)
    genome = space.random(np.random.default_rng(3))
    identity = ModelIdentity.of(toy, "toy")
    policy = space.policy(genome, identity, {"method": "sparsegpt"})
    path = policy.save(tmp_path / "p.json")
    loaded = Policy.load(path, toy)
    assert loaded.structure == space.structure_ratios(genome) and loaded.tokens == (space.token_setting(genome) or {})
    assert space.from_policy(loaded) == genome
    assert loaded.budget["min_speedup"] == pytest.approx(1.5)


@pytest.mark.parametrize("structure, tokens, match", [
    ({"model.language_model.layers.0": {"mlp": 1.2}}, {}, r"mlp ratio 1.2; expected a ratio in \[0, 1\]"),
    ({"model.language_model.layers.0": {"attn": 1.0}}, {}, r"attn ratio 1.0; expected a ratio in \[0, 1\)"),
    ({"model.language_model.layers.7": {"mlp": 0.5}}, {}, "not a decoder block"),
    ({}, {"layer": 5, "keep": 0.5}, r"K=5, but the language model has 4 decoder layers"),
    ({}, {"layer": 1, "keep": 0.0}, r"keep ratio R is 0.0, outside \(0, 1\]"),
])
def test_bad_structure_or_tokens_in_a_policy_are_refused(toy, structure, tokens, match):
    with pytest.raises(PolicyMismatchError, match=match):
        Policy(ModelIdentity.of(toy, "toy"), {}, structure=structure, tokens=tokens)


def test_choices_that_break_gqa_or_exceed_the_layers_are_refused(toy):
    with pytest.raises(StructureError, match="groups of 2 sharing one KV head"):
        StructureChoices(decoder_geometry(toy), MLP, [0.0, 0.25])
    with pytest.raises(TokenPruningError, match=r"K=4, but the language model has 4 decoder layers"):
        TokenChoices(4, [1, 4], [0.5])
    with pytest.raises(StructureError, match=r"structure.mlp_choices holds 1.5; expected ratios in \[0, 1\]"):
        StructureChoices(decoder_geometry(toy), [0.0, 1.5], [0.0])
    with pytest.raises(StructureError, match=r"structure.attn_choices holds 1.0; expected ratios in \[0, 1\)"):
        StructureChoices(decoder_geometry(toy), [0.0], [0.0, 1.0])
    whole = StructureChoices(decoder_geometry(toy), [0.0, 1.0], [0.0])  # 1.0: a block's whole MLP removed
    assert {tuple(c) for c in whole.channels.values()} == {(352, 0)}


def compose_search(overrides):
    from pathlib import Path

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("search", overrides=list(overrides))


def test_the_default_search_has_structure_tokens_and_a_latency_budget():
    s = read_acceleration(compose_search([]).search)
    assert s.structure and s.tokens and s.min_speedup == 1.5
    assert not read_acceleration(compose_search(["search=uniform"]).search).enabled


@pytest.mark.parametrize("overrides, match", [
    (["search.tokens.keep=[0.5,1.5]"], None),  # refused when the space is built (tested in the search tests)
    (["search.latency.min_speedup=0.5"], r"min_speedup is 0.5; expected a speedup >= 1"),
    (["search.latency.max_prefill_ms=-3"], r"max_prefill_ms is -3; expected a positive number"),
    (["search.latency.repeats=0"], r"repeats is 0; expected an integer >= 1"),
    (["search.structure.importance=random"], r"importance is 'random'; expected one of \['flap', 'wanda'\]"),
    (["search.structure.channel_multiple=0"], "channel_multiple is 0"),
    (["search.tokens.layers=[1.5]"], r"tokens.layers|layers holds 1.5; expected integers"),
    (["search=uniform", "search.latency.min_speedup=2"], "sets a latency budget, but search.structure.enabled"),
    (["search.shared=true"], "search.shared is true but search.latency.table is null"),
    (["search.structure.mlp_choices=[0.0,0.5,1.0]"], r"holds 1.0 .* with search.eta=0.01: .* expected search.eta=0"),
    (["search.structure.mlp_choices=[0.0,0.5,1.0]", "search.eta=0"], None),
])
def test_bad_acceleration_settings_name_the_key(overrides, match):
    cfg = compose_search(overrides).search
    if match is None:
        read_acceleration(cfg)  # plain numbers: checked against the model later
        return
    with pytest.raises(SettingsError, match=match):
        read_acceleration(cfg)
