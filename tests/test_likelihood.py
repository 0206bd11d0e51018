"""Option likelihood with one prompt pass equals scoring every prompt + option sequence in full."""
import pytest
import torch

from efficientllava.data.collate import Collator
from efficientllava.data.prompts import SHORT
from efficientllava.evaluation import answer_logprob, model_inputs
from efficientllava.likelihood import option_batch, option_logprobs, predict_options
from efficientllava.models import TOY_MODEL_DIR, load_llava
from efficientllava.pruning.toy_calibration import toy_records
from efficientllava.token_pruning import VisualTokenPruner


@pytest.fixture(scope="module")
def toy():
    model, processor = load_llava(TOY_MODEL_DIR)
    return model, Collator(processor), toy_records(24, "test")


def full_sequence_scores(model, collator, records):
    flat = [r for r in records for _ in r["choices"]]
    targets = [c for r in records for c in r["choices"]]
    batch = collator.answers(flat, [SHORT] * len(flat), targets=targets)
    with torch.no_grad():
        scores = answer_logprob(model(**model_inputs(batch)).logits, batch["labels"])
    return torch.split(scores, [len(r["choices"]) for r in records])


def test_equals_the_full_sequence_log_probabilities(toy):
    model, collator, records = toy
    assert len({len(r["choices"]) for r in records}) > 1  # records with fewer options are padded
    scores = option_logprobs(model, option_batch(collator, records))
    reference = full_sequence_scores(model, collator, records)
    for row, ref in zip(scores, reference):
        torch.testing.assert_close(row[: len(ref)], ref, rtol=0, atol=1e-4)
        assert torch.isneginf(row[len(ref):]).all()
    assert predict_options(model, option_batch(collator, records)).tolist() == [int(r.argmax()) for r in reference]


def test_visual_token_pruning_runs_over_the_cache(toy):
    model, collator, records = toy
    batch = option_batch(collator, records)
    dense = option_logprobs(model, batch)
    with VisualTokenPruner(model, 1, 1.0):  # keeping every token changes nothing
        assert torch.equal(option_logprobs(model, batch), dense)
    with VisualTokenPruner(model, 1, 0.25):
        pruned = option_logprobs(model, batch)
    present = torch.isfinite(dense)
    assert torch.isfinite(pruned[present]).all() and not torch.allclose(pruned[present], dense[present])
    assert torch.equal(option_logprobs(model, batch), dense)  # the cache of a run never leaks into the next


def test_needs_an_options_batch(toy):
    model, collator, records = toy
    with pytest.raises(KeyError, match="option_ids"):
        option_logprobs(model, collator.prompts(records[:2], [SHORT] * 2))
