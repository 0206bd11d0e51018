"""LLaVA-1.5's two answer formats: short answer and lettered multiple choice."""
from __future__ import annotations

LETTERS = "ABCDE"
SHORT = "short"
LETTER = "letter"
FORMATS = (SHORT, LETTER)
INSTRUCTIONS = {
    SHORT: "Answer the question using a single word or phrase.",
    LETTER: "Answer with the option's letter from the given choices directly.",
}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"answer format {fmt!r} is unknown; expected one of {list(FORMATS)}")
    return fmt


def build_prompt(record: dict, fmt: str, image_token: str = "<image>") -> str:
    """The user turn up to 'ASSISTANT:'; the letter format lists the options, the short format does not."""
    check_format(fmt)
    lines = [f"USER: {image_token}"]
    if record.get("hint"):
        lines.append(f"Context: {record['hint']}")
    lines.append(record["question"])
    if fmt == LETTER:
        lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(record["choices"])]
    lines.append(INSTRUCTIONS[fmt] + " ASSISTANT:")
    return "\n".join(lines)


def build_target(record: dict, fmt: str) -> str:
    """What the assistant should answer: the option's letter, or the option's text."""
    check_format(fmt)
    return LETTERS[record["answer"]] if fmt == LETTER else record["choices"][record["answer"]]
