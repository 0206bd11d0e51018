"""Mapping a benchmark's source split onto the project's schema (`efficientllava/data/schema.py`).

An `Adapter` names the source columns it reads (each field may go by several names: the official release and the
Hugging Face copies differ), converts one row into a record, and says how the benchmark is scored. `adapt` checks
the columns (a missing one is named, with the columns the source does have), numbers the rows, resolves image paths
(against `image_root`, which may hold `{split}`; every file must exist) and writes the records with `Dataset.map`,
images left encoded until a record is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets

from efficientllava.data.benchmarks.sources import BenchmarkSourceError
from efficientllava.data.schema import RecordError, check_record

INDEX = "_source_index"


class ColumnMismatchError(BenchmarkSourceError):
    """A source whose columns do not match the chosen benchmark adapter."""


@dataclass(frozen=True)
class Adapter:
    name: str
    metric: str  # how records are scored: choice | vqa | mmvet | llava_bench
    required: dict[str, tuple[str, ...]]  # field -> accepted source column names, first present wins
    optional: dict[str, tuple[str, ...]]
    to_record: Callable[[dict, str, int], dict]  # (fields, source split, row index) -> record without image/split
    features: datasets.Features  # of the records, image included
    default_splits: dict[str, str]  # project split -> source split
    drop_imageless: bool = False  # ScienceQA: keep the IMG subset, rows without an image are dropped
    read_source: Callable | None = None  # a benchmark-specific reader, (path, split, cache_dir) -> Dataset or None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def resolve_columns(adapter: Adapter, columns: list[str], where: str) -> dict[str, str]:
    """{field: source column}; raises ColumnMismatchError naming every missing field."""
    found, missing = {}, []
    for fld, names in adapter.required.items():
        name = next((n for n in names if n in columns), None)
        if name is None:
            missing.append(fld if len(names) == 1 else f"{fld} ({' or '.join(names)})")
        else:
            found[fld] = name
    if missing:
        expected = [n[0] if len(n) == 1 else " or ".join(n) for n in adapter.required.values()]
        raise ColumnMismatchError(
            f"{where} lacks column(s) {missing} that the '{adapter.name}' adapter needs; expected columns "
            f"{expected} (it has {sorted(c for c in columns if c != INDEX)})")
    for fld, names in adapter.optional.items():
        name = next((n for n in names if n in columns), None)
        if name is not None:
            found[fld] = name
    return found


def _image_value(value, root: Path | None, rid: str) -> dict:
    """{'bytes', 'path'} of a record's image: bytes as given, or a path that must exist."""
    if value is None:
        raise RecordError(f"record {rid!r} has no image; expected an image (bytes or a file path)")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path")}
        value = value.get("path")
        if not value:
            raise RecordError(f"record {rid!r} has an image with neither bytes nor a path; expected one of them")
    if not isinstance(value, str):
        raise RecordError(f"record {rid!r}: image is a {type(value).__name__}; expected bytes or a file path")
    path = Path(value).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise RecordError(f"record {rid!r}: image file '{path}' does not exist; expected the benchmark's images "
                          f"under '{root}' (set data.build.image_root to the folder that holds them)")
    return {"bytes": None, "path": str(path.resolve())}


def adapt(adapter: Adapter, dataset: datasets.Dataset, split: str, source_split: str, where: str,
          image_root: Path | None, max_records: int | None = None) -> datasets.Dataset:
    """The records of one split in the project's schema (images decoded lazily, on access)."""
    columns = resolve_columns(adapter, dataset.column_names, where)
    image_column = columns["image"]
    if isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.add_column(INDEX, list(range(len(dataset))))
    if adapter.drop_imageless:
        dataset = dataset.filter(lambda image: image is not None, input_columns=image_column)
    if max_records is not None:
        dataset = dataset.select(range(min(int(max_records), len(dataset))))
    if len(dataset) == 0:
        raise BenchmarkSourceError(f"{where} holds no usable record; expected at least one"
                                   + (" with an image" if adapter.drop_imageless else ""))
    features = datasets.Features({**adapter.features, "image": datasets.Image(decode=False)})

    def convert(row):
        fields = {f: row[c] for f, c in columns.items()}
        record = adapter.to_record(fields, source_split, row[INDEX])
        record["split"] = split
        record["image"] = _image_value(fields["image"], image_root, record["id"])
        check_record(record)
        return {k: record.get(k) for k in features}

    records = dataset.map(convert, remove_columns=dataset.column_names, features=features,
                          desc=f"{adapter.name} {split}")
    ids = records["id"]
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for rid in ids:
            if rid in seen:
                dup = rid
                break
            seen.add(rid)
        raise BenchmarkSourceError(f"{where} holds record id {dup!r} more than once; expected unique ids "
                                   "(results are merged by id across devices)")
    return records.cast_column("image", datasets.Image())
