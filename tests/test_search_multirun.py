"""`python search.py -m search.target_sparsity=... seed=...` runs, and collect_multirun turns it into a table + plot."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiment_scripts import load_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multirun_sweep_and_collect(tmp_path, random_toy_dir):
    toy = random_toy_dir
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "search.py", "-m", f"model.path={toy}", "model.device=cpu",
         "data.build.sizes={train:8,val:16,test:16}", f"+data.build.cache_dir={tmp_path / 'cache'}", "logger=none",
         "n_search=8", "n_heldout=8", "heldout_top=1", "speed_repeats=1", "save_pruned_model=false",
         "search.population=4", "search.generations=1", "search.top_k=2", "search.latency.min_speedup=null",
         "search.latency.repeats=1", "search.latency.measure_front=1",
         "search.target_sparsity=0.3,0.7", "seed=0,1", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, check=True, capture_output=True)
    jobs = sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file())
    assert len(jobs) == 4
    out = subprocess.run([sys.executable, "experiments/collect_multirun.py", str(sweep)], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout
    table = (sweep / "results.md").read_text()
    assert (sweep / "front.png").is_file() and table in out
    rows = [line for line in table.splitlines() if line.startswith("| evolution")]
    assert len(rows) == 4 + 2  # one per run, one per target averaged over the seeds
    assert any("| 0.3 | 2 |" in line for line in rows) and any("| 0.7 | 2 |" in line for line in rows)


def test_series_labels_name_only_the_overrides_a_run_has():
    collect_multirun = load_experiment("collect_multirun")

    def run(strategy="evolution", **overrides):
        return {"overrides": {"seed": "0", "search.target_sparsity": "0.6", **overrides},
                "summary": {"strategy": strategy}}

    runs = [run(), run(**{"experiment": "n16"}), run(**{"pruner@bank": "sparsegpt"}),
            run(**{"pruner@bank": "sparsegpt", "seed": "1"}), run(strategy="uniform", **{"search": "uniform"})]
    collect_multirun.label_series(runs)
    assert [r["series"] for r in runs] == [
        "evolution", "evolution experiment=n16", "evolution pruner@bank=sparsegpt", "evolution pruner@bank=sparsegpt",
        "uniform search=uniform"]
