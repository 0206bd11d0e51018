"""The real benchmarks (ScienceQA, VizWiz, MM-Vet, LLaVA-Bench) loaded with `datasets` and mapped onto the project's
schema, so the data module, the evaluation and the search take them as they take the toy.

    load_benchmark("scienceqa", "derek-thomas/ScienceQA")                       # hub id (or its cache, offline)
    load_benchmark("vizwiz", "/data/vizwiz", data_files={"val": "Annotations/val.json"},
                   splits={"val": "val"}, image_root="/data/vizwiz/{split}")  # the official layout
    load_benchmark("mmvet", "/data/mm-vet/mm-vet.json", image_root="/data/mm-vet/images")

`conf/data/<name>.yaml` passes these through Hydra (`data.build.*`).
"""
from __future__ import annotations

from pathlib import Path

import datasets

from efficientllava.data.benchmarks import llava_bench, mmvet, scienceqa, vizwiz
from efficientllava.data.benchmarks.adapter import Adapter, ColumnMismatchError, adapt
from efficientllava.data.benchmarks.sources import BenchmarkSourceError, read_split, source_directory

BENCHMARKS: dict[str, Adapter] = {a.name: a for a in (scienceqa.ADAPTER, vizwiz.ADAPTER, mmvet.ADAPTER,
                                                      llava_bench.ADAPTER)}

__all__ = ["BENCHMARKS", "BenchmarkSourceError", "ColumnMismatchError", "adapter_for", "load_benchmark"]


def adapter_for(name: str) -> Adapter:
    if name not in BENCHMARKS:
        raise BenchmarkSourceError(f"benchmark {name!r} is unknown; expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def _limit(max_records, split: str):
    if isinstance(max_records, dict) or hasattr(max_records, "items"):
        return dict(max_records).get(split)
    return max_records


def load_benchmark(name: str, path: str, splits: dict | None = None, data_files: dict | None = None,
                   image_root: str | None = None, subset: str | None = None, revision: str | None = None,
                   max_records=None, cache_dir: str | None = None) -> datasets.DatasetDict:
    """{project split: records} of benchmark `name` read from `path`.

    splits: {project split: source split} (default: the benchmark's own, e.g. ScienceQA's val = 'validation').
    data_files: {source split: file(s)} relative to `path` (a directory) when the layout is not one `datasets`
    infers. image_root: where relative image paths point (may hold '{split}', the source split); default: the
    folder of the split's file. max_records: the first n records of each split (an int, or {split: n}).
    """
    adapter = adapter_for(name)
    splits = dict(splits or adapter.default_splits)
    if not splits:
        raise BenchmarkSourceError(f"benchmark {name!r}: data.build.splits is empty; expected "
                                   "{project split: source split}")
    local = Path(str(path)).expanduser()
    if local.is_file() and not data_files and len(set(splits.values())) > 1:
        raise BenchmarkSourceError(
            f"benchmark source '{path}' is one file but splits {dict(splits)} asks for several source splits; "
            "expected one split per file (data.build.splits={test: test}) or data.build.data_files={split: file}")
    out = {}
    for split, source_split in splits.items():
        where = f"benchmark '{name}' source '{path}' (split '{source_split}')"
        dataset = adapter.read_source(path, source_split, cache_dir) if adapter.read_source else None
        if dataset is None:
            dataset = read_split(path, source_split, data_files=data_files and dict(data_files), subset=subset,
                                 revision=revision, cache_dir=cache_dir)
        if image_root:
            root = Path(str(image_root).replace("{split}", source_split)).expanduser()
        else:
            root = source_directory(path, data_files and dict(data_files), source_split)
        out[split] = adapt(adapter, dataset, split, source_split, where, root, _limit(max_records, split))
    return datasets.DatasetDict(out)
