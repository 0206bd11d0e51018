"""Fitness: the generalization term's sign and scale, eta, and the task score agreeing with `evaluate`."""
import math

import pytest
import torch

from efficientllava.evaluation import MODEL_INPUTS, evaluate
from efficientllava.pruning import PruningBank, get_linear, select_layers
from efficientllava.pruning.toy_calibration import toy_model_and_batches, toy_records
from efficientllava.search.fitness import (
    FitnessEvaluator,
    SearchSamples,
    check_eta,
    choice_outcomes,
    choice_probabilities,
    fitness,
    generalization_of,
    generalization_term,
    letter_accuracy,
    letter_predictions,
    log_norm_table,
)

CHOICES = [0.0, 0.3, 0.5, 0.7]


@pytest.fixture(scope="module")
def setup():
    model, processor, batches = toy_model_and_batches()
    names = list(select_layers(model))
    bank = PruningBank.build(model, names, CHOICES, "wanda", batches)
    records = toy_records(8, "val")
    return model, processor, bank, names, records


def test_generalization_term_is_the_log_norm_ratio_sum(setup):
    model, _, bank, names, _ = setup
    table = log_norm_table(bank)
    policy = {n: CHOICES[i % len(CHOICES)] for i, n in enumerate(names)}
    dense = {n: get_linear(model, n).weight.detach().clone() for n in names}
    bank.assemble(model, policy)
    manual = sum(math.log(torch.linalg.vector_norm(get_linear(model, n).weight).item()
                          / torch.linalg.vector_norm(dense[n]).item()) for n in names)
    bank.restore(model)
    assert generalization_term(table, policy) == pytest.approx(manual, rel=1e-6)


def test_generalization_of_the_weights_a_model_holds_equals_the_table(setup):
    """The final rerank measures G on the final pruner's weights: on bank weights it must be the table's G."""
    model, _, bank, names, _ = setup
    table = log_norm_table(bank)
    policy = {n: CHOICES[(i + 1) % len(CHOICES)] for i, n in enumerate(names)}
    assert generalization_of(model, bank, names) == pytest.approx(0.0, abs=1e-9)  # dense
    bank.assemble(model, policy)
    held = generalization_of(model, bank, names)
    bank.restore(model)
    assert held == pytest.approx(generalization_term(table, policy), rel=1e-6) and held < 0


def test_generalization_term_is_zero_dense_and_falls_with_sparsity(setup):
    _, _, bank, names, _ = setup
    table = log_norm_table(bank)
    values = [generalization_term(table, {n: r for n in names}) for r in CHOICES]
    assert values[0] == 0.0
    assert all(b < a for a, b in zip(values, values[1:]))  # the reviewer's caveat: G falls as sparsity rises
    assert -len(names) < values[-1] < 0  # scale: a few tenths per layer at 70%, never below -1 per layer here


def test_fitness_sign_and_eta():
    assert fitness(0.5, -2.0, 0.0) == 0.5  # eta = 0: accuracy alone (the w/o Gen ablation)
    assert fitness(0.5, -2.0, 0.01) == pytest.approx(0.52)  # a smaller norm product raises the fitness
    assert fitness(0.5, -1.0, 0.01) < fitness(0.5, -2.0, 0.01)
    with pytest.raises(ValueError, match=r"search.eta is -0.1; expected eta >= 0"):
        check_eta(-0.1)


def test_task_score_matches_evaluate(setup):
    model, processor, bank, names, records = setup
    samples = SearchSamples.build(records, processor, batch_size=3)
    bank.assemble(model, {n: 0.5 for n in names})
    try:
        assert letter_accuracy(model, samples) == pytest.approx(evaluate(model, processor, records)["acc"])
    finally:
        bank.restore(model)


def test_evaluator_reports_accuracy_g_and_fitness(setup):
    model, processor, bank, names, records = setup
    samples = SearchSamples.build(records, processor)
    evaluator = FitnessEvaluator(model, bank, samples, eta=0.01)
    result = evaluator({n: 0.7 for n in names})
    bank.restore(model)
    assert 0 <= result["acc"] <= 100 and result["G"] < 0 and result["seconds"] > 0
    assert result["fitness"] == pytest.approx(result["acc"] / 100 - 0.01 * result["G"])


@pytest.mark.parametrize("scoring", ["letter", "likelihood"])
def test_answer_probability_is_the_softmax_over_each_samples_own_options(setup, scoring):
    """choice_outcomes: hits agree with the predictions, and each probability is the softmax of the sample's own
    option scores at its answer, checked against the full model's logits (letter scoring)."""
    model, processor, bank, names, records = setup
    samples = SearchSamples.build(records, processor, batch_size=3, scoring=scoring)
    hits, probs = choice_outcomes(model, samples)
    answers = torch.tensor([r["answer"] for r in records])
    assert hits.tolist() == (letter_predictions(model, samples) == answers).float().tolist()
    assert ((probs > 0) & (probs < 1)).all()
    n_choices = torch.tensor([len(r["choices"]) for r in records])
    assert (probs[hits == 1] > 1.0 / n_choices[hits == 1]).all()  # the argmax holds more than an even share
    if scoring == "letter":
        expected = []
        for batch in samples.batches:
            with torch.no_grad():
                logits = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
            expected.append(logits[torch.arange(len(logits)), batch["last_index"]][:, samples.letter_ids])
        expected = torch.cat(expected)
        for i, (n, a) in enumerate(zip(n_choices.tolist(), answers.tolist())):
            assert probs[i].item() == pytest.approx(torch.softmax(expected[i, :n].float(), -1)[a].item(), rel=1e-4)


def test_probability_task_score_drives_the_fitness(setup):
    model, processor, bank, names, records = setup
    samples = SearchSamples.build(records, processor)
    evaluator = FitnessEvaluator(model, bank, samples, eta=0.01, task_score="probability")
    result = evaluator({n: 0.7 for n in names})
    hits, probs = choice_outcomes(model, samples)
    bank.restore(model)
    assert result["acc"] == pytest.approx(100 * hits.mean().item())  # still reported as accuracy
    assert result["score"] == pytest.approx(100 * probs.mean().item())
    assert result["fitness"] == pytest.approx(result["score"] / 100 - 0.01 * result["G"])
    accuracy = FitnessEvaluator(model, bank, samples, eta=0.01)({n: 0.7 for n in names})
    bank.restore(model)
    assert accuracy["score"] == accuracy["acc"] == pytest.approx(result["acc"])


def test_agreement_task_score_compares_with_the_dense_model_not_the_labels(setup):
    """task_score=agreement: sum_i p_candidate(i) * p_dense(i) per sample, the dense distribution taken when the
    evaluator is built (even if the model holds a pruned policy then); the labels only feed the reported accuracy."""
    model, processor, bank, names, records = setup
    samples = SearchSamples.build(records, processor, batch_size=3)
    dense = torch.cat(choice_probabilities(model, samples))
    bank.assemble(model, {n: 0.5 for n in names})  # built on a pruned state: the bank is restored first
    evaluator = FitnessEvaluator(model, bank, samples, eta=0.01, task_score="agreement")
    assert torch.equal(torch.cat(evaluator.reference), dense)
    itself = evaluator({n: 0.0 for n in names})
    assert itself["score"] == pytest.approx(100 * (dense * dense).sum(-1).mean().item(), rel=1e-5)
    pruned = evaluator({n: 0.7 for n in names})
    probs = torch.cat(choice_probabilities(model, samples))
    hits, _ = choice_outcomes(model, samples)
    bank.restore(model)
    assert pruned["score"] == pytest.approx(100 * (probs * dense).sum(-1).mean().item(), rel=1e-5)
    assert pruned["acc"] == pytest.approx(100 * hits.mean().item())
    assert pruned["score"] < itself["score"]  # 70% Wanda moves the toy's answers away from the dense ones
    assert pruned["fitness"] == pytest.approx(pruned["score"] / 100 - 0.01 * pruned["G"])
    flipped = [{**r, "answer": (r["answer"] + 1) % len(r["choices"])} for r in records]
    relabelled = FitnessEvaluator(model, bank, SearchSamples.build(flipped, processor, batch_size=3), eta=0.01,
                                  task_score="agreement")({n: 0.7 for n in names})
    bank.restore(model)
    assert relabelled["score"] == pytest.approx(pruned["score"])  # other labels, same agreement


def test_the_evaluator_scores_other_samples_against_their_own_dense_reference(setup):
    """reference_on(other samples) is the dense model's probabilities on them (taken with the bank restored); score()
    is the task score of the model as it stands: what a projector round's held-back check compares."""
    model, processor, bank, names, records = setup
    search, held = SearchSamples.build(records[:4], processor), SearchSamples.build(records[4:], processor)
    evaluator = FitnessEvaluator(model, bank, search, eta=0.0, task_score="agreement")
    bank.assemble(model, {n: 0.5 for n in names})
    reference = evaluator.reference_on(held)  # restores the bank first
    assert torch.equal(torch.cat(reference), torch.cat(choice_probabilities(model, held)))
    bank.assemble(model, {n: 0.7 for n in names})
    probs = torch.cat(choice_probabilities(model, held))
    hits, _ = choice_outcomes(model, held)
    acc, score = evaluator.score(held, reference)
    assert score == pytest.approx(100 * (probs * torch.cat(reference)).sum(-1).mean().item(), rel=1e-5)
    assert acc == pytest.approx(100 * hits.mean().item())
    with pytest.raises(ValueError, match="needs their dense reference"):
        evaluator.score(held)
    bank.restore(model)
    probability = FitnessEvaluator(model, bank, search, eta=0.0, task_score="probability")
    assert probability.reference_on(held) is None  # the labels are the reference
    _, gold = choice_outcomes(model, held)
    assert probability.score(held)[1] == pytest.approx(100 * gold.mean().item(), rel=1e-5)


def test_bad_task_score_fails_clearly_and_open_samples_keep_accuracy(setup):
    model, processor, bank, _, records = setup
    samples = SearchSamples.build(records, processor)
    with pytest.raises(ValueError, match=r"search.task_score='hits' is unknown; expected one of \['accuracy', "):
        FitnessEvaluator(model, bank, samples, eta=0.0, task_score="hits")
    open_samples = SearchSamples(samples.batches, samples.answers, samples.n_choices, samples.letter_ids,
                                 samples.categories, references=[["yes"]] * len(records))
    # open-ended samples have no options to give probabilities to: they keep their VQA accuracy
    assert FitnessEvaluator(model, bank, open_samples, eta=0.0, task_score="probability").task_score == "accuracy"
