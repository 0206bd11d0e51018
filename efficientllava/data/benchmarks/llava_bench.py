"""LLaVA-Bench (In-the-Wild) (Liu et al. 2023) in the project's open-ended schema, scored by a judge model.

Source schemas: the original release (`liuhaotian/llava-bench-in-the-wild`: `questions.jsonl` with question_id,
image, text, category; `context.jsonl` with image, caption; `answers_gpt4.jsonl` with question_id, text; images in
`images/`), read by joining the three files, or a flat copy (`lmms-lab/llava-bench-in-the-wild`: question_id,
question, image, caption, gpt_answer, category). 60 questions in three categories (conv, detail, complex).
Prompt (LLaVA-1.5): the question alone. Score: a judge model, shown the image's caption, rates the reference (GPT-4)
answer and the model's answer from 1 to 10; the benchmark score is 100 x the model's mean / the reference's mean,
overall and per category (`efficientllava/judge.py`).
"""
from __future__ import annotations

from pathlib import Path

from efficientllava.data.benchmarks.adapter import Adapter
from efficientllava.data.benchmarks.sources import BenchmarkSourceError
from efficientllava.data.schema import OPEN_FEATURES

ORIGINAL_FILES = ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl")


def to_record(fields: dict, source_split: str, index: int) -> dict:
    rid = fields.get("id")
    return {
        "id": str(rid) if rid is not None else f"llava_bench-{index:03d}",
        "question": fields["question"],
        "choices": [],
        "answer": -1,
        "answers": [str(fields["reference"])],
        "hint": "",
        "category": fields.get("category") or "all",
        "metric": "llava_bench",
        "instruction": "",
        "judge_context": fields.get("caption") or "",
    }


def _jsonl(path: Path, cache_dir) -> list[dict]:
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir).to_list()


def read_original(path: str, split: str, cache_dir=None):
    """The original three-file release joined into flat rows; None when `path` is not laid out that way."""
    import datasets

    root = Path(str(path)).expanduser().resolve()
    if not root.is_dir() or not (root / "questions.jsonl").is_file():
        return None
    missing = [f for f in ORIGINAL_FILES if not (root / f).is_file()]
    if missing:
        raise BenchmarkSourceError(f"LLaVA-Bench directory '{root}' has questions.jsonl but lacks {missing}; "
                                   f"expected all of {list(ORIGINAL_FILES)}")
    captions = {c["image"]: c.get("caption", "") for c in _jsonl(root / "context.jsonl", cache_dir)}
    answers = {a["question_id"]: a["text"] for a in _jsonl(root / "answers_gpt4.jsonl", cache_dir)}
    rows = []
    for q in _jsonl(root / "questions.jsonl", cache_dir):
        if q["question_id"] not in answers:
            raise BenchmarkSourceError(f"LLaVA-Bench question {q['question_id']!r} has no reference answer in "
                                       f"'{root / 'answers_gpt4.jsonl'}'; expected one per question")
        rows.append({"question_id": str(q["question_id"]), "image": str(root / "images" / q["image"]),
                     "question": q["text"], "category": q.get("category", ""),
                     "caption": captions.get(q["image"], ""), "gpt_answer": answers[q["question_id"]]})
    return datasets.Dataset.from_list(rows)


ADAPTER = Adapter(
    name="llava_bench",
    metric="llava_bench",
    required={"image": ("image",), "question": ("question", "text"), "reference": ("gpt_answer", "answer")},
    optional={"caption": ("caption", "context"), "category": ("category",), "id": ("question_id", "id")},
    to_record=to_record,
    features=OPEN_FEATURES,
    default_splits={"test": "train"},
    read_source=read_original,
)
