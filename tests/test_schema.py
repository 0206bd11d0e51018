import io

import pytest
from PIL import Image

from efficientllava.data.schema import RecordError, check_record, decode_image


def record(**overrides):
    base = {
        "id": "r1",
        "image": Image.new("RGB", (32, 32)),
        "question": "What color is the circle?",
        "choices": ["red", "blue"],
        "answer": 0,
        "hint": "",
        "category": "colour",
        "split": "test",
    }
    base.update(overrides)
    return base


def test_valid_record_passes():
    check_record(record())


def test_missing_field_is_named():
    bad = record()
    del bad["choices"]
    with pytest.raises(RecordError, match=r"'r1' is missing field\(s\) \['choices'\]"):
        check_record(bad)


@pytest.mark.parametrize("answer", [2, -1, "0", 1.0, True])
def test_answer_index_out_of_range(answer):
    with pytest.raises(RecordError, match=r"answer index .*expected an integer in \[0, 1\]"):
        check_record(record(answer=answer))


@pytest.mark.parametrize("choices", [["red"], [], ["a", "b", "c", "d", "e", "f"], "red"])
def test_wrong_number_of_choices(choices):
    with pytest.raises(RecordError, match="choices; expected a list of 2 to 5"):
        check_record(record(choices=choices, answer=0))


def test_undecodable_image_is_named():
    with pytest.raises(RecordError, match="'r1': image could not be decoded"):
        decode_image(record(image={"bytes": b"not an image", "path": None}))


def test_missing_image_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(RecordError, match="does not exist"):
        decode_image(record(image={"bytes": None, "path": missing}))


def test_png_bytes_decode():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    assert decode_image(record(image={"bytes": buf.getvalue(), "path": None})).getpixel((0, 0)) == (255, 0, 0)
