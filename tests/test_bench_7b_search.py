"""experiments/bench_7b_search.py: LLaVA-1.5's real shapes (counted on the meta device, nothing allocated) and the
whole search pipeline end to end at scaled-down widths on the CPU, so the GPU run is the same command."""
import json
from pathlib import Path

import pytest

from efficientllava.llava15_shapes import llava15_config
from efficientllava.models import parameter_count

from experiment_scripts import load_experiment

bench = load_experiment("bench_7b_search")


def test_llava15_shapes_have_the_published_sizes():
    assert 7.05e9 < parameter_count(llava15_config("7b")) < 7.07e9  # "7B": 7.06B on the hub
    assert 13.3e9 < parameter_count(llava15_config("13b")) < 13.4e9
    config = llava15_config("scaled-down")  # narrower and shallower, same image tokens and vocabulary
    assert config.image_seq_length == 576 and config.text_config.vocab_size == 32064


@pytest.mark.slow
def test_scaled_down_run_goes_through_the_whole_pipeline(tmp_path, capsys):
    result = bench.main(["--scaled-down", "--device", "cpu", "--n-search", "8", "--n-heldout", "8",
                         "--population", "4", "--generations", "2", "--projector-steps", "1", "--projector-every", "1", "--batch-size", "8",
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    run_dir = Path(result["run_dir"])
    assert json.loads((run_dir / "bench.json").read_text()) == result
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["candidates"] == summary["candidates_evaluated"] >= 4 and result["n_search"] == 8
    assert result["final_prune_seconds"] > 0 and result["seconds_per_candidate"] > 0
    assert abs(summary["pruned"]["policy_sparsity"] - 0.5) <= 0.005 and summary["projector_rounds"]
    for line in ("time per candidate:", "final prune (SparseGPT, sequential):", "peak GPU memory: n/a (CPU run)"):
        assert line in out
