"""LLaVA-1.5's answer formats: short answer, lettered multiple choice, and open-ended (the benchmark's own line)."""
from __future__ import annotations

from collections import Counter

LETTERS = "ABCDE"
SHORT = "short"
LETTER = "letter"
DESCRIBE = "describe"  # training only: caption the image (the record's `lecture`), LLaVA's stage-1 alignment task
OPEN = "open"  # open-ended benchmarks: the question, then the record's `instruction` (VizWiz's; none for MM-Vet)
FORMATS = (SHORT, LETTER, DESCRIBE, OPEN)
INSTRUCTIONS = {
    SHORT: "Answer the question using a single word or phrase.",
    LETTER: "Answer with the option's letter from the given choices directly.",
    DESCRIBE: "Describe the image.",
}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"answer format {fmt!r} is unknown; expected one of {list(FORMATS)}")
    return fmt


LLAVA15_TEMPLATE = "USER: {image}\n{text} ASSISTANT:"


def build_prompt(record: dict, fmt: str) -> str:
    """The user's text: context, question, lettered options (letter format only) and the format's instruction.

    Where the image goes is the model's business: `wrap_prompt` applies the processor's chat template.
    """
    check_format(fmt)
    if fmt == DESCRIBE:
        return INSTRUCTIONS[DESCRIBE]
    lines = []
    if record.get("hint"):
        lines.append(f"Context: {record['hint']}")
    lines.append(record["question"])
    if fmt == LETTER:
        lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(record["choices"])]
    if fmt == OPEN:
        if record.get("instruction"):
            lines.append(record["instruction"])
    else:
        lines.append(INSTRUCTIONS[fmt])
    return "\n".join(lines)


def wrap_prompt(processor, text: str, image_token: str = "<image>") -> str:
    """One user turn holding an image and `text`, up to the assistant's answer, in the processor's chat template
    (LLaVA-1.5's 'USER: <image>\\n... ASSISTANT:' when it has none)."""
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return LLAVA15_TEMPLATE.format(image=image_token, text=text)


def build_target(record: dict, fmt: str) -> str:
    """What the assistant should answer: the option's letter, or the option's text."""
    check_format(fmt)
    if fmt == DESCRIBE:
        if not record.get("lecture"):
            raise ValueError(f"record {record.get('id')!r} has no lecture to train the describe format on")
        return record["lecture"]
    if fmt == OPEN:
        return consensus_answer(record)
    return LETTERS[record["answer"]] if fmt == LETTER else record["choices"][record["answer"]]


def consensus_answer(record: dict) -> str:
    """The most frequent reference answer of an open-ended record (ties: the first given); the training target
    for projector rounds and calibration."""
    answers = record.get("answers") or []
    if not answers:
        raise ValueError(f"record {record.get('id')!r} has no reference answers; expected an open-ended record")
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))
