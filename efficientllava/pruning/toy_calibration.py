"""Calibration batches of toy prompts, from given records or built in memory (no cache), for tests and benchmarks."""
from __future__ import annotations

import copy
from functools import lru_cache

from efficientllava.data.collate import Collator


def toy_records(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    from PIL import Image

    from efficientllava.data.toy_benchmark import generate_split

    columns = generate_split(split, n, seed)
    records = [{k: columns[k][i] for k in columns} for i in range(n)]
    for record in records:
        record["image"] = Image.fromarray(record["image"])
    return records


def prompt_batches(processor, records, batch_size: int = 32) -> list[dict]:
    """`records`' prompts in batches, alternating letter and short-answer formats (so batches hold padding)."""
    collator = Collator(processor)
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        formats = ["letter" if (start + i) % 2 == 0 else "short" for i in range(len(chunk))]
        batches.append(collator.prompts(chunk, formats))
    return batches


def toy_batches(processor, n: int = 8, batch_size: int = 4, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` toy prompts in batches (`prompt_batches`), built in memory."""
    return prompt_batches(processor, toy_records(n, split, seed), batch_size)


@lru_cache(maxsize=2)
def _cached_toy(seed: int, n: int, batch_size: int):
    from efficientllava.toy_model import build_toy_llava

    model, processor = build_toy_llava(seed=seed)
    return model.eval(), processor, toy_batches(processor, n, batch_size)


def toy_model_and_batches(seed: int = 0, n: int = 8, batch_size: int = 4):
    """(model, processor, batches): a fresh copy of a cached random toy LLaVA, and its calibration batches."""
    model, processor, batches = _cached_toy(seed, n, batch_size)
    return copy.deepcopy(model), processor, batches
