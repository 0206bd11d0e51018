"""MM-Vet (Yu et al. 2023) in the project's open-ended schema, scored by a judge model.

Source schema (the official `mm-vet.json`, an object keyed by question id, e.g. "v1_0", with images in `images/`):
imagename (the file), question, answer (the ground truth), capability (a list of "rec", "ocr", "know", "gen", "spat",
"math"). The Hugging Face copy (`lmms-lab/MMVet`) names the image `image` (bytes), the id `question_id` and gives the
capabilities as one comma-separated string; both load. 218 questions, one split. Prompt (LLaVA-1.5): the question
alone. Score: a judge model grades each answer against the ground truth from 0 to 1 (`efficientllava/judge.py`);
the benchmark score is the mean x 100, also per capability.
"""
from __future__ import annotations

from efficientllava.data.benchmarks.adapter import Adapter
from efficientllava.data.schema import OPEN_FEATURES


def capabilities(value) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return sorted({str(c).strip() for c in items if str(c).strip()})


def to_record(fields: dict, source_split: str, index: int) -> dict:
    rid = fields.get("id")
    return {
        "id": str(rid) if rid is not None else f"mmvet-{index:03d}",
        "question": fields["question"],
        "choices": [],
        "answer": -1,
        "answers": [str(fields["answer"])],
        "hint": "",
        "category": ",".join(capabilities(fields.get("capability"))) or "all",
        "metric": "mmvet",
        "instruction": "",
        "judge_context": "",
    }


ADAPTER = Adapter(
    name="mmvet",
    metric="mmvet",
    required={"image": ("image", "imagename"), "question": ("question",), "answer": ("answer",)},
    optional={"capability": ("capability", "capabilities"), "id": ("question_id", "id")},
    to_record=to_record,
    features=OPEN_FEATURES,
    default_splits={"test": "test"},
)
