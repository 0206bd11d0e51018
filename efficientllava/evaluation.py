"""Evaluation of any LLaVA: multiple choice (option letter or option likelihood) and open-ended answers (greedy).

`letter`: the prompt lists the options; the prediction is the option whose letter gets the highest logit at the
first answer position (only the record's own letters compete). `likelihood`: the short-answer prompt (no options);
the prediction is the option whose text + EOS has the highest total log-probability. Open-ended records (VizWiz,
MM-Vet, LLaVA-Bench) get a greedy answer of at most `max_new_tokens`, scored by VQA accuracy here or by a judge
model (`efficientllava/judge.py`). All are batched and run under `torch.no_grad` in eval mode: deterministic.

Under DDP (several devices) each device sees a share of the records (Lightning's sampler repeats a few to even the
shares); results are kept per record id and merged across devices by id, so every record counts exactly once.
"""
from __future__ import annotations

from collections import defaultdict

import pytorch_lightning as pl
import torch

from efficientllava.data.collate import IGNORE, Collator
from efficientllava.data.prompts import LETTER, LETTERS, OPEN
from efficientllava.data.schema import CHOICE, VQA, record_metric
from efficientllava.likelihood import option_batch, predict_options
from efficientllava.models import model_device
from efficientllava.vqa import vqa_accuracy

MODES = ("letter", "likelihood")
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def model_inputs(batch: dict, device=None) -> dict:
    out = {k: batch[k] for k in MODEL_INPUTS}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def letter_token_ids(tokenizer) -> list[int]:
    """The first token of ' A', ' B', ...: what a model answering in letter format emits first."""
    ids = [tokenizer(" " + letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    firsts = [i[0] for i in ids]
    if len(set(firsts)) != len(firsts):  # e.g. a tokenizer that emits a bare space token first
        firsts = [i[-1] for i in ids]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"the tokenizer does not give the letters {LETTERS} distinct tokens: {ids}")
    return firsts


@torch.no_grad()
def predict_letter(model, collator: Collator, records: list[dict], letter_ids: list[int]) -> list[int]:
    batch = collator.prompts(records, [LETTER] * len(records))
    logits = model(**model_inputs(batch, model_device(model))).logits
    return letter_choices(logits, batch, records, letter_ids)


def letter_choices(logits: torch.Tensor, batch: dict, records: list[dict], letter_ids: list[int]) -> list[int]:
    """The option whose letter scores highest at each prompt's last position (letters beyond its choices excluded)."""
    rows = torch.arange(len(records), device=logits.device)
    n_choices = torch.tensor([len(r["choices"]) for r in records], device=logits.device)
    return choose_letter(logits[rows, batch["last_index"].to(logits.device)], n_choices, letter_ids).tolist()


def letter_scores(last: torch.Tensor, n_choices: torch.Tensor, letter_ids: list[int]) -> torch.Tensor:
    """(rows, letters) scores from (rows, vocab) logits at each prompt's last position: each row's own letters (its
    first `n_choices`), -inf beyond them."""
    scores = last[:, letter_ids].float()
    beyond = torch.arange(len(LETTERS), device=last.device)[None, :] >= n_choices.to(last.device)[:, None]
    return scores.masked_fill(beyond, float("-inf"))


def choose_letter(last: torch.Tensor, n_choices: torch.Tensor, letter_ids: list[int]) -> torch.Tensor:
    """Option indices from (rows, vocab) logits at each prompt's last position: the best-scoring letter among the
    first `n_choices` of each row."""
    return letter_scores(last, n_choices, letter_ids).argmax(-1)


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each sequence (labels shifted as in causal LM loss)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def predict_likelihood(model, collator: Collator, records: list[dict]) -> list[int]:
    """The most likely option of each record (answer + EOS after the short-answer prompt; the prompt runs once)."""
    return predict_options(model, option_batch(collator, records)).tolist()


def left_padded(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a right-padded prompt batch, moved to left padding (what generation needs)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out_ids, out_mask = torch.full_like(ids, pad_id), torch.zeros_like(mask)
    width = ids.shape[1]
    for i, n in enumerate(mask.sum(1).tolist()):
        out_ids[i, width - n :] = ids[i, :n]
        out_mask[i, width - n :] = 1
    return out_ids, out_mask


@torch.no_grad()
def generate_from_batch(model, batch: dict, tokenizer, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers (special tokens dropped, stripped) to the prompts of a right-padded prompt batch."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; expected at least 1")
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_padded(batch, pad)
    device = model_device(model)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         pixel_values=batch["pixel_values"].to(device), max_new_tokens=int(max_new_tokens),
                         do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1] :].cpu()]


def generate_answers(model, collator: Collator, records: list[dict], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to open-ended records (the question and the record's instruction, LLaVA-1.5's prompt)."""
    return generate_from_batch(model, collator.prompts(records, [OPEN] * len(records)), collator.tokenizer,
                               max_new_tokens)


def predict(model, collator, records, mode: str, letter_ids=None) -> list[int]:
    if mode == "letter":
        return predict_letter(model, collator, records, letter_ids or letter_token_ids(collator.tokenizer))
    if mode == "likelihood":
        return predict_likelihood(model, collator, records)
    raise ValueError(f"evaluation mode {mode!r} is unknown; expected one of {list(MODES)}")


def summarize(correct: dict[str, list[bool]]) -> dict[str, float]:
    """{'acc': overall, 'acc/<category>': per category} from per-category lists of hits."""
    hits = [h for v in correct.values() for h in v]
    out = {"acc": 100.0 * sum(hits) / max(len(hits), 1), "n": len(hits)}
    for category in sorted(correct):
        out[f"acc/{category}"] = 100.0 * sum(correct[category]) / max(len(correct[category]), 1)
    return out


def gather_by_id(results: dict) -> dict:
    """Merge {record id: result} dicts of every process (DDP); ids seen on several devices count once."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(results)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(results))
    merged = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def open_metric(records) -> str:
    """The one metric of a batch of open-ended records."""
    metrics = {record_metric(r) for r in records}
    if len(metrics) != 1 or CHOICE in metrics:
        raise ValueError(f"records are scored by {sorted(metrics)}; expected open-ended records of one benchmark "
                         "(metric vqa, mmvet or llava_bench)")
    return metrics.pop()


def vqa_summary(rows: list[dict]) -> dict:
    """VQA accuracy in % overall and per category from rows with 'prediction', 'answers', 'category'."""
    correct = defaultdict(list)
    for row in rows:
        correct[row["category"]].append(vqa_accuracy(row["prediction"], row["answers"]))
    return summarize(correct)


def evaluate_open(model, processor, records, max_new_tokens: int = 16, batch_size: int = 16) -> tuple[dict, list]:
    """(VQA summary or {'n'}, prediction rows) for open-ended records; judge-scored ones are scored by judge.py."""
    collator = Collator(processor)
    rows = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        if isinstance(chunk, dict):
            chunk = [dict(zip(chunk, row)) for row in zip(*chunk.values())]
        rows += prediction_rows(chunk, generate_answers(model, collator, chunk, max_new_tokens))
    metric = open_metric(rows)
    return (vqa_summary(rows) if metric == VQA else {"n": len(rows)}), rows


def prediction_rows(records, predictions) -> list[dict]:
    return [{"id": r["id"], "question": r["question"], "prediction": p, "answers": list(r["answers"]),
             "category": r["category"], "metric": record_metric(r), "judge_context": r.get("judge_context", "")}
            for r, p in zip(records, predictions)]


def evaluate(model, processor, records, mode: str = "letter", batch_size: int = 64, progress: bool = False):
    """Accuracy (in %) overall and per category of `model` on `records` (a list or a datasets split)."""
    was_training = model.training
    model.eval()
    collator = Collator(processor)
    letter_ids = letter_token_ids(processor.tokenizer) if mode == "letter" else None
    correct: dict[str, list[bool]] = defaultdict(list)
    starts = range(0, len(records), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"evaluate ({mode})", leave=False)
    for start in starts:
        chunk = records[start : start + batch_size]
        if isinstance(chunk, dict):  # a datasets slice is a dict of columns
            chunk = [dict(zip(chunk, row)) for row in zip(*chunk.values())]
        for record, pred in zip(chunk, predict(model, collator, chunk, mode, letter_ids)):
            correct[record["category"]].append(pred == record["answer"])
    model.train(was_training)
    return summarize(correct)


class AccuracyTally:
    """Hits per (record, mode), merged across devices by record id (DDP-exact); used by every Lightning module.

    Besides the accuracies, `compute` gives the share of predictions that pick the first option (`first`, `first_ll`,
    overall and per category) next to the share of records whose answer is the first option (`answer_first`): a
    model that has not bound its answer to a letter falls back on "A", which shows as `first` far above
    `answer_first` (the toy benchmark draws the answer's position uniformly)."""

    def __init__(self, categories: list[str], modes=MODES):
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"evaluation mode {mode!r} is unknown; expected some of {list(MODES)}")
        self.categories, self.modes = list(categories), list(modes)
        self.reset()

    def reset(self):
        self.records: dict[str, tuple[int, tuple[bool, ...]]] = {}

    def update(self, model, collator, records, letter_ids):
        self.add(records, [predict(model, collator, records, mode, letter_ids) for mode in self.modes])

    def add(self, records, preds: list[list[int]]):
        """Hits of predictions (one list of option indices per mode, in `self.modes` order)."""
        for record in records:
            if record["category"] not in self.categories:
                raise ValueError(f"record {record.get('id')!r} has category {record['category']!r}; "
                                 f"expected one of {self.categories}")
        for i, record in enumerate(records):
            hits = tuple(bool(p[i] == record["answer"]) for p in preds)
            firsts = tuple(bool(p[i] == 0) for p in preds)
            self.records[record["id"]] = (self.categories.index(record["category"]), hits, firsts,
                                          record["answer"] == 0)

    def compute(self, module: pl.LightningModule | None = None) -> dict[str, float]:
        """Accuracies in %; `acc` is letter scoring, `acc_ll` likelihood scoring. Merges devices under DDP."""
        records = self.records
        if module is not None and module.trainer is not None and module.trainer.world_size > 1:
            records = gather_by_id(records)
        hits = torch.zeros(len(self.modes), len(self.categories), dtype=torch.long)
        firsts, count = torch.zeros_like(hits), torch.zeros_like(hits)
        answer_first = torch.zeros(len(self.categories), dtype=torch.long)
        for c, record_hits, record_firsts, is_first in records.values():
            answer_first[c] += int(is_first)
            for m, (hit, first) in enumerate(zip(record_hits, record_firsts)):
                hits[m, c] += int(hit)
                firsts[m, c] += int(first)
                count[m, c] += 1
        results: dict[str, float] = {}

        def shares(key: str, values: torch.Tensor, n: torch.Tensor) -> None:
            results[key] = 100.0 * values.sum().item() / max(n.sum().item(), 1)
            for c, category in enumerate(self.categories):
                if n[c] > 0:
                    results[f"{key}/{category}"] = 100.0 * values[c].item() / n[c].item()

        for m, mode in enumerate(self.modes):
            suffix = "" if mode == "letter" else "_ll"
            shares(f"acc{suffix}", hits[m], count[m])
            shares(f"first{suffix}", firsts[m], count[m])
        shares("answer_first", answer_first, count[0])
        results["n"] = int(count[0].sum().item())
        self.reset()
        return results


class MultipleChoiceEvaluator(pl.LightningModule):
    """Evaluation under a Lightning Trainer (CPU, one GPU or several): batches are lists of records."""

    def __init__(self, model, processor, categories: list[str], modes=MODES):
        super().__init__()
        self.model, self.processor = model, processor
        self.tally = AccuracyTally(categories, modes)
        self.collator = Collator(processor)
        self.letter_ids = letter_token_ids(processor.tokenizer)
        self.results: dict[str, float] = {}

    def _finish(self, stage: str):
        self.results = self.tally.compute(self)
        for key, value in self.results.items():  # the same on every device once merged: logged from one
            self.log(f"{stage}/{key}", float(value), rank_zero_only=True)

    def validation_step(self, records, batch_idx):
        self.model.eval()
        self.tally.update(self.model, self.collator, records, self.letter_ids)

    test_step = validation_step

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")


class OpenEndedEvaluator(pl.LightningModule):
    """Greedy answers to open-ended records under a Lightning Trainer (CPU, one GPU or several).

    After the epoch `predictions` holds one row per record (merged across devices by id) and `results` the VQA
    accuracy (VizWiz) or only the count (judge-scored benchmarks: `judge.score_with_judge` scores the rows)."""

    def __init__(self, model, processor, max_new_tokens: int = 16):
        super().__init__()
        self.model, self.processor = model, processor
        self.collator = Collator(processor)
        self.max_new_tokens = int(max_new_tokens)
        self.rows: dict[str, dict] = {}
        self.predictions: list[dict] = []
        self.results: dict[str, float] = {}

    def test_step(self, records, batch_idx):
        open_metric(records)
        for row in prediction_rows(records, generate_answers(self.model, self.collator, records,
                                                             self.max_new_tokens)):
            self.rows[row["id"]] = row

    validation_step = test_step

    def _finish(self, stage: str):
        rows = gather_by_id(self.rows) if self.trainer is not None and self.trainer.world_size > 1 else self.rows
        self.predictions = sorted(rows.values(), key=lambda r: r["id"])
        self.rows = {}
        if not self.predictions:
            self.results = {"n": 0}
            return
        metric = open_metric(self.predictions)
        self.results = vqa_summary(self.predictions) if metric == VQA else {"n": len(self.predictions)}
        for key, value in self.results.items():
            self.log(f"{stage}/{key}", float(value), rank_zero_only=True)

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")
