"""The real benchmarks' adapters on hand-written fixtures that copy each published schema (tests/fixtures/benchmarks):
every layout the adapters accept, the records they produce, LLaVA-1.5's prompts, and every bad source named."""
import json
import shutil
from pathlib import Path

import datasets
import pytest
from PIL import Image

from efficientllava.data.benchmarks import BenchmarkSourceError, ColumnMismatchError, load_benchmark
from efficientllava.data.prompts import LETTER, OPEN, build_prompt, build_target
from efficientllava.data.schema import RecordError, check_record

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
VIZWIZ_FILES = {"train": "Annotations/train.json", "val": "Annotations/val.json"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def image_bytes(path) -> bytes:
    return Path(path).read_bytes()


# ---- ScienceQA ----------------------------------------------------------------------------------------------------
def test_scienceqa_keeps_the_img_subset_with_its_fields(cache):
    data = load_benchmark("scienceqa", str(FIXTURES / "scienceqa"), cache_dir=cache)
    source = jsonl(FIXTURES / "scienceqa" / "test.jsonl")
    with_image = [(i, r) for i, r in enumerate(source) if r["image"] is not None]
    test = data["test"]
    assert len(test) == len(with_image) < len(source)
    for record, (index, row) in zip(test, with_image):
        check_record(record)
        assert record["id"] == f"scienceqa-test-{index:05d}"  # numbered in the official split's order
        assert record["question"] == row["question"] and record["choices"] == row["choices"]
        assert record["answer"] == row["answer"] and record["hint"] == row["hint"]
        assert record["category"] == row["subject"] and record["grade"] == row["grade"]
        assert isinstance(record["image"], Image.Image)
    assert set(data) == {"train", "val", "test"}


def test_scienceqa_prompt_is_llava15s():
    record = {"question": "Which state is highlighted?", "choices": ["Ohio", "Utah"], "answer": 1,
              "hint": "Look at the map."}
    assert build_prompt(record, LETTER) == ("Context: Look at the map.\nWhich state is highlighted?\nA. Ohio\nB. Utah"
                                            "\nAnswer with the option's letter from the given choices directly.")
    assert build_prompt({**record, "hint": ""}, LETTER).startswith("Which state is highlighted?\nA. Ohio")
    assert build_target(record, LETTER) == "B"


def test_scienceqa_hub_layout_parquet_with_image_bytes_gives_the_same_records(tmp_path, cache):
    """The hub copy is parquet with the image stored as bytes; the same rows must give the same records."""
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int8"),
        "hint": datasets.Value("string"), "task": datasets.Value("string"), "grade": datasets.Value("string"),
        "subject": datasets.Value("string"), "topic": datasets.Value("string"),
        "category": datasets.Value("string"), "skill": datasets.Value("string"),
        "lecture": datasets.Value("string"), "solution": datasets.Value("string")})
    (tmp_path / "data").mkdir()
    for split in ("train", "validation", "test"):
        rows = jsonl(FIXTURES / "scienceqa" / f"{split}.jsonl")
        for row in rows:
            if row["image"] is not None:
                row["image"] = {"bytes": image_bytes(FIXTURES / "scienceqa" / row["image"]), "path": None}
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    hub = load_benchmark("scienceqa", str(tmp_path), cache_dir=cache)
    local = load_benchmark("scienceqa", str(FIXTURES / "scienceqa"), cache_dir=cache)
    for split in ("train", "val", "test"):
        for a, b in zip(hub[split], local[split]):
            assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
            assert a["image"].tobytes() == b["image"].tobytes()


# ---- VizWiz -------------------------------------------------------------------------------------------------------
def vizwiz(cache, **kwargs):
    return load_benchmark("vizwiz", str(FIXTURES / "vizwiz"), data_files=VIZWIZ_FILES,
                          image_root=str(FIXTURES / "vizwiz" / "{split}"), cache_dir=cache, **kwargs)


def test_vizwiz_official_layout(cache):
    data = vizwiz(cache)
    source = json.loads((FIXTURES / "vizwiz" / "Annotations" / "val.json").read_text())
    assert len(data["val"]) == len(source) and len(data["train"]) == 3
    for record, row in zip(data["val"], source):
        check_record(record)
        assert record["id"] == Path(row["image"]).stem
        assert record["answers"] == [a["answer"] for a in row["answers"]] and len(record["answers"]) == 10
        assert record["category"] == row["answer_type"] and record["metric"] == "vqa"
        assert record["choices"] == [] and record["answer"] == -1


def test_vizwiz_prompt_and_target_follow_llava15(cache):
    record = vizwiz(cache)["val"][0]
    assert build_prompt(record, OPEN) == (
        "What color is this shirt?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.")
    assert build_target(record, OPEN) == "blue"  # the most frequent human answer


def test_vizwiz_flat_copy_with_string_answers_and_image_bytes(tmp_path, cache):
    """The flat hub copy: question_id, image (bytes), question, answers (strings), category."""
    source = json.loads((FIXTURES / "vizwiz" / "Annotations" / "val.json").read_text())
    rows = [{"question_id": Path(r["image"]).stem,
             "image": {"bytes": image_bytes(FIXTURES / "vizwiz" / "val" / r["image"]), "path": None},
             "question": r["question"], "answers": [a["answer"] for a in r["answers"]],
             "category": r["answer_type"]} for r in source]
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")),
                                  "category": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "val-00000-of-00001.parquet"))
    flat = load_benchmark("vizwiz", str(tmp_path), splits={"val": "val"}, cache_dir=cache)["val"]
    official = vizwiz(cache)["val"]
    for a, b in zip(flat, official):
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}


# ---- MM-Vet and LLaVA-Bench ---------------------------------------------------------------------------------------
def test_mmvet_official_object_keyed_by_id(cache):
    data = load_benchmark("mmvet", str(FIXTURES / "mmvet" / "mm-vet.json"),
                          image_root=str(FIXTURES / "mmvet" / "images"), cache_dir=cache)["test"]
    source = json.loads((FIXTURES / "mmvet" / "mm-vet.json").read_text())
    assert [r["id"] for r in data] == list(source)
    for record in data:
        row = source[record["id"]]
        assert record["answers"] == [row["answer"]] and record["metric"] == "mmvet"
        assert record["category"] == ",".join(sorted(row["capability"]))
        assert build_prompt(record, OPEN) == row["question"]  # LLaVA-1.5 asks MM-Vet's question alone


def test_mmvet_hub_copy_with_capabilities_as_one_string(tmp_path, cache):
    source = json.loads((FIXTURES / "mmvet" / "mm-vet.json").read_text())
    rows = [{"question_id": k, "image": {"bytes": image_bytes(FIXTURES / "mmvet" / "images" / v["imagename"]),
                                         "path": None},
             "question": v["question"], "answer": v["answer"], "image_source": "web",
             "capability": ",".join(reversed(v["capability"]))} for k, v in source.items()]
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image_source": datasets.Value("string"), "capability": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    hub = load_benchmark("mmvet", str(tmp_path), cache_dir=cache)["test"]
    official = load_benchmark("mmvet", str(FIXTURES / "mmvet" / "mm-vet.json"),
                              image_root=str(FIXTURES / "mmvet" / "images"), cache_dir=cache)["test"]
    assert [(r["id"], r["category"], r["answers"]) for r in hub] == \
           [(r["id"], r["category"], r["answers"]) for r in official]


def test_llava_bench_original_files_and_flat_copy_agree(cache):
    original = {r["id"]: r for r in load_benchmark("llava_bench", str(FIXTURES / "llava_bench"),
                                                   cache_dir=cache)["test"]}
    flat = load_benchmark("llava_bench", str(FIXTURES / "llava_bench" / "flat.jsonl"), cache_dir=cache)["test"]
    assert len(original) == len(jsonl(FIXTURES / "llava_bench" / "questions.jsonl"))
    assert len(flat) == 2
    for record in flat:
        twin = original[record["id"]]
        for key in ("question", "answers", "category", "judge_context", "metric"):
            assert record[key] == twin[key], key
        assert record["image"].tobytes() == twin["image"].tobytes()
    assert original["2"]["judge_context"].startswith("An oil painting")  # the caption, for the judge only
    assert "oil painting" not in build_prompt(original["2"], OPEN)


# ---- the data module takes them like the toy ----------------------------------------------------------------------
def test_benchmark_data_module_serves_real_benchmarks(cache):
    from functools import partial

    from efficientllava.data.collate import Collator
    from efficientllava.data.datamodule import BenchmarkDataModule
    from efficientllava.toy_model import build_processor

    build = partial(load_benchmark, "vizwiz", str(FIXTURES / "vizwiz"), data_files=VIZWIZ_FILES,
                    image_root=str(FIXTURES / "vizwiz" / "{split}"), cache_dir=cache)
    module = BenchmarkDataModule(build, processor=build_processor(), val_split="val", test_split="val",
                                 eval_batch_size=3)
    assert module.categories() == ["number", "other", "unanswerable", "yes/no"]
    batches = list(module.test_dataloader())
    assert [len(b) for b in batches] == [3, 1]
    batch = Collator(module.processor).answers(batches[0], [OPEN] * 3)
    assert batch["input_ids"].shape[0] == 3 and (batch["labels"] != -100).any()


# ---- bad sources: each named ----------------------------------------------------------------------------------
def test_missing_columns_are_named_with_what_the_source_has(tmp_path, cache):
    rows = [{k: v for k, v in r.items() if k != "answers"}
            for r in json.loads((FIXTURES / "vizwiz" / "Annotations" / "val.json").read_text())]
    (tmp_path / "val.json").write_text(json.dumps(rows))
    with pytest.raises(ColumnMismatchError, match=r"lacks column\(s\) \['answers'\] that the 'vizwiz' adapter needs"
                                                  r".*it has \['answer_type', 'answerable', 'image', 'question'\]"):
        load_benchmark("vizwiz", str(tmp_path / "val.json"), splits={"val": "val"}, cache_dir=cache)


def test_a_scienceqa_file_given_to_the_vizwiz_adapter_is_refused(cache):
    with pytest.raises(ColumnMismatchError, match=r"\['answers'\]"):
        load_benchmark("vizwiz", str(FIXTURES / "scienceqa" / "test.jsonl"), splits={"val": "test"}, cache_dir=cache)


def test_alternative_column_names_are_listed(tmp_path, cache):
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "x.png", "caption": "c", "category": "conv"}) + "\n")
    with pytest.raises(ColumnMismatchError, match=r"question \(question or text\).*reference \(gpt_answer or "
                                                  r"answer\)"):
        load_benchmark("llava_bench", str(tmp_path / "q.jsonl"), cache_dir=cache)


def test_image_path_that_does_not_exist_is_named(tmp_path, cache):
    shutil.copytree(FIXTURES / "mmvet", tmp_path / "mmvet")
    (tmp_path / "mmvet" / "images" / "v1_2.png").unlink()
    with pytest.raises(RecordError, match=r"record 'v1_2': image file '.*v1_2.png' does not exist; expected the "
                                          r"benchmark's images under .*data.build.image_root"):
        load_benchmark("mmvet", str(tmp_path / "mmvet" / "mm-vet.json"),
                       image_root=str(tmp_path / "mmvet" / "images"), cache_dir=cache)


def test_wrong_image_root_is_named(cache):
    with pytest.raises(RecordError, match="VizWiz_val_00000000.jpg' does not exist"):
        load_benchmark("vizwiz", str(FIXTURES / "vizwiz"), data_files=VIZWIZ_FILES, splits={"val": "val"},
                       image_root=str(FIXTURES / "vizwiz" / "train"), cache_dir=cache)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "gqa", "path": "x"}, r"benchmark 'gqa' is unknown; expected one of \['llava_bench', 'mmvet'"),
    ({"name": "mmvet", "path": "/no/such/dir"}, "source '/no/such/dir' does not exist; expected a hub id"),
    ({"name": "scienceqa", "path": str(FIXTURES / "scienceqa" / "test.jsonl")},
     "is one file but splits .* asks for several source splits"),
    ({"name": "scienceqa", "path": str(FIXTURES / "scienceqa"), "splits": {"test": "dev"}},
     r"has no data file for split 'dev'.*expected a file named after the split"),
    ({"name": "vizwiz", "path": str(FIXTURES / "vizwiz"), "splits": {"test": "test"}, "data_files": VIZWIZ_FILES},
     r"data_files names splits \['train', 'val'\]; expected an entry for split 'test'"),
    ({"name": "vizwiz", "path": str(FIXTURES / "vizwiz"), "splits": {"val": "val"},
      "data_files": {"val": "Annotations/nope.json"}}, "data file '.*nope.json' of split 'val' does not exist"),
    ({"name": "mmvet", "path": str(FIXTURES / "README.md")}, r"has suffix '.md'; expected one of"),
])
def test_bad_sources_are_named(kwargs, match, cache):
    with pytest.raises(BenchmarkSourceError, match=match):
        load_benchmark(cache_dir=cache, **kwargs)


def test_duplicate_ids_are_refused(tmp_path, cache):
    shutil.copytree(FIXTURES / "mmvet", tmp_path / "mmvet")
    rows = [{"question_id": "same", "imagename": "v1_0.png", "question": "q", "answer": "a"}] * 2
    (tmp_path / "mmvet" / "dup.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BenchmarkSourceError, match="holds record id 'same' more than once"):
        load_benchmark("mmvet", str(tmp_path / "mmvet" / "dup.jsonl"), image_root=str(tmp_path / "mmvet" / "images"),
                       cache_dir=cache)


def test_open_ended_record_without_answers_is_refused():
    record = {"id": "q1", "image": None, "question": "What?", "choices": [], "answer": -1, "hint": "",
              "category": "all", "split": "val", "metric": "vqa", "answers": []}
    with pytest.raises(RecordError, match="open-ended record 'q1' has answers \\[\\]; expected a non-empty list"):
        check_record(record)
    with pytest.raises(RecordError, match="metric 'bleu'; expected one of"):
        check_record({**record, "metric": "bleu"})
