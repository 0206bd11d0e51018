"""Fitness of a candidate policy: task score on the N search samples minus eta times a generalization term.

    fitness = score - eta * G,    G = sum_l log(||M_l * W_l||_F / ||W_l||_F)

`score` is the task score on the search samples as a fraction in [0, 1] (`search.task_score`: agreement with the
dense model's option probabilities, the answer's probability, or accuracy; `FitnessEvaluator`). G is the log of the
norm-based Rademacher-complexity bound of the pruned network (C * prod_l ||W_l||_F / sqrt(N); Neyshabur et al. 2015,
Golowich et al. 2018) relative to the dense network, over the searched layers (the other layers are unchanged and
cancel). The bound's constant and -1/2 log N are the same for every candidate at fixed N, so they are dropped.
M_l * W_l is the weight the bank assembles (for SparseGPT banks it includes the weight update). G <= 0 for masks and
falls as sparsity rises, so the budget is enforced by `SearchSpace.repair`, not by the fitness; see docs/method.md.

The task score runs one forward over the pre-collated search samples with the candidate assembled from the bank, and
reads the logits of the option letters at each prompt's last position (as `evaluation.predict_letter` does, but
applying the LM head to those positions only). With `scoring="likelihood"` (`search.yaml: scoring`), multiple-choice
samples are scored instead like `evaluation.predict_likelihood`: the option whose answer + EOS has the highest
log-probability after the short-answer prompt is the prediction, the prompt run once and each option over its cache
(`efficientllava/likelihood.py`; for a model that answers well but has not learned the lettered format).
Open-ended search samples (VizWiz) are scored instead by greedy
answers of at most `max_new_tokens` against their human answers (VQA accuracy, `efficientllava/vqa.py`); benchmarks
scored by a judge model cannot be searched (hundreds of candidates, each a round of judge calls) and are refused.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from efficientllava.data.collate import Collator
from efficientllava.data.prompts import LETTER, OPEN, SHORT
from efficientllava.data.schema import CHOICE, JUDGED, VQA, record_metric
from efficientllava.evaluation import MODEL_INPUTS, MODES, generate_from_batch, letter_scores, letter_token_ids
from efficientllava.likelihood import option_logprobs
from efficientllava.vqa import vqa_accuracy
from efficientllava.pruning.bank import DENSE, choice_key
from efficientllava.pruning.layers import get_linear

log = logging.getLogger(__name__)


def check_eta(eta) -> float:
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"search.eta is {eta}; expected eta >= 0 (0 disables the generalization term)")
    return eta


def fitness(score: float, generalization: float, eta: float) -> float:
    """score in [0, 1]; generalization = G (<= 0 for masks). Larger is better."""
    return score - eta * generalization


# ---- generalization term ----------------------------------------------------------------------------------------
def log_norm_table(bank) -> dict[str, dict[str, float]]:
    """{layer: {choice key: log(||W_choice||_F / ||W_dense||_F)}} for every layer and choice of the bank."""
    table = {}
    for name in bank.shapes:
        dense = bank.weight(name, 0.0).float()
        base = torch.linalg.vector_norm(dense).item()
        row = {DENSE: 0.0}
        for key in bank.choices:
            norm = torch.linalg.vector_norm(bank.weight(name, key).float()).item()
            row[key] = math.log(max(norm, 1e-30) / max(base, 1e-30))
        table[name] = row
    return table


def generalization_term(table: dict[str, dict[str, float]], ratios: dict) -> float:
    """G of a policy (per-layer ratios) from the table."""
    total = 0.0
    for name, value in ratios.items():
        key = choice_key(value)
        if key not in table[name]:
            raise KeyError(f"layer {name!r}: choice {key!r} is not in the generalization table; "
                           f"expected one of the bank's choices {sorted(table[name])}")
        total += table[name][key]
    return total


def generalization_of(model, bank, names) -> float:
    """G of the weights the model holds now (e.g. after the final prune, with its weight updates), against the
    bank's dense weights of the same layers."""
    total = 0.0
    for name in names:
        base = torch.linalg.vector_norm(bank.weight(name, 0.0).float()).item()
        norm = torch.linalg.vector_norm(get_linear(model, name).weight.detach().float()).item()
        total += math.log(max(norm, 1e-30) / max(base, 1e-30))
    return total


# ---- task score -------------------------------------------------------------------------------------------------
SCORINGS = MODES  # multiple-choice scorings: the evaluation modes


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} is unknown; expected one of {list(SCORINGS)}")
    return scoring


def sample_metric(records) -> str:
    """The one metric the search samples are scored by: "choice" or "vqa" (judge-scored ones are refused)."""
    metrics = {record_metric(r) for r in records}
    if len(metrics) != 1:
        raise ValueError(f"the search samples mix metrics {sorted(metrics)}; expected records of one benchmark")
    metric = metrics.pop()
    if metric in JUDGED:
        raise ValueError(f"the search samples are scored by a judge model ({metric}); a search scores hundreds of "
                         "candidates and calls no judge: expected a benchmark scored on the spot (multiple choice "
                         "such as scienceqa, or VQA accuracy such as vizwiz), then evaluate.py for the judged ones")
    return metric


@dataclass
class SearchSamples:
    """The N search samples as pre-collated prompt batches (letter format, or open format for VQA samples), plus
    what scoring needs."""

    batches: list[dict]
    answers: list[torch.Tensor]
    n_choices: list[torch.Tensor]
    letter_ids: list[int]
    categories: list[str]
    references: list[list[str]] | None = None  # VQA samples: the human answers of each
    tokenizer: object = None
    max_new_tokens: int = 16
    scoring: str = "letter"  # multiple choice: "letter" or "likelihood" (batches are then Collator.options batches)

    @classmethod
    def build(cls, records, processor, batch_size: int = 64, max_new_tokens: int = 16,
              scoring: str = "letter") -> "SearchSamples":
        collator = Collator(processor)
        records = list(records)
        metric = sample_metric(records) if records else CHOICE
        fmt = OPEN if metric == VQA else LETTER
        scoring = "letter" if metric == VQA else check_scoring(scoring)
        batches, answers, n_choices, categories = [], [], [], []
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            if scoring == "likelihood":
                batches.append(collator.options(chunk, [SHORT] * len(chunk)))
            else:
                batches.append(collator.prompts(chunk, [fmt] * len(chunk)))
            answers.append(torch.tensor([r["answer"] for r in chunk]))
            n_choices.append(torch.tensor([len(r["choices"]) for r in chunk]))
            categories += [r["category"] for r in chunk]
        references = [list(r["answers"]) for r in records] if metric == VQA else None
        return cls(batches, answers, n_choices, letter_token_ids(processor.tokenizer), categories, references,
                   processor.tokenizer, int(max_new_tokens), scoring)

    def __len__(self) -> int:
        return sum(len(a) for a in self.answers)


@torch.no_grad()
def choice_scores(model, samples: SearchSamples) -> list[torch.Tensor]:
    """The scoring forward over multiple-choice samples: per batch, (rows, options) scores of each sample's own
    options (letter logits at the prompt's last position, or option log-likelihoods when `samples.scoring` says
    so), -inf beyond a sample's options."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for batch, n_choices in zip(samples.batches, samples.n_choices):
        if samples.scoring == "likelihood":
            scores.append(option_logprobs(model, batch).float().cpu())
            continue
        hidden = model.model(**{k: batch[k].to(device) for k in MODEL_INPUTS}).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=device)
        last = model.lm_head(hidden[rows, batch["last_index"].to(device)])  # the LM head at the last positions only
        scores.append(letter_scores(last, n_choices, samples.letter_ids).cpu())
    model.train(was_training)
    return scores


@torch.no_grad()
def letter_predictions(model, samples: SearchSamples) -> torch.Tensor:
    """Predicted option index per sample (only each sample's own letters compete, or the option with the highest
    likelihood), as `evaluation.predict_letter` does; for VQA samples, the greedy answers (a list of strings), so
    timing and FLOP counting see the real scoring cost."""
    if samples.references is not None:
        return open_predictions(model, samples)
    return torch.cat([s.argmax(-1) for s in choice_scores(model, samples)])


def choice_probabilities(model, samples: SearchSamples) -> list[torch.Tensor]:
    """Per batch, (rows, options) probabilities the model gives each sample's own options (softmax of
    `choice_scores`; 0 beyond a sample's options)."""
    return [torch.softmax(scores, -1) for scores in choice_scores(model, samples)]


def choice_outcomes(model, samples: SearchSamples, reference: list[torch.Tensor] | None = None):
    """One scoring forward over multiple-choice samples: per sample, whether the prediction is the answer (0/1),
    and the probability the model gives the answer among the sample's options or, given a `reference` (another
    model's `choice_probabilities`), the probability that the two, each picking an option by its own probabilities,
    pick the same one: sum_i p_model(i) * p_reference(i)."""
    hits, scores = [], []
    for i, (probs, answers) in enumerate(zip(choice_probabilities(model, samples), samples.answers)):
        hits.append((probs.argmax(-1) == answers).float())
        scores.append(probs.gather(-1, answers[:, None]).squeeze(-1) if reference is None
                      else (probs * reference[i]).sum(-1))
    return torch.cat(hits), torch.cat(scores)


def open_predictions(model, samples: SearchSamples) -> list[str]:
    """Greedy answers to the (open-format) search samples."""
    answers = []
    for batch in samples.batches:
        answers += generate_from_batch(model, batch, samples.tokenizer, samples.max_new_tokens)
    return answers


def task_scores(model, samples: SearchSamples) -> torch.Tensor:
    """Per-sample score in [0, 1]: letter hit, or VQA accuracy of the greedy answer."""
    predictions = letter_predictions(model, samples)
    if samples.references is not None:
        return torch.tensor([vqa_accuracy(p, refs) for p, refs in zip(predictions, samples.references)])
    return (predictions == torch.cat(samples.answers)).float()


def letter_accuracy(model, samples: SearchSamples) -> float:
    """Accuracy in % on the search samples (VQA accuracy for VQA samples)."""
    return 100.0 * task_scores(model, samples).mean().item()


def forward_seconds(model, samples: SearchSamples, repeats: int = 3) -> float:
    """Median wall time of one scoring forward over all the search samples."""
    times = []
    for _ in range(max(repeats, 1)):
        _sync(model)
        start = time.perf_counter()
        letter_predictions(model, samples)
        _sync(model)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _sync(model):
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TASK_SCORES = ("accuracy", "probability", "agreement")


def check_task_score(task_score: str) -> str:
    if task_score not in TASK_SCORES:
        raise ValueError(f"search.task_score={task_score!r} is unknown; expected one of {list(TASK_SCORES)}")
    return task_score


class FitnessEvaluator:
    """Assemble a policy from the bank, score it on the search samples, add the generalization term.

    The task score is the accuracy on the search samples (`task_score="accuracy"`) or the mean probability the model
    gives each sample's answer among its options (`"probability"`, the expected accuracy of sampling an option by
    those probabilities): on 64 samples accuracy moves in steps of 1.6 points and picks the candidates that were
    lucky on them, the probability moves with every change of the model's confidence (docs/toy_history.md). With
    `"agreement"` the labels are not used at all: the score is the probability that the candidate and the dense
    model (the model as the evaluator is built, bank restored) pick the same option, so no candidate can gain by
    being right where the dense model is wrong on these few samples. Open-ended (VQA) samples have no options: they
    are scored by VQA accuracy whichever task score is asked for."""

    def __init__(self, model, bank, samples: SearchSamples, eta: float, task_score: str = "accuracy"):
        self.model, self.bank, self.samples = model, bank, samples
        self.eta = check_eta(eta)
        self.task_score = check_task_score(task_score)
        if samples.references is not None and self.task_score != "accuracy":
            log.info("search.task_score=%s: open-ended search samples are scored by VQA accuracy", self.task_score)
            self.task_score = "accuracy"
        self.table = log_norm_table(bank)
        self.reference = self.reference_on(samples)

    def generalization(self, ratios: dict) -> float:
        return generalization_term(self.table, ratios)

    def reference_on(self, samples: SearchSamples) -> list[torch.Tensor] | None:
        """The dense model's option probabilities on `samples` (the reference `score` needs under agreement; None
        for the other task scores). Restores the bank: call it before the projector changes."""
        if self.task_score != "agreement":
            return None
        self.bank.restore(self.model)
        return choice_probabilities(self.model, samples)

    def score(self, samples: SearchSamples, reference: list[torch.Tensor] | None = None) -> tuple[float, float]:
        """(accuracy, task score), both in %, of the model as it stands on `samples`; `reference` is
        `reference_on(samples)` (the search samples' own reference when None)."""
        if self.task_score == "accuracy":
            acc = letter_accuracy(self.model, samples)
            return acc, acc
        if self.task_score == "agreement" and reference is None:
            if samples is not self.samples:
                raise ValueError("agreement on samples other than the search samples needs their dense reference "
                                 "(FitnessEvaluator.reference_on)")
            reference = self.reference
        hits, probs = choice_outcomes(self.model, samples, reference)
        return 100.0 * hits.mean().item(), 100.0 * probs.mean().item()

    def __call__(self, ratios: dict) -> dict:
        start = time.perf_counter()
        self.bank.assemble(self.model, ratios)
        acc, score = self.score(self.samples)
        g = self.generalization(ratios)
        return {"acc": acc, "score": score, "G": g, "fitness": fitness(score / 100.0, g, self.eta),
                "seconds": time.perf_counter() - start}
