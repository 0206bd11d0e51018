"""The LightningDataModule every job uses: training batches in mixed answer formats, evaluation records as lists."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from efficientllava.data.collate import Collator
from efficientllava.data.prompts import check_format


class MixedFormatDataset(Dataset):
    """Each record once per training format: index i reads record i % n in format i // n."""

    def __init__(self, records, formats):
        self.records, self.formats = records, [check_format(f) for f in formats]

    def __len__(self):
        return len(self.records) * len(self.formats)

    def __getitem__(self, i):
        n = len(self.records)
        return self.records[i % n], self.formats[i // n]


class RecordList(Dataset):
    def __init__(self, records, limit: int | None = None):
        self.records = records
        self.n = len(records) if limit is None else min(int(limit), len(records))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.records[i]


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
        train_formats=("short", "letter"),
        val_split: str = "val",
        test_split: str = "test",
        n_val: int | None = 256,
        n_test: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.build, self.processor = build, processor
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_formats = list(train_formats)
        self.val_split, self.test_split = val_split, test_split
        self.n_val, self.n_test = n_val, n_test
        self.num_workers, self.seed = num_workers, seed
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

    def train_dataloader(self):
        if self.processor is None:
            raise ValueError("BenchmarkDataModule needs a processor to build training batches")
        collator = Collator(self.processor)
        data = MixedFormatDataset(self.split("train"), self.train_formats)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=lambda items: collator.answers([r for r, _ in items], [f for _, f in items]),
        )

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
