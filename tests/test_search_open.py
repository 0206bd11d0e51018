"""The search on a VQA-scored benchmark (a VizWiz-schema fixture): candidates scored by VQA accuracy of greedy
answers, the final pruned model's held-out score reproducible from its saved checkpoint; judge-scored benchmarks
refused before any work."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import efficientllava  # noqa: F401  (config resolvers)
from efficientllava.search import loop
from efficientllava.search.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
# the paper's setting: per-layer weight sparsity only (whatever else the search space may offer)
WEIGHTS_ONLY = ["++search.structure.enabled=false", "++search.tokens.enabled=false",
                "++search.latency.min_speedup=null", "++search.latency.max_prefill_ms=null"]


def search_config(toy_dir, tmp_path, *extra):
    overrides = [f"model.path={toy_dir}", "model.device=cpu", "logger=none", f"+data.build.cache_dir={tmp_path / 'hf'}",
                 "speed_repeats=1", "heldout_top=1", "search.population=3", "search.generations=2",
                 "search.top_k=2", "search.projector.every=1", "search.projector.top_k=2",
                 "search.projector.steps=1", "search.choices=[0.0,0.3,0.5,0.7]", *WEIGHTS_ONLY, *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("search", overrides=overrides)


def test_vizwiz_search_scores_candidates_by_vqa_accuracy(random_toy_dir, tmp_path):
    from efficientllava.data.benchmarks import load_benchmark
    from efficientllava.evaluation import evaluate_open
    from efficientllava.models import load_llava

    cfg = search_config(random_toy_dir, tmp_path, "data=vizwiz", f"data.build.path={FIXTURES / 'vizwiz'}",
                        "search_split=train", "heldout_split=val", "n_search=3", "+max_new_tokens=3")
    summary = loop.run_search(cfg, tmp_path / "run")
    data = load_benchmark("vizwiz", str(FIXTURES / "vizwiz"),
                          data_files={"train": "Annotations/train.json", "val": "Annotations/val.json"},
                          image_root=str(FIXTURES / "vizwiz" / "{split}"), cache_dir=str(tmp_path / "hf"))
    dense, processor = load_llava(random_toy_dir, device="cpu")
    expected_dense, _ = evaluate_open(dense, processor, list(data["train"]), max_new_tokens=3)
    assert summary["dense"]["search_acc"] == pytest.approx(expected_dense["acc"])
    pruned, processor = load_llava(tmp_path / "run" / "pruned_model", device="cpu")
    expected_pruned, _ = evaluate_open(pruned, processor, list(data["val"]), max_new_tokens=3)
    assert summary["pruned"]["heldout_acc"] == pytest.approx(expected_pruned["acc"])
    assert summary["n_heldout"] == 4 and abs(summary["pruned"]["policy_sparsity"] - 0.5) <= 0.005
    assert summary["candidates_evaluated"] >= 3 and summary["projector_rounds"]


def test_judge_scored_benchmark_is_refused_before_any_work(random_toy_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the judge-scored data was refused")

    monkeypatch.setattr(loop.SearchRun, "reference", fail)
    cfg = search_config(random_toy_dir, tmp_path, "data=mmvet", f"data.build.path={FIXTURES / 'mmvet' / 'mm-vet.json'}",
                        f"data.build.image_root={FIXTURES / 'mmvet' / 'images'}",
                        "~data.build.splits", "+data.build.splits={search:test,heldout:test}", "data.val_split=heldout",
                        "data.test_split=heldout", "search_split=search", "heldout_split=heldout", "n_search=2")
    with pytest.raises(SettingsError, match=r"scored by a judge model \(mmvet\); a search scores hundreds of "
                                            "candidates and calls no judge"):
        loop.run_search(cfg, tmp_path / "run")
