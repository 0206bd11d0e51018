"""The speed harness (no timing is asserted: only what is reported, FLOPs and parameters, and bad input)."""
import copy

import pytest
import torch

from efficientllava.evaluation import MODEL_INPUTS
from efficientllava.pruning.structured import decoder_geometry, shrink_model
from efficientllava.pruning.toy_calibration import toy_model_and_batches
from efficientllava.speed import (MEASURED, GraphedPrefill, SpeedError, compare, decode_speedup, estimated_speedup,
                                  lean_inputs, lean_prefill, paired_quartiles, parameter_count, prefill, prefill_flops,
                                  prefill_speedup)
from efficientllava.token_pruning import VisualTokenPruner


@pytest.fixture(scope="module")
def dense_and_pruned():
    model, _, batches = toy_model_and_batches(seed=0, n=8, batch_size=4)
    pruned = copy.deepcopy(model)
    shrink_model(pruned, {p: {"mlp": 0.5, "attn": 0.5} for p in decoder_geometry(pruned)}, batches)
    VisualTokenPruner(pruned, 1, 0.25).attach()
    return model, pruned, [{k: b[k] for k in MODEL_INPUTS} for b in batches]


def unpadded(batch):
    n = int(batch["attention_mask"][0].sum())
    return {k: (v[:1, :n] if k != "pixel_values" else v[:1]) for k, v in batch.items()}


def test_prefill_and_decode_comparisons_report_measured_speedups(dense_and_pruned):
    dense, pruned, batches = dense_and_pruned
    pre = prefill_speedup(dense, pruned, batches, repeats=1, warmup=0)
    assert pre["kind"] == MEASURED and pre["speedup"] > 0 and "interleaved prefills" in pre["how"]
    dec = decode_speedup(dense, pruned, unpadded(batches[0]), steps=2, repeats=1, warmup=0)
    assert dec["kind"] == MEASURED and dec["dense_tokens_per_s"] > 0 and dec["pruned_tokens_per_s"] > 0


def test_paired_quartiles_are_the_spread_of_the_per_round_speedups():
    # rounds with speedups 1, 2, 3, 4, 5 (a slow round slows both calls alike): quartiles 2 and 4
    dense = [1.0, 4.0, 3.0, 8.0, 5.0]
    pruned = [1.0, 2.0, 1.0, 2.0, 1.0]
    assert paired_quartiles(dense, pruned) == pytest.approx((2.0, 4.0))
    assert paired_quartiles([3.0], [2.0]) == pytest.approx((1.5, 1.5))


def test_scoring_speedup_reports_its_spread(test_records):
    from efficientllava.search.fitness import SearchSamples
    from efficientllava.speed import scoring_speedup

    model, processor, _ = toy_model_and_batches(seed=0, n=4, batch_size=4)
    samples = SearchSamples.build(test_records[:4], processor, scoring="likelihood")
    out = scoring_speedup(model, model, samples, repeats=3, warmup=0)
    q1, q3 = out["quartiles"]
    assert 0 < q1 <= q3 and "quartiles" in out["how"] and out["kind"] == MEASURED


def test_shrinking_and_dropped_tokens_cut_flops_and_parameters(dense_and_pruned):
    dense, pruned, batches = dense_and_pruned
    assert prefill_flops(pruned, batches[0]) < 0.7 * prefill_flops(dense, batches[0])
    assert parameter_count(pruned) < parameter_count(dense)
    profile = {"total": 100.0, "layers": {"a": 40.0, "b": 20.0}}
    assert estimated_speedup(profile, {"a": 0.5}) == pytest.approx(100 / 80)
    assert estimated_speedup(profile, {"a": 0.5}, kept={"a": 0.5, "b": 0.5}) == pytest.approx(100 / 60)


def test_bad_timing_requests_are_refused(dense_and_pruned):
    dense, pruned, batches = dense_and_pruned
    with pytest.raises(SpeedError, match="repeats is 0; expected an integer >= 1"):
        compare({"a": lambda: None}, torch.device("cpu"), repeats=0)
    with pytest.raises(SpeedError, match="warmup is -1"):
        compare({"a": lambda: None}, torch.device("cpu"), warmup=-1)
    with pytest.raises(SpeedError, match="decode timing got a padded batch"):
        decode_speedup(dense, pruned, batches[0], steps=2, repeats=1)
    with pytest.raises(SpeedError, match="decode steps is 0"):
        decode_speedup(dense, pruned, unpadded(batches[0]), steps=0, repeats=1)


def test_lean_prefill_gives_the_prefills_logits(dense_and_pruned):
    """The graph-capturable prefill (no reads of the device) computes what the model's own forward does: dense,
    and shrunk with visual tokens dropped after layer 1; its pruner plan ranks the image tokens the same way."""
    dense, pruned, batches = dense_and_pruned
    for b in range(2):
        batch = unpadded({k: v[b:] for k, v in batches[0].items()})
        for model in (dense, pruned):
            expected = prefill(model, batch).logits[:, -1:]
            inputs, plan = lean_inputs(model, batch)
            assert (plan is None) == (model is dense)
            torch.testing.assert_close(lean_prefill(model, inputs, plan), expected, rtol=1e-4, atol=1e-4)
    # the pruner's plan is what makes the difference: without it, no tokens drop
    inputs, plan = lean_inputs(pruned, unpadded(batches[0]))
    assert plan["n_kept"] < inputs["input_ids"].shape[1]
    assert not torch.allclose(lean_prefill(pruned, inputs, None), lean_prefill(pruned, inputs, plan))


def test_lean_and_graphed_prefills_refuse_what_they_cannot_do(dense_and_pruned):
    dense, _, batches = dense_and_pruned
    with pytest.raises(SpeedError, match="got a padded batch"):
        lean_inputs(dense, batches[0])
    with pytest.raises(SpeedError, match="needs the model on a CUDA device; it is on cpu"):
        GraphedPrefill(dense, unpadded(batches[0]))


def test_gc_paused_pauses_collection_and_restores_it_once_at_the_outermost_block():
    import gc

    from efficientllava.speed import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block leaves the outer pause alone
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("timing failed")
    assert gc.isenabled()  # restored after an error too
