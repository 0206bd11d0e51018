"""experiments/latency_accuracy.py: predicted vs measured speedup of random plans, on a random toy."""
import json

import pytest

from experiment_scripts import load_experiment
from test_search_acceleration import tiny  # noqa: F401  (module fixture: search overrides for a random toy)
from test_search_run import toy_dir  # noqa: F401

latency_accuracy = load_experiment("latency_accuracy")


def test_every_plan_is_predicted_and_measured(tiny, tmp_path, capsys):  # noqa: F811
    overrides = [o for o in tiny if not o.startswith("search.latency.min_speedup")] + [
        "search.latency.min_speedup=1.0"]
    summary = latency_accuracy.main(["--plans", "2", "--budget-plans", "1", "--out", str(tmp_path), *overrides])
    plans = summary["plans"]
    assert [p["kind"] for p in plans] == ["random", "random", "on budget"]
    for p in plans:
        assert p["predicted_speedup"] > 0 and p["measured_speedup"] > 0
        assert abs(p["ratio"] - p["measured_speedup"] / p["predicted_speedup"]) < 1e-12
    assert summary["budget"]["plans"] == 1 and summary["budget"]["met"] in (0, 1)
    assert json.loads((tmp_path / "latency_accuracy.json").read_text()) == summary
    out = capsys.readouterr().out
    assert "| measured / predicted |" in out and "all: 3 plans" in out


def test_a_search_without_speed_dimensions_is_refused(tiny, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match="no latency table to check"):
        latency_accuracy.main(["--out", str(tmp_path), *tiny, "search.structure.enabled=false",
                               "search.tokens.enabled=false"])
