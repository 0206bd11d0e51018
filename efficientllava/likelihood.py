"""Option likelihood of multiple-choice answers, with one pass over each prompt.

The score of an option is log p(' ' + option, EOS | prompt): the sum of its answer tokens' log-probabilities, exactly
what a forward over the whole sequence prompt + answer gives (`evaluation.answer_logprob`). The prompt (image tokens
and question: most of the sequence, 576 image tokens of ~640 for LLaVA-1.5) does not depend on the option, so it runs
once, keeping its key/value cache; each option index k then runs only its answer tokens over that cache (their
rotary positions continue each row's prompt; the prompt's right padding is masked out), and the cache is cut back to
the prompt before the next option. The cost falls from (options) x (prompt + answer) tokens to prompt + (options) x
answer tokens per record. Visual-token pruning (FastV) ranks image tokens from each prompt's last token, as in
generation, and its pruned cache is cut back layer by layer.
"""
from __future__ import annotations

import torch

from efficientllava.data.collate import Collator
from efficientllava.data.prompts import SHORT
from efficientllava.models import cache_argument, model_device

PROMPT_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def _cut(cache, tokens: int) -> None:
    """Drop the last `tokens` positions of every layer's keys and values (layers may hold different lengths)."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., : layer.keys.shape[-2] - tokens, :]
        layer.values = layer.values[..., : layer.values.shape[-2] - tokens, :]


@torch.no_grad()
def option_logprobs(model, batch: dict) -> torch.Tensor:
    """(records, most options) log-probabilities of each option's answer tokens given its prompt; -inf where a
    record has fewer options. `batch` is a `Collator.options` batch."""
    for key in ("option_ids", "option_lengths", "last_index"):
        if key not in batch:
            raise KeyError(f"option_logprobs needs a Collator.options batch; this one has no {key!r}")
    device = model_device(model)
    prompt_mask = batch["attention_mask"].to(device)
    out = model.model(**{k: batch[k].to(device) for k in PROMPT_INPUTS}, use_cache=True)
    hidden, cache = out.last_hidden_state, out.past_key_values
    cache_name = cache_argument(model.model)
    rows = torch.arange(hidden.shape[0], device=device)
    last = batch["last_index"].to(device)
    first = torch.log_softmax(model.lm_head(hidden[rows, last]).float(), -1)  # predicts each answer's first token
    ids, lengths = batch["option_ids"].to(device), batch["option_lengths"].to(device)
    n_options, width = ids.shape[1], ids.shape[2]
    steps = torch.arange(width, device=device)
    positions = (last + 1)[:, None] + steps[None, : width - 1]  # answer token j sits at prompt length + j
    scores = torch.full((len(rows), n_options), float("-inf"), device=device)
    for k in range(n_options):
        tokens, length = ids[:, k], lengths[:, k]
        score = first.gather(1, tokens[:, :1]).squeeze(1)
        if width > 1:  # feed answer tokens 0..width-2; position j predicts token j + 1
            feed_mask = (steps[None, : width - 1] < length[:, None] - 1).long()
            h = model.model(input_ids=tokens[:, :-1], attention_mask=torch.cat([prompt_mask, feed_mask], 1),
                            position_ids=positions, **{cache_name: cache}, use_cache=True).last_hidden_state
            _cut(cache, width - 1)
            r, c = torch.nonzero(feed_mask.bool(), as_tuple=True)
            logp = torch.log_softmax(model.lm_head(h[r, c]).float(), -1)
            score = score.index_add(0, r, logp.gather(1, tokens[r, c + 1].unsqueeze(1)).squeeze(1))
        scores[:, k] = torch.where(length > 0, score, torch.full_like(score, float("-inf")))
    return scores


@torch.no_grad()
def predict_options(model, batch: dict) -> torch.Tensor:
    """The index of the most likely option of each record of a `Collator.options` batch."""
    was_training = model.training
    model.eval()
    try:
        return option_logprobs(model, batch).argmax(-1)
    finally:
        model.train(was_training)


def option_batch(collator: Collator, records: list[dict]) -> dict:
    """The short-answer prompts of `records` with every option beside them."""
    return collator.options(records, [SHORT] * len(records))
