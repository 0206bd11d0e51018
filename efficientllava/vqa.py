"""VQA accuracy (VQA v2 / VizWiz): a generated answer against the human answers of a question.

Answers are compared after the normalization the VQA annotations went through: lower case, punctuation removed (a
period only survives as a decimal point), number words zero..ten written as digits, the articles a/an/the dropped,
and common contractions given their apostrophe ("dont" -> "don't"). A prediction's accuracy against n human answers is
the mean over the n ways of leaving one human out of min(1, matches among the other n - 1 / 3): an answer three
people gave is fully right, one given by a single person is one third right. VizWiz questions that cannot be answered
carry the human answer "unanswerable" (LLaVA-1.5's prompt asks for it by name), compared like any other.
"""
from __future__ import annotations

import re

NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "shouldnt": "shouldn't",
    "wasnt": "wasn't", "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
    "thats": "that's", "whats": "what's", "theyre": "they're", "im": "i'm", "ive": "i've", "its": "it's",
}
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_PUNCTUATION = re.compile(r"[^\w\s'.]|_")


def normalize_answer(answer: str) -> str:
    """The comparable form of an answer: see the module docstring."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DECIMAL_POINT.sub("decimalpoint", text)  # a word: survives the punctuation pass
    text = _PUNCTUATION.sub(" ", text).replace(".", " ").replace("decimalpoint", ".")
    words = []
    for word in text.split():
        word = word.strip("'")
        word = NUMBERS.get(word, word)
        word = CONTRACTIONS.get(word, word)
        if word and word not in ARTICLES:
            words.append(word)
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers (normally ten)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer; the record has none")
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in answers]
    if len(humans) == 1:
        return float(pred == humans[0])
    total = 0.0
    for i in range(len(humans)):
        matches = sum(1 for j, h in enumerate(humans) if j != i and h == pred)
        total += min(1.0, matches / 3.0)
    return total / len(humans)
