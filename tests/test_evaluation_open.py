"""Open-ended evaluation: greedy answers are independent of batching (left padding), the Lightning evaluator
matches the plain function, and DDP-style merging counts every record once."""
from pathlib import Path

import pytest
import torch

from efficientllava.data.benchmarks import load_benchmark
from efficientllava.data.collate import Collator
from efficientllava.evaluation import (AccuracyTally, OpenEndedEvaluator, evaluate_open, generate_answers,
                                       left_padded)
from efficientllava.vqa import vqa_accuracy

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


@pytest.fixture(scope="module")
def random_toy():
    from efficientllava.toy_model import build_toy_llava

    model, processor = build_toy_llava(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def vizwiz_val(tmp_path_factory):
    data = load_benchmark("vizwiz", str(FIXTURES / "vizwiz"),
                          data_files={"train": "Annotations/train.json", "val": "Annotations/val.json"},
                          image_root=str(FIXTURES / "vizwiz" / "{split}"),
                          cache_dir=str(tmp_path_factory.mktemp("cache")))
    return [data["val"][i] for i in range(len(data["val"]))]


def test_left_padding_moves_tokens_to_the_right_edge():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    ids, mask = left_padded(batch, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 8, 9]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_greedy_answers_do_not_depend_on_the_batch(random_toy, vizwiz_val):
    model, processor = random_toy
    collator = Collator(processor)
    together = generate_answers(model, collator, vizwiz_val, max_new_tokens=4)
    alone = [generate_answers(model, collator, [r], max_new_tokens=4)[0] for r in vizwiz_val]
    assert together == alone
    assert all(isinstance(a, str) and a for a in together)


def test_open_evaluation_scores_vqa_accuracy_of_its_own_predictions(random_toy, vizwiz_val):
    model, processor = random_toy
    summary, rows = evaluate_open(model, processor, vizwiz_val, max_new_tokens=3, batch_size=3)
    expected = [vqa_accuracy(r["prediction"], r["answers"]) for r in rows]
    assert summary["acc"] == pytest.approx(100 * sum(expected) / len(expected)) and summary["n"] == len(vizwiz_val)
    assert [r["id"] for r in rows] == [r["id"] for r in vizwiz_val]


def test_a_model_that_answers_the_consensus_scores_full_marks(vizwiz_val):
    from efficientllava.data.prompts import consensus_answer
    from efficientllava.evaluation import vqa_summary

    rows = [{"prediction": consensus_answer(r), "answers": r["answers"], "category": r["category"]}
            for r in vizwiz_val]  # every fixture question has an answer given by at least three people
    summary = vqa_summary(rows)
    assert summary["acc"] == pytest.approx(100.0) and summary["acc/unanswerable"] == pytest.approx(100.0)
    wrong = vqa_summary([{**row, "prediction": "purple"} for row in rows])
    assert wrong["acc"] == 0.0


def test_lightning_open_evaluator_matches_the_function(random_toy, vizwiz_val):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    model, processor = random_toy
    module = OpenEndedEvaluator(model, processor, max_new_tokens=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, DataLoader(vizwiz_val, batch_size=3, collate_fn=list), verbose=False)
    summary, rows = evaluate_open(model, processor, vizwiz_val, max_new_tokens=3)
    assert module.results["acc"] == pytest.approx(summary["acc"])
    assert [r["prediction"] for r in module.predictions] == [r["prediction"] for r in rows]


def test_tally_counts_a_record_seen_twice_once(random_toy, test_records):
    """Lightning's distributed sampler repeats records to even the shares: merged by id, each counts once."""
    from efficientllava.evaluation import evaluate, letter_token_ids

    model, processor = random_toy
    records = test_records[:10]
    tally = AccuracyTally(sorted({r["category"] for r in records}), modes=["letter"])
    collator, letters = Collator(processor), letter_token_ids(processor.tokenizer)
    tally.update(model, collator, records[:6], letters)
    tally.update(model, collator, records[4:] + records[:1], letters)  # overlaps, as padded shards do
    result = tally.compute()
    assert result["n"] == 10
    assert result["acc"] == pytest.approx(evaluate(model, processor, records)["acc"])


def test_open_evaluator_refuses_multiple_choice_records(random_toy, test_records):
    model, processor = random_toy
    with pytest.raises(ValueError, match=r"scored by \['choice'\]; expected open-ended records"):
        OpenEndedEvaluator(model, processor).test_step(test_records[:2], 0)
