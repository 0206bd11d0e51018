"""Turning benchmark records into model batches with any LLaVA processor.

Three kinds of batch: `answer` batches hold prompt + target answer + EOS with labels on the answer only (training,
projector optimisation); `prompt` batches hold the prompt alone (letter scoring reads the logits at its last
position); `option` batches are prompt batches plus every option's answer tokens beside them (option-likelihood
scoring runs the prompt once, see `efficientllava/likelihood.py`). Sequences are right-padded; `last_index` marks
each prompt's last token.
"""
from __future__ import annotations

import numpy as np
import torch

from efficientllava.data.prompts import build_prompt, build_target, wrap_prompt
from efficientllava.data.schema import check_record, decode_image

IGNORE = -100


class Collator:
    def __init__(self, processor, validate: bool = True):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.validate = validate
        self.image_token = getattr(processor, "image_token", "<image>")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _encode_prompts(self, records: list[dict], formats: list[str]):
        if self.validate:
            for record in records:
                check_record(record)
        images = [decode_image(r) for r in records]
        prompts = [wrap_prompt(self.processor, build_prompt(r, f), self.image_token) for r, f in zip(records, formats)]
        enc = self.processor(images=images, text=prompts, return_tensors=None, padding=False)
        return enc["input_ids"], torch.as_tensor(np.stack(enc["pixel_values"]))

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    def prompts(self, records: list[dict], formats: list[str]) -> dict:
        ids, pixels = self._encode_prompts(records, formats)
        return {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([[1] * len(s) for s in ids], 0),
            "pixel_values": pixels,
            "last_index": torch.tensor([len(s) - 1 for s in ids]),
        }

    def answer_ids(self, targets: list[str]) -> list[list[int]]:
        """The tokens an answer batch appends to a prompt for each target: ' ' + target, then EOS."""
        eos = self.tokenizer.eos_token_id
        return [a + [eos] for a in self.tokenizer([" " + t for t in targets], add_special_tokens=False)["input_ids"]]

    def options(self, records: list[dict], formats: list[str]) -> dict:
        """A prompt batch plus `option_ids` (records, most options, longest answer) holding each option's answer
        tokens as `answers(..., targets=option)` appends them, and `option_lengths` (0 where a record has fewer
        options)."""
        batch = self.prompts(records, formats)
        tokens = [self.answer_ids(list(r["choices"])) for r in records]
        k = max(len(t) for t in tokens)
        width = max(len(a) for t in tokens for a in t)
        ids = torch.full((len(records), k, width), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(records), k, dtype=torch.long)
        for i, options in enumerate(tokens):
            for j, answer in enumerate(options):
                ids[i, j, : len(answer)] = torch.tensor(answer)
                lengths[i, j] = len(answer)
        return {**batch, "option_ids": ids, "option_lengths": lengths}

    def answers(self, records: list[dict], formats: list[str], targets: list[str] | None = None) -> dict:
        """Prompt + answer + EOS; `targets` overrides the gold answers (used to score every option)."""
        ids, pixels = self._encode_prompts(records, formats)
        if targets is None:
            targets = [build_target(r, f) for r, f in zip(records, formats)]
        answer_ids = self.answer_ids(targets)
        full = [p + a for p, a in zip(ids, answer_ids)]
        labels = [[IGNORE] * len(p) + a for p, a in zip(ids, answer_ids)]
        return {
            "input_ids": self._pad(full, self.pad_id),
            "attention_mask": self._pad([[1] * len(s) for s in full], 0),
            "pixel_values": pixels,
            "labels": self._pad(labels, IGNORE),
            "last_index": torch.tensor([len(p) - 1 for p in ids]),
        }
