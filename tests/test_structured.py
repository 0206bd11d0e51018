"""Structured shrinking: exact equivalence of masks and real shrinking, compensation, GQA groups, save/load, errors."""
import copy
import json

import pytest
import torch

from efficientllava.evaluation import MODEL_INPUTS
from efficientllava.pruning.calibration import InputStats
from efficientllava.pruning.structured import (ShrunkModelError, StructureError, StructureMasker, check_plan,
                                               column_scores, compute_importance, decoder_geometry, load_shrunk,
                                               remove_heads, shrink_block, shrink_model)
from efficientllava.pruning.toy_calibration import toy_model_and_batches
from efficientllava.speed import parameter_count


@pytest.fixture(scope="module")
def toy_and_batches():
    return toy_model_and_batches(seed=0, n=8, batch_size=4)


def inputs(batch):
    return {k: batch[k] for k in MODEL_INPUTS}


def plan_for(model, mlp=0.5, attn=0.5):
    return {p: {"mlp": mlp, "attn": attn} for p in decoder_geometry(model)}


def test_masks_give_the_shrunk_models_outputs_and_shrinking_removes_parameters(toy_and_batches):
    model, _, batches = toy_and_batches
    model = copy.deepcopy(model)
    scores = compute_importance(model, batches, "flap")
    counts = check_plan(model, plan_for(model))
    masker = StructureMasker(model, scores)
    with torch.no_grad():
        dense = model(**inputs(batches[0])).logits
        masker.set(counts)
        masked = model(**inputs(batches[0])).logits
        twin = copy.deepcopy(model)
        masker.shrink(twin, counts)  # strips the hooks the copy carried along
        shrunk = twin(**inputs(batches[0])).logits
        masker.clear()
        cleared = model(**inputs(batches[0])).logits
    assert torch.allclose(masked, shrunk, atol=1e-5)
    assert not torch.allclose(masked, dense, atol=1e-3) and torch.equal(cleared, dense)
    g = decoder_geometry(twin)
    assert all(b.intermediate == 176 and b.kv_heads == 1 and b.heads == 2 for b in g.values())
    removed = 4 * (3 * 128 * 176 + 2 * 128 * 64 + 2 * 128 * 32) - 4 * 128  # MLP + attention weights, + 4 biases each
    assert parameter_count(model) - parameter_count(twin) == removed - 4 * 128


def test_one_shot_equals_precomputed_scores_and_sequential_shrinks_every_block(toy_and_batches):
    model, _, batches = toy_and_batches
    scores = compute_importance(model, batches, "wanda")
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    plan = plan_for(model, 0.25, 0.0)
    shrink_model(a, plan, batches, importance="wanda")
    shrink_model(b, plan, scores=scores)
    record = shrink_model(c, plan, batches, importance="wanda", sequential=True)
    with torch.no_grad():
        assert torch.equal(a(**inputs(batches[1])).logits, b(**inputs(batches[1])).logits)
        assert torch.isfinite(c(**inputs(batches[1])).logits).all()
    assert {v["intermediate"] for v in record["blocks"].values()} == {264}
    assert c.config.efficientllava_structure == record


def test_compensation_keeps_the_layers_mean_output_on_its_calibration_inputs():
    torch.manual_seed(0)
    block = toy_model_and_batches()[0].model.language_model.layers[0]
    g = decoder_geometry(toy_model_and_batches()[0])["model.language_model.layers.0"]
    x = torch.randn(500, g.intermediate) + torch.linspace(-1, 1, g.intermediate)
    dense_mean = block.mlp.down_proj(x).mean(0)
    keep = torch.arange(0, g.intermediate, 3)
    shrink_block(block, g, channels=keep, mlp_mean=x.mean(0))
    assert torch.allclose(block.mlp.down_proj(x[:, keep]).mean(0), dense_mean, atol=1e-4)


def test_fluctuation_scores_a_constant_input_zero_and_wanda_does_not():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    x[:, 2] = 3.0  # constant: removing it and adding W[:, 2] * 3 to the bias changes nothing
    stats = InputStats("layer", 200, sq_norms=x.pow(2).sum(0), sums=x.sum(0))
    weight = torch.randn(5, 6)
    flap = column_scores(weight, stats, "flap")
    assert flap[2] == pytest.approx(0.0, abs=1e-5) and (flap[[0, 1, 3, 4, 5]] > 0).all()
    assert column_scores(weight, stats, "wanda")[2] > 0
    with pytest.raises(StructureError, match="importance 'taylor' is unknown"):
        column_scores(weight, stats, "taylor")


@pytest.mark.parametrize("plan, match", [
    ({"model.language_model.layers.0": {"attn": 0.25}}, r"removes 1 of 4 query heads.*groups of 2.*one of \[0.0, 0.5\]"),
    ({"model.language_model.layers.0": {"mlp": 1.5}}, r"MLP ratio is 1.5; expected a ratio in \[0, 1\]"),
    ({"model.language_model.layers.0": {"attn": 1.0}}, r"attention ratio is 1.0; expected a ratio in \[0, 1\)"),
    ({"model.language_model.layers.0": {"mlp": 0.999}}, "removes all 352 channels.*or 1.0 to remove the whole MLP"),
    ({"model.language_model.layers.9": {"mlp": 0.5}}, "'model.language_model.layers.9', which is not a decoder block"),
    ({"model.language_model.layers.0": {"ffn": 0.5}}, r"expected a mapping with keys from \['mlp', 'attn'\]"),
    ([0.5], "structure plan is a list"),
])
def test_bad_plans_are_refused_before_anything_changes(toy_and_batches, plan, match):
    model, _, batches = toy_and_batches
    model = copy.deepcopy(model)
    before = parameter_count(model)
    with pytest.raises(StructureError, match=match):
        shrink_model(model, plan, batches)
    assert parameter_count(model) == before


def test_removing_part_of_a_kv_group_is_refused_and_whole_groups_work(toy_and_batches):
    model = copy.deepcopy(toy_and_batches[0])
    with pytest.raises(StructureError, match=r"removing query heads \[0\] leaves KV group 0 .* with 1 of its 2"):
        remove_heads(model, {"model.language_model.layers.1": [0]})
    remove_heads(model, {"model.language_model.layers.1": [2, 3]})
    g = decoder_geometry(model)["model.language_model.layers.1"]
    assert (g.heads, g.kv_heads) == (2, 1)


def test_shrunk_model_saves_and_loads_back_with_its_outputs(toy_and_batches, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from efficientllava.models import load_llava

    model, processor, batches = toy_and_batches
    model = copy.deepcopy(model)
    geometry = list(decoder_geometry(model))
    shrink_model(model, {geometry[0]: {"mlp": 0.25, "attn": 0.5}, geometry[2]: {"mlp": 0.75}}, batches)
    with torch.no_grad():
        before = model(**inputs(batches[0])).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_shrunk(tmp_path)
    via_loader, _ = load_llava(tmp_path, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs(batches[0])).logits, before)
        assert torch.equal(via_loader(**inputs(batches[0])).logits, before)
    assert type(loaded) is LlavaForConditionalGeneration
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the stock loader cannot hold the sizes
        LlavaForConditionalGeneration.from_pretrained(tmp_path)


def test_mlp_ratio_one_removes_the_whole_mlp_leaving_its_calibration_mean(toy_and_batches, tmp_path):
    model, processor, batches = toy_and_batches
    model = copy.deepcopy(model)
    path = list(decoder_geometry(model))[3]
    scores = compute_importance(model, batches, "flap")
    counts = check_plan(model, {path: {"mlp": 1.0}})
    assert counts[path]["mlp"] == 0
    masker = StructureMasker(model, scores)
    with torch.no_grad():
        masker.set(counts)
        masked = model(**inputs(batches[0])).logits
        masker.remove()
        shrink_model(model, {path: {"mlp": 1.0}}, scores=scores)
        shrunk = model(**inputs(batches[0])).logits
        mlp = model.get_submodule(path).mlp
        assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (0, 0)
        hidden = torch.randn(2, 5, 128)
        mean_output = mlp.down_proj.weight.new_zeros(128) + mlp.down_proj.bias
        assert torch.equal(mlp(hidden), mean_output.expand(2, 5, 128))  # a constant: the MLP's calibration mean
        # ... which is down_proj's dense weight applied to its mean input
        dense_down = toy_and_batches[0].get_submodule(path).mlp.down_proj.weight
        assert torch.allclose(mlp.down_proj.bias, dense_down @ scores[path].mlp_mean.float(), atol=1e-5)
    assert torch.allclose(masked, shrunk, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = load_shrunk(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["efficientllava_structure"]["blocks"][path][
        "intermediate"] == 0
    with torch.no_grad():
        assert torch.equal(loaded(**inputs(batches[0])).logits, shrunk)


def test_loading_weights_that_do_not_match_the_recorded_sizes_is_refused(toy_and_batches, tmp_path):
    model, _, batches = toy_and_batches
    model = copy.deepcopy(model)
    shrink_model(model, {"model.language_model.layers.0": {"mlp": 0.5}}, batches)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["efficientllava_structure"]["blocks"]["model.language_model.layers.0"]["intermediate"] = 264
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShrunkModelError, match="do not match the per-block sizes recorded in config.json"):
        load_shrunk(tmp_path)
    config["efficientllava_structure"]["format"] = "other/9"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShrunkModelError, match="has format 'other/9'"):
        load_shrunk(tmp_path)
