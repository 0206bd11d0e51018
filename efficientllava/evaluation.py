"""Multiple-choice evaluation of any LLaVA: by the option letter at the answer position, or by option likelihood.

`letter`: the prompt lists the options; the prediction is the option whose letter gets the highest logit at the
first answer position (only the record's own letters compete). `likelihood`: the short-answer prompt (no options);
the prediction is the option whose text + EOS has the highest total log-probability. Both are batched and run
under `torch.no_grad` in eval mode, so they are deterministic.
"""
from __future__ import annotations

from collections import defaultdict

import pytorch_lightning as pl
import torch

from efficientllava.data.collate import IGNORE, Collator
from efficientllava.data.prompts import LETTER, LETTERS, SHORT

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


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def predict_letter(model, collator: Collator, records: list[dict], letter_ids: list[int]) -> list[int]:
    batch = collator.prompts(records, [LETTER] * len(records))
    logits = model(**model_inputs(batch, _device(model))).logits
    rows = torch.arange(len(records), device=logits.device)
    last = logits[rows, batch["last_index"].to(logits.device)][:, letter_ids].float()
    n_choices = torch.tensor([len(r["choices"]) for r in records], device=logits.device)
    last[torch.arange(len(LETTERS), device=logits.device)[None, :] >= n_choices[:, None]] = float("-inf")
    return last.argmax(-1).tolist()


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each sequence (labels shifted as in causal LM loss)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


@torch.no_grad()
def predict_likelihood(model, collator: Collator, records: list[dict]) -> list[int]:
    flat, targets, owner = [], [], []
    for i, r in enumerate(records):
        for choice in r["choices"]:
            flat.append(r)
            targets.append(choice)
            owner.append(i)
    batch = collator.answers(flat, [SHORT] * len(flat), targets=targets)
    logits = model(**model_inputs(batch, _device(model))).logits
    scores = answer_logprob(logits, batch["labels"].to(logits.device)).cpu()
    best = [(-float("inf"), 0)] * len(records)
    seen = defaultdict(int)
    for score, i in zip(scores.tolist(), owner):
        k = seen[i]
        seen[i] += 1
        if score > best[i][0]:
            best[i] = (score, k)
    return [k for _, k in best]


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
    """Hits and counts per (mode, category), reducible across devices; used by every Lightning module here."""

    def __init__(self, categories: list[str], modes=MODES):
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"evaluation mode {mode!r} is unknown; expected some of {list(MODES)}")
        self.categories, self.modes = list(categories), list(modes)
        self.reset()

    def reset(self):
        self.hits = torch.zeros(len(self.modes), len(self.categories), dtype=torch.long)
        self.count = torch.zeros_like(self.hits)

    def update(self, model, collator, records, letter_ids):
        for m, mode in enumerate(self.modes):
            for record, pred in zip(records, predict(model, collator, records, mode, letter_ids)):
                if record["category"] not in self.categories:
                    raise ValueError(f"record {record.get('id')!r} has category {record['category']!r}; "
                                     f"expected one of {self.categories}")
                c = self.categories.index(record["category"])
                self.hits[m, c] += int(pred == record["answer"])
                self.count[m, c] += 1

    def compute(self, module: pl.LightningModule | None = None) -> dict[str, float]:
        """Accuracies in %; `acc` is letter scoring, `acc_ll` likelihood scoring. Sums over devices under DDP."""
        hits, count = self.hits, self.count
        if module is not None and module.trainer is not None and module.trainer.world_size > 1:
            hits = module.all_gather(hits.to(module.device)).sum(0).cpu()
            count = module.all_gather(count.to(module.device)).sum(0).cpu()
        results: dict[str, float] = {}
        for m, mode in enumerate(self.modes):
            key = "acc" if mode == "letter" else "acc_ll"
            results[key] = 100.0 * hits[m].sum().item() / max(count[m].sum().item(), 1)
            for c, category in enumerate(self.categories):
                if count[m, c] > 0:
                    results[f"{key}/{category}"] = 100.0 * hits[m, c].item() / count[m, c].item()
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
        for key, value in self.results.items():
            self.log(f"{stage}/{key}", float(value))

    def validation_step(self, records, batch_idx):
        self.model.eval()
        self.tally.update(self.model, self.collator, records, self.letter_ids)

    test_step = validation_step

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")
