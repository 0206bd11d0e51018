"""experiments/paper_table.py: methods named from their configs, seeds averaged, and a real search plus evaluate.py
runs on its pruned and dense model landing in the right cells."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import efficientllava  # noqa: F401  (config resolvers)

from experiment_scripts import load_experiment

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
paper_table = load_experiment("paper_table")


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("experiment, label", [
    ("paper/scienceqa_7b", "EfficientLLaVA"), ("paper/scienceqa_7b_sparsegpt", "SparseGPT"),
    ("paper/scienceqa_7b_wanda", "Wanda"), ("paper/scienceqa_7b_owl", "OWL (Wanda)"),
    ("paper/vizwiz_7b_ecoflap", "ECoFLaP (Wanda)"), ("no_generalization", "EfficientLLaVA (w/o Gen)"),
])
def test_methods_are_named_from_their_configs(experiment, label):
    config = OmegaConf.to_container(compose_cfg("search", [f"experiment={experiment}"]))
    assert paper_table.method_of({"strategy": config["search"]["strategy"]}, config) == label


def fake_run(path: Path, config: dict, heldout: float, dense: float):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (path / "summary.json").write_text(json.dumps({
        "strategy": config["search"]["strategy"], "model": "llava-7b", "target_sparsity": 0.5,
        "dense": {"heldout_acc": dense}, "pruned": {"heldout_acc": heldout, "sparsity": 0.5},
        "speedup": {"estimated": 1.8, "measured": 1.0}}))


def test_seeds_are_averaged_and_dense_counted_once(tmp_path):
    config = {"search": {"strategy": "evolution", "eta": 0.01}, "final": {"method": "sparsegpt"},
              "data": {"build": {"name": "scienceqa"}}}
    for seed, value in enumerate([80.0, 82.0, 84.0]):
        fake_run(tmp_path / str(seed), config, value, 85.0)
    text = paper_table.main([str(tmp_path)])
    assert "| EfficientLLaVA | 0.5 | 82.00 +- 2.00 (3) | 0.500 | 1.80x | 1.00x |" in text
    assert "| Dense | - | 85.00 | 0 | - | - |" in text
    assert (tmp_path / "paper_table.md").read_text() == text


def test_a_search_and_its_evaluations_fill_the_table(random_toy_dir, tmp_path):
    from efficientllava.evaluation_job import run_evaluation
    from efficientllava.search.loop import run_search

    search_dir = tmp_path / "multirun" / "search" / "0"
    cfg = compose_cfg("search", [
        f"model.path={random_toy_dir}", "model.device=cpu", "data.build.sizes={train:8,val:16,test:16}",
        f"+data.build.cache_dir={tmp_path / 'cache'}", "logger=none", "n_search=8", "n_heldout=16", "heldout_top=1",
        "speed_repeats=1", "search=uniform", "pruner@final=wanda", "++search.structure.enabled=false",
        "++search.tokens.enabled=false", "++search.latency.min_speedup=null"])
    summary = run_search(cfg, search_dir)
    (search_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, search_dir / ".hydra" / "config.yaml")  # what Hydra writes beside every run
    evaluations = {}
    for name, model in (("pruned", search_dir / "pruned_model"), ("dense", random_toy_dir)):
        ecfg = compose_cfg("evaluate", [
            "data=vizwiz", f"data.build.path={FIXTURES / 'vizwiz'}", f"+data.build.cache_dir={tmp_path / 'hf'}",
            f"model.path={model}", "model.device=cpu", "logger=none", "trainer.accelerator=cpu",
            f"trainer.default_root_dir={tmp_path}", "+trainer.enable_progress_bar=false", "max_new_tokens=3"])
        evaluations[name] = run_evaluation(ecfg, tmp_path / "multirun" / "evaluate" / name)["results"]["acc"]
    text = paper_table.main([str(tmp_path / "multirun"), "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "paper_table.json").read_text())}
    assert rows["Wanda"]["toy"] == [summary["pruned"]["heldout_acc"]]
    assert rows["Wanda"]["vizwiz"] == [evaluations["pruned"]]
    assert rows["Dense"]["toy"] == [summary["dense"]["heldout_acc"]]
    assert rows["Dense"]["vizwiz"] == [evaluations["dense"]]
    assert rows["Wanda"]["estimated"] == [summary["speedup"]["estimated"]]
    assert "| Wanda | 0.5 |" in text and "VizWiz" in text and "Toy" in text


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no summary.json or metrics.json under"):
        paper_table.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="not a directory"):
        paper_table.main([str(tmp_path / "nope")])
