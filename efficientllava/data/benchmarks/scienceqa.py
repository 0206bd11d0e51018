"""ScienceQA (Lu et al. 2022), the IMG subset, in the project's multiple-choice schema.

Source schema (the public release and its Hugging Face copy `derek-thomas/ScienceQA`): image (None for text-only
questions), question, choices (2-5 strings), answer (index of the correct choice), hint (the question's context),
task, grade, subject, topic, category, skill, lecture, solution. The paper's number is accuracy on the IMG subset of
the test split (questions with an image, 2,017 of 4,241): rows without an image are dropped. The prompt is
LLaVA-1.5's: "Context: <hint>" (only when there is one), the question, "A. <choice>" lines, then "Answer with the
option's letter from the given choices directly." (`data/prompts.py`, letter format); the score is letter accuracy,
reported per subject (`category`).
"""
from __future__ import annotations

import datasets

from efficientllava.data.benchmarks.adapter import Adapter
from efficientllava.data.schema import FEATURES


def to_record(fields: dict, source_split: str, index: int) -> dict:
    rid = fields.get("id")
    return {
        "id": str(rid) if rid is not None else f"scienceqa-{source_split}-{index:05d}",
        "question": fields["question"],
        "choices": list(fields["choices"]),
        "answer": int(fields["answer"]),
        "hint": fields.get("hint") or "",
        "lecture": fields.get("lecture") or "",
        "category": fields.get("subject") or "all",
        "grade": fields.get("grade") or "",
    }


ADAPTER = Adapter(
    name="scienceqa",
    metric="choice",
    required={"image": ("image",), "question": ("question",), "choices": ("choices",), "answer": ("answer",),
              "hint": ("hint",), "subject": ("subject",)},
    optional={"grade": ("grade",), "lecture": ("lecture",), "id": ("id", "pid")},
    to_record=to_record,
    features=datasets.Features({**FEATURES, "grade": datasets.Value("string")}),
    default_splits={"train": "train", "val": "validation", "test": "test"},
    drop_imageless=True,
)
