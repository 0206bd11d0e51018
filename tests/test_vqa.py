"""VQA accuracy: the annotation normalization and the leave-one-out min(1, matches / 3) average."""
import pytest

from efficientllava.vqa import normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, normal", [
    ("The Dog.", "dog"),
    ("two", "2"),
    ("  Navy-Blue!  ", "navy blue"),
    ("3.5", "3.5"),
    ("dont know", "don't know"),
    ("an apple", "apple"),
    ("Unanswerable", "unanswerable"),
])
def test_normalization(raw, normal):
    assert normalize_answer(raw) == normal


def leave_one_out(k: int, n: int = 10) -> float:
    """The definition, written out: k of n humans gave the predicted answer."""
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n


@pytest.mark.parametrize("k", range(0, 11))
def test_accuracy_is_the_leave_one_out_average(k):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(leave_one_out(k))


def test_known_values_and_normalized_matching():
    humans = ["2", "two", "2", "3", "2", "2", "2", "2", "two", "2"]
    assert vqa_accuracy("Two.", humans) == pytest.approx(1.0)  # 9 of 10 say "2" once normalized
    assert vqa_accuracy("3", humans) == pytest.approx(0.3)  # one human: 9/10 x 1/3
    assert vqa_accuracy("4", humans) == 0.0
    assert vqa_accuracy("unanswerable", ["unanswerable"] * 10) == 1.0


def test_no_human_answer_is_an_error():
    with pytest.raises(ValueError, match="needs at least one human answer"):
        vqa_accuracy("cat", [])
