from types import SimpleNamespace

import pytest
import torch

from efficientllava.evaluation import MultipleChoiceEvaluator, evaluate, letter_token_ids
from efficientllava.toy_model import build_processor


class ConstantModel(torch.nn.Module):
    """Predicts the same next-token distribution everywhere: a model 'forced' to answer one token."""

    def __init__(self, vocab_size: int, token_id: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[token_id] = 10.0

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))

    # LLaVA's split into the decoder (`model`, with a key/value cache) and `lm_head`, for option-likelihood scoring
    def model(self, input_ids, **kwargs):
        return SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, 1),
                               past_key_values=SimpleNamespace(layers=[]))

    def lm_head(self, hidden):
        return hidden * 0 + self.bias


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.mark.parametrize("letter", ["A", "B", "C"])
def test_model_forced_to_one_letter_scores_the_share_of_that_answer(processor, test_records, letter):
    index = "ABCDE".index(letter)
    model = ConstantModel(len(processor.tokenizer), letter_token_ids(processor.tokenizer)[index])
    # records with too few options for that letter see equal logits for theirs: ties fall to "A"
    hits = [r["answer"] == (index if len(r["choices"]) > index else 0) for r in test_records]
    expected = 100.0 * sum(hits) / len(test_records)
    result = evaluate(model, processor, test_records, mode="letter", batch_size=32)
    assert result["acc"] == pytest.approx(expected)
    assert 10 < expected < 60  # the check is not vacuous


def test_letters_outside_a_records_choices_never_win(processor, test_records):
    model = ConstantModel(len(processor.tokenizer), letter_token_ids(processor.tokenizer)[4])  # always "E"
    five = [r for r in test_records if len(r["choices"]) == 5]
    fewer = [r for r in test_records if len(r["choices"]) < 5]
    expected = sum(r["answer"] == 4 for r in five) + sum(r["answer"] == 0 for r in fewer)  # ties fall to "A"
    result = evaluate(model, processor, test_records, mode="letter")
    assert result["acc"] == pytest.approx(100.0 * expected / len(test_records))


def test_likelihood_mode_picks_the_favoured_answer(processor):
    from PIL import Image

    from efficientllava.data.toy_benchmark import generate_split

    yes_id = processor.tokenizer.convert_tokens_to_ids("yes")
    model = ConstantModel(len(processor.tokenizer), yes_id)
    cols = generate_split("test", 80, 0, relation_form="yes_no", categories=["relation"])  # yes / no options
    cols["image"] = [Image.fromarray(a) for a in cols["image"]]
    relation = [dict(zip(cols, row)) for row in zip(*cols.values())]
    expected = 100.0 * sum(r["choices"][r["answer"]] == "yes" for r in relation) / len(relation)
    result = evaluate(model, processor, relation, mode="likelihood")
    assert result["acc"] == pytest.approx(expected)
    assert 20 < expected < 80


def test_per_category_breakdown(processor, test_records):
    model = ConstantModel(len(processor.tokenizer), letter_token_ids(processor.tokenizer)[0])
    result = evaluate(model, processor, test_records, mode="letter")
    for category in {r["category"] for r in test_records}:
        rows = [r for r in test_records if r["category"] == category]
        assert result[f"acc/{category}"] == pytest.approx(100.0 * sum(r["answer"] == 0 for r in rows) / len(rows))


def test_tally_reports_how_often_the_first_option_is_picked_and_is_the_answer():
    """first: share of predictions at option A, per mode and category; answer_first: share of records whose answer
    is option A. Known predictions give known shares."""
    from efficientllava.evaluation import AccuracyTally

    records = [{"id": i, "category": c, "answer": a, "choices": ["x", "y", "z"]}
               for i, (c, a) in enumerate([("rel", 0), ("rel", 1), ("rel", 2), ("rel", 1), ("cnt", 0), ("cnt", 2)])]
    tally = AccuracyTally(["cnt", "rel"], modes=["letter", "likelihood"])
    letter = [0, 0, 0, 0, 2, 2]  # always A on rel: right once in four
    likelihood = [0, 1, 2, 0, 0, 1]
    tally.add(records, [letter, likelihood])
    r = tally.compute()
    assert r["acc/rel"] == 25.0 and r["first/rel"] == 100.0 and r["answer_first/rel"] == 25.0
    assert r["first/cnt"] == 0.0 and r["acc/cnt"] == 50.0 and r["answer_first/cnt"] == 50.0
    assert r["first"] == pytest.approx(100 * 4 / 6) and r["answer_first"] == pytest.approx(100 * 2 / 6)
    assert r["acc_ll/rel"] == 75.0 and r["first_ll/rel"] == 50.0 and r["first_ll/cnt"] == 50.0
    assert r["n"] == 6


def test_unknown_mode(processor, test_records):
    model = ConstantModel(len(processor.tokenizer), 0)
    with pytest.raises(ValueError, match="evaluation mode 'greedy' is unknown"):
        evaluate(model, processor, test_records[:2], mode="greedy")
    with pytest.raises(ValueError, match="evaluation mode 'greedy' is unknown"):
        MultipleChoiceEvaluator(model, processor, ["colour"], modes=["greedy"])


def test_lightning_evaluator_matches_the_function(processor, test_records):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    model = ConstantModel(len(processor.tokenizer), letter_token_ids(processor.tokenizer)[1])
    categories = sorted({r["category"] for r in test_records})
    module = MultipleChoiceEvaluator(model, processor, categories)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, DataLoader(test_records, batch_size=50, collate_fn=list), verbose=False)
    assert module.results["acc"] == pytest.approx(evaluate(model, processor, test_records)["acc"])
    assert module.results["n"] == len(test_records)


def test_shipped_toy_is_trained(toy, test_records):
    """The shipped toy is far above chance in both scorings: option likelihood and the lettered format (93.40% by
    letter on the whole test split, README)."""
    model, processor = toy
    records = test_records[:160]
    chance = 100.0 * sum(1 / len(r["choices"]) for r in records) / len(records)
    assert chance < 40
    for mode in ("likelihood", "letter"):
        assert evaluate(model, processor, records, mode=mode)["acc"] >= chance + 20, mode
    assert evaluate(model, processor, records, mode="letter")["acc"] >= 75
