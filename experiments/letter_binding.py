"""Can the toy's language model learn the last step of the lettered format: from an answer to its option's letter?

Toys trained on the letter alone answer the lettered format at chance (README). This separates the binding step
from seeing: the toy's language model (architecture from conf/train.yaml), text only, trained from scratch on the
toy benchmark's questions and options with the correct option's text written into the prompt, so the answer never
has to be worked out; only its letter has to be found. One prompt layout per run:

    python experiments/letter_binding.py                                  # every layout, 2,500 steps each
    python experiments/letter_binding.py --layouts answer_last --steps 500
    python experiments/letter_binding.py --layouts toy_prompt --lm-weight 1.0   # + next-token loss over the prompt

Prints the letter accuracy on the first --n-val val records every --eval-every steps, one row per layout.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from efficientllava.data.prompts import LETTER, LETTERS, build_prompt
from efficientllava.evaluation import choose_letter, letter_token_ids
from efficientllava.toy_model import ToyArchitecture, build_tokenizer, text_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "train.yaml"


def _options(record: dict) -> str:
    return " ".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(record["choices"]))


# every layout writes the correct option's text `answer` somewhere in the prompt; the target is its letter
LAYOUTS = {
    # the answer is the last token: the letter is found by matching the position's own word
    "answer_last": lambda r, answer: f"{_options(r)} ? {answer}",
    # the answer two tokens before the answer position: it has to be fetched first
    "answer_last_then_assistant": lambda r, answer: f"{_options(r)} ? {answer} ASSISTANT:",
    # the answer before the options, a short prompt
    "answer_first_short": lambda r, answer: f"Context: {answer} {_options(r)} ?",
    # the toy's own lettered prompt (question, options, instruction) with the answer as its context line
    "toy_prompt": lambda r, answer: f"USER: {build_prompt({**r, 'hint': answer}, LETTER)} ASSISTANT:",
}


def encode(tokenizer, records: list[dict], layout: str) -> list[dict]:
    """One example per record: the prompt's token ids, the letter token to predict after it, the answer's index,
    the option count."""
    letter_ids = letter_token_ids(tokenizer)
    examples = []
    for r in records:
        text = LAYOUTS[layout](r, r["choices"][r["answer"]])
        examples.append({"ids": tokenizer(text)["input_ids"], "target": letter_ids[r["answer"]],
                         "answer": r["answer"], "n_choices": len(r["choices"])})
    return examples


def collate(examples: list[dict], pad_id: int) -> dict:
    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["ids"])] = torch.tensor(e["ids"])
        mask[i, : len(e["ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "last": mask.sum(1) - 1,
            "target": torch.tensor([e["target"] for e in examples]),
            "answer": torch.tensor([e["answer"] for e in examples]),
            "n_choices": torch.tensor([e["n_choices"] for e in examples])}


class LetterBinding(pl.LightningModule):
    """Cross-entropy of the letter token at the prompt's last position; validation: letter accuracy."""

    def __init__(self, model, letter_ids: list[int], lr: float, warmup_steps: int, lm_weight: float = 0.0):
        super().__init__()
        self.model, self.letter_ids, self.lr, self.warmup_steps = model, letter_ids, lr, warmup_steps
        self.lm_weight = lm_weight
        self.curve: list[tuple[int, float]] = []
        self._correct = self._seen = 0

    def _logits(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def _last_logits(self, batch, logits=None):
        logits = self._logits(batch) if logits is None else logits
        return logits[torch.arange(len(logits), device=logits.device), batch["last"]]

    def training_step(self, batch, batch_idx):
        logits = self._logits(batch)
        loss = torch.nn.functional.cross_entropy(self._last_logits(batch, logits).float(), batch["target"])
        if self.lm_weight:
            # next-token loss over the prompt itself, as a language model's pre-training would give it
            targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
            loss = loss + self.lm_weight * lm
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        chosen = choose_letter(self._last_logits(batch), batch["n_choices"], self.letter_ids)
        self._correct += int((chosen == batch["answer"]).sum())
        self._seen += len(chosen)

    def on_validation_epoch_end(self):
        acc = self._correct / max(self._seen, 1)
        self.curve.append((self.global_step, acc))
        self.log("val/acc", acc, prog_bar=True)
        self._correct = self._seen = 0

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        warmup = max(self.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def run_layout(layout: str, train: list[dict], val: list[dict], arch: ToyArchitecture, steps: int,
               eval_every: int, batch_size: int = 32, lr: float = 1e-3, warmup_steps: int = 50, seed: int = 0,
               progress: bool = True, lm_weight: float = 0.0) -> dict:
    """Train one freshly initialised language model on `layout`; returns its val-accuracy curve and prompt length."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; expected one of {list(LAYOUTS)}")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps ({steps}) and eval_every ({eval_every}) must be positive")
    pl.seed_everything(seed, verbose=False)
    tokenizer = build_tokenizer()
    train_examples, val_examples = encode(tokenizer, train, layout), encode(tokenizer, val, layout)
    pad = tokenizer.pad_token_id
    sampler = torch.utils.data.RandomSampler(train_examples, replacement=True, num_samples=steps * batch_size,
                                             generator=torch.Generator().manual_seed(seed))
    train_loader = torch.utils.data.DataLoader(train_examples, batch_size=batch_size, sampler=sampler,
                                               collate_fn=lambda b: collate(b, pad))
    val_loader = torch.utils.data.DataLoader(val_examples, batch_size=250, collate_fn=lambda b: collate(b, pad))
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(text_config(arch, len(tokenizer)))  # the toy's decoder alone, freshly initialised
    module = LetterBinding(model, letter_token_ids(tokenizer), lr, warmup_steps, lm_weight)
    trainer = pl.Trainer(max_steps=steps, val_check_interval=eval_every, check_val_every_n_epoch=None,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=progress, accelerator="cpu",
                         deterministic=True, gradient_clip_val=1.0)
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    return {"layout": layout, "curve": module.curve, "seconds": time.perf_counter() - start,
            "prompt_tokens": sum(len(e["ids"]) for e in val_examples) / len(val_examples)}


def text_records(split) -> list[dict]:
    """A benchmark split's text fields only (no image decoding)."""
    return split.select_columns(["question", "choices", "answer", "hint", "category"]).to_list()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: conf/train.yaml's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-weight", type=float, default=0.0,
                        help="weight of a next-token loss over the whole prompt, beside the letter loss")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from efficientllava.data.toy_benchmark import build_toy_benchmark

    arch = ToyArchitecture(**OmegaConf.to_container(OmegaConf.load(CONF).architecture))
    if args.layers:
        arch.layers = args.layers
    data = build_toy_benchmark(args.seed)
    train, val = text_records(data["train"]), text_records(data["val"])[: args.n_val]
    rows = [run_layout(layout, train, val, arch, args.steps, args.eval_every, lr=args.lr, seed=args.seed,
                       lm_weight=args.lm_weight)
            for layout in args.layouts]
    steps = [s for s, _ in rows[0]["curve"]]
    print(f"\nletter accuracy on {len(val)} val records (chance about 36%), {arch.layers}-layer language model, "
          f"lr {args.lr}, prompt loss weight {args.lm_weight}, seed {args.seed}")
    print("| layout | prompt tokens | " + " | ".join(f"step {s}" for s in steps) + " | train time (s) |")
    print("|---|---|" + "---|" * len(steps) + "---|")
    for row in rows:
        accs = " | ".join(f"{100 * a:.1f}" for _, a in row["curve"])
        print(f"| {row['layout']} | {row['prompt_tokens']:.1f} | {accs} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
