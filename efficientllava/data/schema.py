"""The project's benchmark schema (ScienceQA-shaped) and the check every record passes before it is used."""
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


class RecordError(ValueError):
    """A benchmark record that does not fit the schema."""


def check_record(record: dict) -> None:
    """Raise RecordError naming the record and what is wrong with it."""
    rid = record.get("id", "<no id>")
    missing = [f for f in REQUIRED if f not in record]
    if missing:
        raise RecordError(f"record {rid!r} is missing field(s) {missing}; expected fields {list(REQUIRED)}")
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
