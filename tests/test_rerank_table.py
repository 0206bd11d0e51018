"""experiments/rerank_table.py: what a rerank of m tries keeps, read from the runs' summary.json."""
import json

import pytest

from experiment_scripts import load_experiment

rerank_table = load_experiment("rerank_table")


def write_run(path, target, tried, chosen):
    path.mkdir(parents=True)
    final = next(t["heldout_acc"] for t in tried if t["id"] == chosen)
    summary = {"target_sparsity": target, "pruned": {"heldout_acc": final},
               "final_rerank": {"tried": tried, "chosen": chosen, "changed": chosen != tried[0]["id"]}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_a_rerank_of_m_keeps_the_best_final_fitness_among_the_first_m(tmp_path):
    tried = [{"id": 10, "fitness": 0.60, "heldout_acc": 70.0}, {"id": 11, "fitness": 0.62, "heldout_acc": 71.0},
             {"id": 12, "fitness": 0.61, "heldout_acc": 69.0}, {"id": 13, "fitness": 0.63, "heldout_acc": 72.0},
             {"id": 14, "fitness": 0.65, "heldout_acc": 68.0}]
    a = write_run(tmp_path / "a", 0.6, tried, chosen=14)
    b = write_run(tmp_path / "b", 0.6, [{**t, "heldout_acc": t["heldout_acc"] + 2} for t in tried], chosen=14)
    assert rerank_table.pick(tried, 1)["id"] == 10 and rerank_table.pick(tried, 3)["id"] == 11
    row = rerank_table.run_row(a, m=4)
    assert (row["first"], row["rerank_4"], row["final"], row["chosen_position"]) == (70.0, 72.0, 68.0, 5)
    assert row["range"] == (68.0, 72.0) and row["evaluated"] == 5
    out = rerank_table.main([str(a), str(b), "--m", "2"])
    assert "| 0.6 | 70.00 | 71.00 | 68.00 (5) | 5 | 68.00-72.00 (5) |" in out
    assert "| mean ± std, 2 run(s) | 0.6 | 71.00 ± 1.41 | 72.00 ± 1.41 | 69.00 ± 1.41 | | |" in out


def test_tries_without_held_out_accuracy_show_a_dash(tmp_path):
    tried = [{"id": 1, "fitness": 0.5, "heldout_acc": 70.0}, {"id": 2, "fitness": 0.7}]
    run = write_run(tmp_path / "r", 0.7, [tried[0]], chosen=1)
    summary = json.loads((run / "summary.json").read_text())
    summary["final_rerank"]["tried"] = tried
    (run / "summary.json").write_text(json.dumps(summary))
    row = rerank_table.run_row(run, m=2)
    assert row["rerank_2"] is None and row["evaluated"] == 1 and row["chosen_position"] == 1


def test_runs_without_a_rerank_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="summary.json is missing"):
        rerank_table.run_row(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"final_rerank": None}))
    with pytest.raises(SystemExit, match="has no final rerank; expected a run with final_rerank > 1"):
        rerank_table.run_row(tmp_path)
    with pytest.raises(SystemExit, match="--m is 0"):
        rerank_table.main([str(tmp_path), "--m", "0"])
