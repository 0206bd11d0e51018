"""`python search.py` killed with SIGKILL mid-search and rerun in the same run dir: completed trials are reused, and
the result equals an uninterrupted run's."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def completed_keys(db: Path) -> list[str]:
    """Keys of COMPLETE trials, read straight from Optuna's SQLite schema."""
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute(
                "SELECT a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'COMPLETE' AND a.key = 'key'").fetchall()
    except sqlite3.OperationalError:  # schema not created yet, or locked for a moment
        return []
    return [json.loads(r[0]) for r in rows]


@pytest.mark.slow
def test_resume_after_sigkill_reuses_trials_and_matches_an_uninterrupted_run(tmp_path, random_toy_dir):
    toy = random_toy_dir
    args = [f"model.path={toy}", "model.device=cpu", "data.build.sizes={train:8,val:16,test:16}",
            f"+data.build.cache_dir={tmp_path / 'cache'}", "logger=none", "n_search=8", "n_heldout=8",
            "heldout_top=1", "speed_repeats=1", "search.population=4", "search.generations=10", "search.top_k=2",
            "search.projector.every=3", "search.projector.top_k=2", "search.projector.steps=2",
            "search.latency.min_speedup=null", "search.latency.repeats=1", "search.latency.measure_front=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}

    def command(run_dir):
        return [sys.executable, "search.py", *args, f"hydra.run.dir={run_dir}"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    round_1 = killed / "projector" / "round_1.safetensors"
    at_round = None
    while at_round is None or len(completed_keys(killed / "search.db")) < at_round + 2:
        # kill after the first projector round and two candidates scored with its projector
        assert proc.poll() is None, "the search ended before it could be killed"
        assert time.time() < deadline, "no projector round and trials within 300 s"
        if at_round is None and round_1.is_file():
            at_round = len(completed_keys(killed / "search.db"))
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = completed_keys(killed / "search.db")
    assert not (killed / "summary.json").exists()

    subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True)
    resumed = json.loads((killed / "summary.json").read_text())
    after = completed_keys(killed / "search.db")
    assert len(after) == len(set(after))  # no completed candidate was evaluated (stored) twice
    assert set(before) <= set(after)
    assert resumed["candidates_evaluated_this_run"] == len(after) - len(before)

    clean = tmp_path / "clean"
    subprocess.run(command(clean), cwd=ROOT, env=env, check=True, capture_output=True)
    reference = json.loads((clean / "summary.json").read_text())
    assert sorted(completed_keys(clean / "search.db")) == sorted(after)
    best = json.loads((killed / "best_policy.json").read_text())
    best_clean = json.loads((clean / "best_policy.json").read_text())
    assert best["ratios"] == best_clean["ratios"]
    assert best["search"]["fitness"] == pytest.approx(best_clean["search"]["fitness"], rel=1e-12)  # G: summation order
    assert resumed["pruned"]["heldout_acc"] == reference["pruned"]["heldout_acc"]
