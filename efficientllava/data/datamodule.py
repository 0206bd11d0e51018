"""The LightningDataModule every job uses: training batches in mixed answer formats, evaluation records as lists."""
from __future__ import annotations

import datasets
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from efficientllava.data.collate import Collator
from efficientllava.data.prompts import check_format


class FormatCurriculum:
    """Which answer format each training sample uses, by optimisation step: `stages` is a list of
    (first_step, {format: weight}); a sample's format is drawn from the stage in force, seeded by (seed, step).

    Short answers are learned much faster than letters (the letter format needs the answer first), so the toy is
    trained on short answers alone before the lettered multiple choice joins."""

    def __init__(self, stages, seed: int = 0):
        parsed = []
        for first_step, weights in stages:
            weights = {check_format(f): float(w) for f, w in dict(weights).items()}
            if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
                raise ValueError(f"format weights {weights} at step {first_step}; expected non-negative, not all 0")
            parsed.append((int(first_step), weights))
        if not parsed or parsed[0][0] != 0:
            raise ValueError("the format curriculum must start at step 0")
        self.stages, self.seed, self.step = sorted(parsed, key=lambda x: x[0]), seed, 0

    def formats(self, n: int) -> list[str]:
        weights = [w for first, w in self.stages if first <= self.step][-1]
        names = list(weights)
        probs = torch.tensor([weights[k] for k in names])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        picks = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)
        return [names[i] for i in picks.tolist()]


class RecordList(Dataset):
    def __init__(self, records, limit: int | None = None):
        self.records = records
        self.n = len(records) if limit is None else min(int(limit), len(records))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.records[i]

    def __getitems__(self, indices: list[int]) -> list:
        """A batch of records in one read where the records can (a `datasets.Dataset` reads columns at once)."""
        many = getattr(self.records, "__getitems__", None)
        return list(many(list(indices))) if many else [self.records[i] for i in indices]


def _as_records(batch):
    return list(batch)


class BenchmarkDataModule(pl.LightningDataModule):
    """Wraps a benchmark `DatasetDict` (built by `build`, a zero-argument callable) for training and evaluation."""

    def __init__(
        self,
        build,
        processor=None,
        batch_size: int = 64,
        eval_batch_size: int = 64,
        train_formats=((0, {"short": 1.0, "letter": 1.0}),),
        val_split: str = "val",
        test_split: str = "test",
        n_val: int | None = 256,
        n_test: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_categories: list[str] | None = None,
    ):
        super().__init__()
        self.build, self.processor = build, processor
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.curriculum = FormatCurriculum(train_formats, seed)
        self.val_split, self.test_split = val_split, test_split
        self.n_val, self.n_test = n_val, n_test
        self.num_workers, self.seed = num_workers, seed
        self.train_categories = None if train_categories is None else [str(c) for c in train_categories]
        if self.train_categories is not None and not self.train_categories:
            raise ValueError("train_categories is empty; expected null (every category) or a list of category names")
        self.dataset = None

    def setup(self, stage: str | None = None):
        if self.dataset is None:
            self.dataset = self.build()
            for split in (self.val_split, self.test_split):
                if split not in self.dataset:
                    raise ValueError(f"split {split!r} is not in the benchmark; it has {list(self.dataset)}")

    def split(self, name: str):
        self.setup()
        if name not in self.dataset:
            raise ValueError(f"split {name!r} is not in the benchmark; it has {list(self.dataset)}")
        return self.dataset[name]

    def categories(self, split: str | None = None) -> list[str]:
        return sorted(set(self.split(split or self.test_split)["category"]))

    def train_records(self):
        """The train split, restricted to `train_categories` when given (an ablation: which categories a model
        learns from); validation and test keep every category."""
        train = self.split("train")
        if self.train_categories is None:
            return train
        present = set(train.unique("category"))
        missing = sorted(set(self.train_categories) - present)
        if missing:
            raise ValueError(f"train_categories {missing} are not in the train split; it has {sorted(present)}")
        keep = set(self.train_categories)
        return train.filter(lambda category: category in keep, input_columns="category")

    def train_dataloader(self):
        if self.processor is None:
            raise ValueError("BenchmarkDataModule needs a processor to build training batches")
        records = self.train_records()
        if isinstance(getattr(records, "features", {}).get("image"), datasets.Image):
            # rows carry their PNG bytes and the collator decodes them: the same pixels, and a batch of 32 toy rows
            # read in ~1 ms instead of ~10 ms (a batch is read at once: RecordList.__getitems__)
            records = records.cast_column("image", datasets.Image(decode=False))
        collator, curriculum = Collator(self.processor), self.curriculum
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            RecordList(records),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            num_workers=0,  # the format curriculum reads the current step in this process
            collate_fn=lambda records: {**collator.answers(records, curriculum.formats(len(records))),
                                        "records": records},
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """A training batch's tensors go to the device; its `records` (plain data, read on the host) stay as they
        are, instead of Lightning walking every field of every record. Evaluation batches (lists of records) move
        as Lightning moves them."""
        if isinstance(batch, dict):
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _records(self, split, limit):
        return DataLoader(
            RecordList(self.split(split), limit),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_as_records,
        )

    def val_dataloader(self):
        return self._records(self.val_split, self.n_val)

    def test_dataloader(self):
        return self._records(self.test_split, self.n_test)
