"""The GPU benchmarks' code paths at LLaVA-1.5's scaled-down shape on the CPU, so a lent GPU runs them unchanged."""

import pytest
import torch

from efficientllava.llava15_shapes import check_shape, random_batch, random_llava

from experiment_scripts import load_experiment


def test_random_llava_and_its_batches():
    model = random_llava("scaled-down", "cpu", torch.float32)
    batch = random_batch(model, 2, text_tokens=10)
    assert batch["input_ids"].shape == (2, 576 + 10)  # LLaVA-1.5's 576 image tokens between the text
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == 2 * 576
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 586, 32064)
    with pytest.raises(ValueError, match="shape '70b' is unknown"):
        check_shape("70b")


def test_bench_scoring_refuses_a_7b_on_the_cpu():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        load_experiment("bench_scoring").main(["--shape", "7b", "--device", "cpu"])


@pytest.mark.slow
def test_bench_scoring_runs_both_scorings(capsys):
    rows = load_experiment("bench_scoring").main(["--shape", "scaled-down", "--device", "cpu", "--n", "8",
                                                  "--batch-size", "4", "--repeats", "1"])
    assert [r[0] for r in rows] == ["letter", "likelihood"]
    assert all(float(r[2]) > 0 and float(r[4]) >= float(r[2]) for r in rows)
    assert "| scoring | tokens |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_pruning_whole_model_prunes_every_language_model_linear(capsys):
    load_experiment("bench_pruning").bench_whole("scaled-down", torch.device("cpu"), samples=8, batch_size=4)
    out = capsys.readouterr().out
    for method in ("| wanda | 14 |", "| wanda (operator only) | 14 |", "| sparsegpt | 14 |"):
        assert method in out  # 2 blocks x 7 linears


@pytest.mark.slow
def test_bench_pruning_first_blocks_only(capsys):
    load_experiment("bench_pruning").bench_whole("scaled-down", torch.device("cpu"), samples=4, batch_size=4, blocks=1,
                                      methods=("sparsegpt",))
    out = capsys.readouterr().out
    assert "First 1 decoder blocks" in out and "| sparsegpt | 7 |" in out and "wanda" not in out
