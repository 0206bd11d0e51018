"""VizWiz-VQA (Gurari et al. 2018) in the project's open-ended schema, scored by VQA accuracy.

Source schema (the official annotation files, e.g. `Annotations/val.json`, a list of): image (the file name, e.g.
"VizWiz_val_00000000.jpg", found under `image_root`), question, answers (10 human answers, each
{"answer": str, "answer_confidence": "yes" | "maybe" | "no"}), answerable (0/1), answer_type ("other", "yes/no",
"number", "unanswerable"). Copies that store the answers as plain strings, or the image as bytes, load as well.
The test split publishes no answers (scored by the challenge server): only train and val can be scored here.
Prompt (LLaVA-1.5): the question, then "When the provided information is insufficient, respond with
'Unanswerable'." and "Answer the question using a single word or phrase."; the generated answer is scored against
the 10 human answers (`efficientllava/vqa.py`), reported per answer_type.
"""
from __future__ import annotations

from pathlib import PurePath

from efficientllava.data.benchmarks.adapter import Adapter
from efficientllava.data.schema import OPEN_FEATURES, RecordError, VQA

INSTRUCTION = ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
               "Answer the question using a single word or phrase.")


def human_answers(value, rid: str) -> list[str]:
    """The answers as strings, from {"answer": ...} objects or plain strings."""
    if not isinstance(value, (list, tuple)) or not value:
        raise RecordError(f"record {rid!r} has answers {value!r}; expected a non-empty list of human answers")
    out = []
    for a in value:
        if isinstance(a, dict) and isinstance(a.get("answer"), str):
            out.append(a["answer"])
        elif isinstance(a, str):
            out.append(a)
        else:
            raise RecordError(f"record {rid!r} has a human answer {a!r}; expected a string or "
                              "{'answer': str, 'answer_confidence': str}")
    return out


def to_record(fields: dict, source_split: str, index: int) -> dict:
    rid = fields.get("id")
    image = fields["image"]
    if rid is None and isinstance(image, str):
        rid = PurePath(image).stem
    rid = str(rid) if rid is not None else f"vizwiz-{source_split}-{index:05d}"
    return {
        "id": rid,
        "question": fields["question"],
        "choices": [],
        "answer": -1,
        "answers": human_answers(fields["answers"], rid),
        "hint": "",
        "category": fields.get("answer_type") or "all",
        "metric": VQA,
        "instruction": INSTRUCTION,
        "judge_context": "",
    }


ADAPTER = Adapter(
    name="vizwiz",
    metric=VQA,
    required={"image": ("image",), "question": ("question",), "answers": ("answers",)},
    optional={"answer_type": ("answer_type", "category"), "id": ("question_id", "id")},
    to_record=to_record,
    features=OPEN_FEATURES,
    default_splits={"train": "train", "val": "val"},
)
