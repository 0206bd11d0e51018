"""experiments/letter_binding.py: every layout states the answer and asks for its letter; a short run
reports a val curve; bad layouts are named."""

import pytest

from efficientllava.data.prompts import LETTERS
from efficientllava.data.toy_benchmark import generate_split
from efficientllava.toy_model import ToyArchitecture, build_tokenizer

from experiment_scripts import load_experiment

letter_binding = load_experiment("letter_binding")


@pytest.fixture(scope="module")
def records():
    cols = generate_split("val", 40, 0)
    return [{k: cols[k][i] for k in ("question", "choices", "answer", "hint", "category")} for i in range(40)]


@pytest.mark.parametrize("layout", list(letter_binding.LAYOUTS))
def test_every_layout_states_the_answer_and_targets_its_letter(layout, records):
    tokenizer = build_tokenizer()
    examples = letter_binding.encode(tokenizer, records, layout)
    for record, example in zip(records, examples):
        tokens = tokenizer.convert_ids_to_tokens(example["ids"])
        answer = tokenizer.tokenize(record["choices"][record["answer"]])
        assert "<unk>" not in tokens
        assert tokenizer.convert_ids_to_tokens(example["target"]) == LETTERS[record["answer"]]
        assert example["n_choices"] == len(record["choices"])
        # the answer is written twice: as its option and as the stated answer
        starts = [i for i in range(len(tokens)) if tokens[i:i + len(answer)] == answer]
        assert len(starts) >= 2, (layout, tokens)
        if layout == "answer_last":
            assert tokens[-len(answer):] == answer


def test_a_short_run_reports_its_val_curve(records):
    arch = ToyArchitecture(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    row = letter_binding.run_layout("answer_last", records, records[:10], arch, steps=4, eval_every=2,
                                    batch_size=8, progress=False)
    assert [step for step, _ in row["curve"]] == [2, 4]
    assert all(0.0 <= acc <= 1.0 for _, acc in row["curve"])
    assert row["prompt_tokens"] > 5


def test_the_prompt_loss_adds_the_next_token_loss_over_the_prompt(records):
    """--lm-weight w: the training loss is the letter loss + w x the next-token loss over the whole prompt."""
    import torch

    tokenizer = build_tokenizer()
    examples = letter_binding.encode(tokenizer, records[:6], "toy_prompt")
    batch = letter_binding.collate(examples, tokenizer.pad_token_id)
    arch = ToyArchitecture(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    from transformers import LlamaForCausalLM

    from efficientllava.toy_model import text_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(text_config(arch, len(tokenizer)))
    letter_ids = [tokenizer.convert_tokens_to_ids(c) for c in LETTERS]
    plain = letter_binding.LetterBinding(model, letter_ids, 1e-3, 1).training_step(batch, 0)
    weighted = letter_binding.LetterBinding(model, letter_ids, 1e-3, 1, lm_weight=0.5).training_step(batch, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lm = [torch.nn.functional.cross_entropy(logits[i, t - 1], batch["input_ids"][i, t])
          for i in range(len(examples)) for t in range(1, int(batch["attention_mask"][i].sum()))]
    assert float(weighted - plain) == pytest.approx(0.5 * float(torch.stack(lm).mean()), rel=1e-4)


@pytest.mark.parametrize("layout, steps, message", [("answer_middle", 4, "answer_middle"), ("answer_last", 0, "steps")])
def test_bad_arguments_are_named(records, layout, steps, message):
    with pytest.raises(ValueError, match=message):
        letter_binding.run_layout(layout, records, records, ToyArchitecture(), steps=steps, eval_every=1)
