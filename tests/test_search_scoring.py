import pytest

from efficientllava.data.collate import Collator
from efficientllava.evaluation import predict_letter, predict_likelihood, letter_token_ids
from efficientllava.search.fitness import SearchSamples, letter_accuracy, letter_predictions


def test_likelihood_scoring_matches_the_evaluation(toy, test_records):
    """The search's likelihood scoring (LM head at answer positions only, batches of 7 records) predicts exactly
    what evaluation.predict_likelihood predicts."""
    model, processor = toy
    records = test_records[:40]
    samples = SearchSamples.build(records, processor, batch_size=7, scoring="likelihood")
    expected = predict_likelihood(model, Collator(processor), records)
    assert letter_predictions(model, samples).tolist() == expected
    hits = sum(p == r["answer"] for p, r in zip(expected, records))
    assert letter_accuracy(model, samples) == pytest.approx(100.0 * hits / len(records))


def test_letter_scoring_is_still_the_default(toy, test_records):
    model, processor = toy
    records = test_records[:16]
    samples = SearchSamples.build(records, processor, batch_size=16)
    expected = predict_letter(model, Collator(processor), records, letter_token_ids(processor.tokenizer))
    assert samples.scoring == "letter" and letter_predictions(model, samples).tolist() == expected


def test_unknown_scoring_fails_clearly(toy, test_records):
    with pytest.raises(ValueError, match="scoring='logits' is unknown; expected one of"):
        SearchSamples.build(test_records[:2], toy[1], scoring="logits")
