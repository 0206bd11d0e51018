import collections
import re

import numpy as np
import pytest

from efficientllava.data.prompts import build_prompt, build_target
from efficientllava.data.schema import FEATURES
from efficientllava.data.scenes import digit_pools
from efficientllava.data.toy_benchmark import CATEGORIES, DEFAULT_CATEGORIES, build_toy_benchmark, generate_split


def test_same_seed_same_records_other_seed_other_records():
    a, b, c = generate_split("val", 80, 0), generate_split("val", 80, 0), generate_split("val", 80, 1)
    assert a["question"] == b["question"] and a["choices"] == b["choices"] and a["answer"] == b["answer"]
    assert all(np.array_equal(x, y) for x, y in zip(a["image"], b["image"]))
    assert a["question"] != c["question"]


def test_splits_differ():
    assert generate_split("val", 50, 0)["question"] != generate_split("test", 50, 0)["question"]


def test_schema_and_cached_dataset(small_benchmark):
    assert set(small_benchmark) == {"train", "val", "test"}
    assert small_benchmark["test"].features == FEATURES
    assert len(small_benchmark["test"]) == 160
    row = small_benchmark["test"][0]
    assert row["image"].size == (32, 32)
    assert 2 <= len(row["choices"]) <= 5 and 0 <= row["answer"] < len(row["choices"])
    assert row["split"] == "test"


def test_cache_is_reused(small_benchmark, tmp_path):
    first = build_toy_benchmark(3, {"val": 10}, cache_dir=tmp_path)
    second = build_toy_benchmark(3, {"val": 10}, cache_dir=tmp_path)
    assert first["val"]["question"] == second["val"]["question"]
    assert len(list(tmp_path.iterdir())) == 1


def test_every_category_present_and_balanced():
    counts = collections.Counter(generate_split("test", 700, 0)["category"])
    assert set(counts) == set(DEFAULT_CATEGORIES) == set(CATEGORIES) - {"count_relation"}
    assert all(v == 100 for v in counts.values())


def test_correct_option_position_is_uniform():
    cols = generate_split("train", 6000, 0)
    by_k = collections.defaultdict(collections.Counter)
    for choices, answer in zip(cols["choices"], cols["answer"]):
        by_k[len(choices)][answer] += 1
    for k, counts in by_k.items():
        total = sum(counts.values())
        assert set(counts) == set(range(k))
        # chi-square with k-1 degrees of freedom, far below the 0.1% critical value (18.5 for k=5)
        chi2 = sum((counts[i] - total / k) ** 2 / (total / k) for i in range(k))
        assert chi2 < 18.5, (k, counts)


def test_answer_never_leaks_into_the_prompt():
    cols = generate_split("val", 400, 0)
    for i in range(400):
        record = {k: cols[k][i] for k in cols}
        answer = build_target(record, "short")
        prompt = build_prompt(record, "short")
        assert not re.search(rf"\b{re.escape(answer)}\b", prompt.rsplit("\n", 1)[0]), prompt
        letter_prompt = build_prompt(record, "letter")
        assert letter_prompt.count(answer) >= 1  # listed as an option, but never marked
        assert "correct" not in letter_prompt.lower()


def test_held_out_handwriting_is_disjoint_from_training():
    pools = digit_pools()
    train = {a.tobytes() for a in pools["train"][0]}
    assert not any(a.tobytes() in train for a in pools["heldout"][0][:200])


@pytest.mark.parametrize("sizes", [{"bogus": 3}, {"val": 0}])
def test_bad_sizes(sizes, tmp_path):
    with pytest.raises(ValueError, match="split"):
        build_toy_benchmark(0, sizes, cache_dir=tmp_path)


def test_train_categories_restrict_only_the_train_split(small_benchmark, tiny_toy):
    """`data.train_categories` (an ablation: what a model learns from) keeps only those categories in the batches
    it trains on; validation and test keep every category."""
    from efficientllava.data.datamodule import BenchmarkDataModule

    _, processor = tiny_toy
    data = BenchmarkDataModule(lambda: small_benchmark, processor, batch_size=4,
                               train_categories=["relation", "digit"])
    train = data.train_records()
    expected = sum(c in ("relation", "digit") for c in small_benchmark["train"]["category"])
    assert expected > 0 and len(train) == expected
    assert set(train["category"]) == {"relation", "digit"}
    seen = {r["category"] for batch in data.train_dataloader() for r in batch["records"]}
    assert seen == {"relation", "digit"}
    assert len(data.categories()) == 7 and len(data.split("val")) == len(small_benchmark["val"])
    assert len(BenchmarkDataModule(lambda: small_benchmark, processor).train_records()) == 64


@pytest.mark.parametrize("categories, message", [(["relation", "colours"], r"\['colours'\] are not in the train split"),
                                                 ([], "train_categories is empty")])
def test_bad_train_categories(small_benchmark, categories, message):
    from efficientllava.data.datamodule import BenchmarkDataModule

    with pytest.raises(ValueError, match=message):
        BenchmarkDataModule(lambda: small_benchmark, None, train_categories=categories).train_records()


def test_relations_restrict_the_relation_words_asked():
    relation_words = re.compile(r"(left of|right of|above|below)")
    full = generate_split("val", 400, 0)
    asked = {m for q in full["question"] for m in relation_words.findall(q)}
    assert asked == {"left of", "right of", "above", "below"}
    one_per_axis = generate_split("val", 400, 0, ["left of", "above"], "yes_no", CATEGORIES)
    kinds = collections.Counter(
        m for q, c in zip(one_per_axis["question"], one_per_axis["category"])
        if c in ("relation", "count_relation") for m in relation_words.findall(q)
    )
    assert set(kinds) == {"left of", "above"} and min(kinds.values()) > 10


def test_default_relations_keep_the_cache_key_and_others_get_their_own(tmp_path):
    import hashlib
    import json

    from efficientllava.data.toy_benchmark import BENCHMARK_VERSION

    build_toy_benchmark(3, {"val": 8}, cache_dir=tmp_path)
    build_toy_benchmark(3, {"val": 8}, cache_dir=tmp_path, relations=["left of", "right of", "above", "below"])
    key = hashlib.sha1(json.dumps([BENCHMARK_VERSION, 3, [["val", 8]]]).encode()).hexdigest()[:12]
    assert [p.name for p in tmp_path.iterdir()] == [f"toy_benchmark-{key}"]
    build_toy_benchmark(3, {"val": 8}, cache_dir=tmp_path, relations=["left of"])
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("relations", [[], ["left"], ["above", "above"]])
def test_bad_relations(relations, tmp_path):
    with pytest.raises(ValueError, match="expected some of"):
        build_toy_benchmark(0, {"val": 4}, cache_dir=tmp_path, relations=relations)


def test_training_batches_hold_the_records_the_sampler_drew(small_benchmark, tiny_toy):
    """The train loader reads rows a batch at a time with their images still encoded; its batches equal batches
    collated from the split's own (decoded) records, over two epochs."""
    import torch

    from efficientllava.data.collate import Collator
    from efficientllava.data.datamodule import BenchmarkDataModule, FormatCurriculum

    _, processor = tiny_toy
    formats = [[0, {"short": 1.0, "letter": 1.0}]]
    data = BenchmarkDataModule(lambda: small_benchmark, processor, batch_size=8, train_formats=formats)
    loader = data.train_dataloader()
    batches = [batch for _ in range(2) for batch in loader]
    by_id = {r["id"]: r for r in small_benchmark["train"]}
    curriculum, collator = FormatCurriculum(formats), Collator(processor)
    assert len(batches) == 16 and len({r["id"] for b in batches for r in b["records"]}) == 64
    for batch in batches:
        records = [by_id[r["id"]] for r in batch["records"]]
        reference = collator.answers(records, curriculum.formats(len(records)))
        assert reference.keys() == batch.keys() - {"records"}
        assert all(torch.equal(reference[k], batch[k]) for k in reference)


def test_neighbour_relation_asks_for_the_adjacent_object():
    """relation_form=neighbour (the default): "What is directly left of the red circle?" names the object in the next cell in
    that direction; the reference is the only object of its colour, and the scene's other objects come first among
    the distractors."""
    from efficientllava.data.toy_benchmark import NEIGHBOURS

    cols = generate_split("val", 300, 0, categories=["relation"])
    asked = collections.Counter()
    for question, choices, answer, lecture in zip(cols["question"], cols["choices"], cols["answer"], cols["lecture"]):
        match = re.fullmatch(r"What is directly (left of|right of|above|below) the (\w+ \w+)\?", question)
        assert match, question
        relation, name = match.groups()
        asked[relation] += 1
        cells = lecture.split(" , ")
        assert cells.count(name) == 1 and sum(c.split()[0] == name.split()[0] for c in cells) == 1
        row, col = divmod(cells.index(name), 4)
        dr, dc = NEIGHBOURS[relation]
        assert choices[answer] == cells[(row + dr) * 4 + col + dc]
        others = {c for c in cells if c not in ("empty", name, choices[answer])}
        distractors = [c for i, c in enumerate(choices) if i != answer]
        assert set(distractors) >= others or set(distractors) <= others, (choices, others)
    assert set(asked) == set(NEIGHBOURS) and min(asked.values()) > 40


def test_categories_choose_what_is_built(tmp_path):
    kinds = ["colour", "relation", "digit_sum"]
    counts = collections.Counter(generate_split("test", 300, 0, categories=kinds)["category"])
    assert counts == {k: 100 for k in kinds}
    default = build_toy_benchmark(3, {"val": 8}, cache_dir=tmp_path)
    chosen = build_toy_benchmark(3, {"val": 8}, cache_dir=tmp_path, categories=kinds, relation_form="yes_no")
    assert len(list(tmp_path.iterdir())) == 2
    assert set(chosen["val"]["category"]) <= set(kinds) and default["val"]["question"] != chosen["val"]["question"]


@pytest.mark.parametrize("options, message", [
    ({"categories": []}, "categories \\[\\] are not a non-empty list"),
    ({"categories": ["colour", "size"]}, "expected some of \\['colour'"),
    ({"categories": ["digit", "digit"]}, "not a non-empty list of distinct"),
    ({"relation_form": "sideways"}, "relation_form='sideways' is unknown; expected one of \\['yes_no', 'neighbour'\\]"),
])
def test_bad_categories_and_relation_form(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_toy_benchmark(0, {"val": 4}, cache_dir=tmp_path, **options)


def test_train_mix_weighs_the_train_split_only(tmp_path):
    mix = {"relation": 3, "digit": 0.5}
    train = collections.Counter(generate_split("train", 850, 0, train_mix=mix)["category"])
    assert train == {"relation": 300, "digit": 50, **{k: 100 for k in DEFAULT_CATEGORIES if k not in mix}}
    test = collections.Counter(generate_split("test", 700, 0, train_mix=mix)["category"])
    assert set(test.values()) == {100}
    build_toy_benchmark(3, {"val": 8}, cache_dir=tmp_path)
    build_toy_benchmark(3, {"val": 8}, cache_dir=tmp_path, train_mix=mix)
    assert len(list(tmp_path.iterdir())) == 2  # its own cache key


@pytest.mark.parametrize("mix, message", [({"count_relation": 2}, "names categories \\['count_relation'\\] not built"),
                                          ({"relation": 0}, "weights \\{'relation': 0\\} not > 0")])
def test_bad_train_mix(mix, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_toy_benchmark(0, {"val": 4}, cache_dir=tmp_path, train_mix=mix)
