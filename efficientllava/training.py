"""LightningModule that trains a LLaVA on answer tokens (used to train the shipped toy from scratch)."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from efficientllava.data.collate import IGNORE, Collator
from efficientllava.evaluation import MODEL_INPUTS, AccuracyTally, letter_token_ids


def cosine_schedule(warmup_steps: int, total_steps: int):
    """Learning-rate factor by step: linear warm-up, then cosine decay to zero at `total_steps`."""
    total, warmup = max(int(total_steps), 1), max(int(warmup_steps), 1)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return factor


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each sample's labelled tokens, so a long caption counts as much as
    a one-letter answer (a token-mean would let captions dominate the batch)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none"
    ).view(labels.shape)
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1)


class LlavaTrainingModule(pl.LightningModule):
    """Next-token loss on the answer (+EOS) only; AdamW with linear warm-up and cosine decay to zero.

    Validation reports letter-format accuracy per category through the same code as the final evaluation.
    """

    def __init__(
        self, model, processor, categories, lr=1e-3, weight_decay=0.0, warmup_steps=50, grad_clip=1.0, betas=(0.9, 0.999)
    ):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.grad_clip, self.betas = grad_clip, tuple(betas)
        self.collator = Collator(processor)
        self.letter_ids = letter_token_ids(processor.tokenizer)
        self.tally = AccuracyTally(categories, modes=("letter",))
        self.save_hyperparameters(ignore=["model", "processor"])

    def training_step(self, batch, batch_idx):
        logits = self.model(**{k: batch[k] for k in MODEL_INPUTS}).logits
        loss = per_sample_loss(logits, batch["labels"]).mean()
        self.log_step("train/loss", loss, prog_bar=True)
        return loss

    def log_step(self, name: str, value, **kwargs):
        """`self.log` of a training-step scalar, called only on the steps the loggers write (every
        `trainer.log_every_n_steps`), so the logged curves are the same. Lightning's bookkeeping costs about 4 ms per
        logged value on 2 CPU cores (the toy logs three per step: ~4% of its step time). The progress bar's loss
        follows at that pace."""
        trainer = self._trainer
        if trainer is None or (self.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0:
            self.log(name, value, **kwargs)

    def on_train_start(self):
        self.on_train_batch_end(None, None, 0)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # the next batch's answer formats follow the curriculum at the next optimisation step
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "curriculum"):
            datamodule.curriculum.step = self.global_step

    def on_before_optimizer_step(self, optimizer):
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def validation_step(self, records, batch_idx):
        self.model.eval()
        self.tally.update(self.model, self.collator, records, self.letter_ids)

    def on_validation_epoch_end(self):
        self.model.train()
        for key, value in self.tally.compute(self).items():
            self.log(f"val/{key}", float(value), prog_bar=key == "acc")

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=self.betas,
        )
        schedule = cosine_schedule(self.warmup_steps, int(self.trainer.max_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
