"""Reading one split of a benchmark's source with `datasets.load_dataset`: a hub id, a local directory or one file.

- a hub id ('derek-thomas/ScienceQA'): `load_dataset(id, split=...)` (cached by `datasets`; offline it needs the cache);
- a local directory: its parquet / json / jsonl / csv files whose name holds the split as a word ('test.jsonl',
  'data/validation-00000-of-00001.parquet') with their builder; a directory without such files goes to
  `load_dataset(dir)` as it is (e.g. an imagefolder);
- one local file (.parquet, .json, .jsonl, .csv): its builder, the file as the split. A .json file whose top level
  is an object of objects (MM-Vet's `mm-vet.json`: {"v1_0": {...}, ...}) becomes one row per key, the key as `id`;
- `data_files` ({source split: file or files, relative to the directory}) picks the files of each split explicitly
  (VizWiz: {train: Annotations/train.json, val: Annotations/val.json}).
Every failure says which source and split it was and what was expected.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class BenchmarkSourceError(ValueError):
    """A benchmark source (path, split, columns or images) that cannot be read as the chosen benchmark."""


def builder_for(file: Path) -> str:
    builder = BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise BenchmarkSourceError(f"benchmark file '{file}' has suffix {file.suffix!r}; expected one of "
                                   f"{sorted(BUILDERS)}")
    return builder


def _object_of_objects(file: Path) -> list[dict] | None:
    """Rows of a .json file shaped {key: {field: value}}, each with its key as `id`; None for other shapes."""
    if file.suffix.lower() != ".json":
        return None
    with open(file, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
    if head != "{":
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    if not data or not all(isinstance(v, dict) for v in data.values()):
        return None
    return [{"id": str(key), **value} for key, value in data.items()]


def _load(source: str, split: str, **kwargs) -> datasets.Dataset:
    try:
        return datasets.load_dataset(split=split, **kwargs)
    except ValueError as err:
        if "split" in str(err).lower():
            raise BenchmarkSourceError(f"benchmark source '{source}' has no split {split!r} ({err}); expected one "
                                       "of its splits in data.build.splits") from err
        raise BenchmarkSourceError(f"benchmark source '{source}' (split {split!r}) could not be read: {err}") from err
    except Exception as err:  # datasets raises many types (not found, offline, bad files)
        raise BenchmarkSourceError(f"benchmark source '{source}' (split {split!r}) could not be read: "
                                   f"{type(err).__name__}: {err}") from err


def read_split(path: str, split: str, data_files: dict | None = None, subset: str | None = None,
               revision: str | None = None, cache_dir: str | None = None) -> datasets.Dataset:
    """One split of a source, as it is (the adapter maps it onto the project's schema)."""
    path = str(path)
    local = Path(path).expanduser()
    common = {"cache_dir": str(cache_dir) if cache_dir else None}
    if data_files:
        if split not in data_files:
            raise BenchmarkSourceError(f"data.build.data_files names splits {sorted(data_files)}; expected an entry "
                                       f"for split {split!r}")
        files = data_files[split]
        files = [files] if isinstance(files, str) else list(files)
        base = local if local.is_dir() else Path(".")
        resolved = [f if Path(f).is_absolute() else base / f for f in map(Path, files)]
        for file in resolved:
            if not file.is_file():
                raise BenchmarkSourceError(f"data file '{file}' of split {split!r} does not exist; expected a "
                                           f"file relative to '{base}' or an absolute path")
        rows = _object_of_objects(resolved[0]) if len(resolved) == 1 else None
        if rows is not None:
            return datasets.Dataset.from_list(rows)
        return _load(path, split, path=builder_for(resolved[0]), data_files={split: [str(f) for f in resolved]},
                     **common)
    if local.is_file():
        rows = _object_of_objects(local)
        if rows is not None:
            return datasets.Dataset.from_list(rows)
        return _load(path, split, path=builder_for(local), data_files={split: str(local)}, **common)
    if local.is_dir():
        tables = sorted(f for f in local.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS)
        if not tables:
            return _load(path, split, path=str(local), name=subset, **common)
        files = [f for f in tables if split in re.split(r"[-_.]", f.name)]
        if not files:
            raise BenchmarkSourceError(
                f"benchmark directory '{local}' has no data file for split {split!r} (found "
                f"{[str(f.relative_to(local)) for f in tables][:8]}); expected a file named after the split, "
                "or data.build.data_files={split: file}")
        if len({builder_for(f) for f in files}) > 1:
            raise BenchmarkSourceError(f"split {split!r} of '{local}' mixes file types {[f.name for f in files]}; "
                                       "expected one type, or data.build.data_files={split: file}")
        rows = _object_of_objects(files[0]) if len(files) == 1 else None
        if rows is not None:
            return datasets.Dataset.from_list(rows)
        return _load(path, split, path=builder_for(files[0]), data_files={split: [str(f) for f in files]}, **common)
    if HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return _load(path, split, path=path, name=subset, revision=revision, **common)
    raise BenchmarkSourceError(f"benchmark source '{path}' does not exist; expected a hub id 'org/name', a local "
                               f"directory or a file ({', '.join(sorted(BUILDERS))})")


def source_directory(path: str, data_files: dict | None, split: str) -> Path:
    """Where relative image paths of a split are looked up when no image_root is given: the folder of its file."""
    local = Path(str(path)).expanduser()
    if data_files and split in data_files:
        first = data_files[split] if isinstance(data_files[split], str) else list(data_files[split])[0]
        file = Path(first) if Path(first).is_absolute() else (local if local.is_dir() else Path(".")) / first
        return file.parent
    return local.parent if local.is_file() else local
