"""The project's benchmark schema (ScienceQA-shaped) and the check every record passes before it is used.

Two kinds of record share it. Multiple choice (the toy, ScienceQA): `choices` and the gold index `answer`, scored by
option letter. Open-ended (VizWiz, MM-Vet, LLaVA-Bench): no choices, `answer` = -1, the reference answers in
`answers`, and `metric` says how a generated answer is scored: "vqa" (VQA accuracy over the human answers) or a
judge model's rubric ("mmvet", "llava_bench"). `instruction` is the benchmark's own line after the question (LLaVA-1.5's
prompt for it); `judge_context` is what only the judge sees (LLaVA-Bench's image caption).
"""
from __future__ import annotations

import io

import datasets
from PIL import Image

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int64"),
        "hint": datasets.Value("string"),
        "lecture": datasets.Value("string"),  # optional background text; the toy's describes the scene
        "category": datasets.Value("string"),
        "split": datasets.Value("string"),
    }
)
OPTIONAL = ("lecture",)
REQUIRED = tuple(f for f in FEATURES if f not in OPTIONAL)
MIN_CHOICES, MAX_CHOICES = 2, 5

CHOICE = "choice"
VQA = "vqa"
JUDGED = ("mmvet", "llava_bench")
METRICS = (CHOICE, VQA, *JUDGED)
OPEN_FEATURES = datasets.Features(
    {
        **{k: v for k, v in FEATURES.items() if k != "lecture"},
        "answers": datasets.Sequence(datasets.Value("string")),
        "metric": datasets.Value("string"),
        "instruction": datasets.Value("string"),
        "judge_context": datasets.Value("string"),
    }
)


def record_metric(record: dict) -> str:
    """How the record is scored: "choice" unless it says otherwise."""
    metric = record.get("metric") or CHOICE
    if metric not in METRICS:
        raise RecordError(f"record {record.get('id', '<no id>')!r} has metric {metric!r}; expected one of "
                          f"{list(METRICS)}")
    return metric


class RecordError(ValueError):
    """A benchmark record that does not fit the schema."""


def check_record(record: dict) -> None:
    """Raise RecordError naming the record and what is wrong with it."""
    rid = record.get("id", "<no id>")
    missing = [f for f in REQUIRED if f not in record]
    if missing:
        raise RecordError(f"record {rid!r} is missing field(s) {missing}; expected fields {list(REQUIRED)}")
    if record_metric(record) != CHOICE:
        answers = record.get("answers")
        if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
            raise RecordError(f"open-ended record {rid!r} has answers {answers!r}; expected a non-empty list of "
                              "reference answers (strings)")
        return
    choices = record["choices"]
    if not isinstance(choices, (list, tuple)) or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        n = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
        raise RecordError(f"record {rid!r} has {n} choices; expected a list of {MIN_CHOICES} to {MAX_CHOICES}")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise RecordError(
            f"record {rid!r} has answer index {answer!r}; expected an integer in [0, {len(choices) - 1}]"
        )


def decode_image(record: dict) -> Image.Image:
    """The record's image as RGB; an undecodable image raises RecordError naming the record."""
    image = record["image"]
    rid = record.get("id", "<no id>")
    try:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, dict) and image.get("bytes") is not None:
            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        if isinstance(image, dict) and image.get("path"):
            return Image.open(image["path"]).convert("RGB")
        if isinstance(image, (str, bytes)):
            return Image.open(image if isinstance(image, str) else io.BytesIO(image)).convert("RGB")
    except FileNotFoundError as err:
        raise RecordError(f"record {rid!r}: image file {err.filename!r} does not exist") from err
    except Exception as err:  # PIL raises several types for corrupt data
        raise RecordError(f"record {rid!r}: image could not be decoded ({err}); expected a PNG/JPEG image") from err
    raise RecordError(f"record {rid!r}: image is a {type(image).__name__}; expected a PIL image, bytes or a path")
