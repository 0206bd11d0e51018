"""`evaluate.py`'s job in-process on hand-written benchmark fixtures: multiple choice matches the evaluation
function, VizWiz writes its predictions and VQA accuracy, judged benchmarks go through the judge (a local stand-in
server) or stop before the model loads when no judge is configured."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from judge_server import JudgeServer

import efficientllava  # noqa: F401  (config resolvers)
from efficientllava import evaluation_job
from efficientllava.judge import JudgeError
from efficientllava.vqa import vqa_accuracy

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
DATA = {
    "scienceqa": [f"data.build.path={FIXTURES / 'scienceqa'}"],
    "vizwiz": [f"data.build.path={FIXTURES / 'vizwiz'}"],
    "mmvet": [f"data.build.path={FIXTURES / 'mmvet' / 'mm-vet.json'}",
              f"data.build.image_root={FIXTURES / 'mmvet' / 'images'}"],
    "llava_bench": [f"data.build.path={FIXTURES / 'llava_bench'}"],
}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from efficientllava.toy_model import build_toy_llava

    path = tmp_path_factory.mktemp("toy")
    model, processor = build_toy_llava(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def config(toy_dir, tmp_path, data, *extra):
    overrides = [f"data={data}", *DATA[data], f"+data.build.cache_dir={tmp_path / 'hf'}", f"model.path={toy_dir}",
                 "model.device=cpu", "logger=none", "trainer.accelerator=cpu", f"trainer.default_root_dir={tmp_path}",
                 "+trainer.enable_progress_bar=false", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def test_scienceqa_matches_the_evaluation_function(toy_dir, tmp_path):
    from efficientllava.data.benchmarks import load_benchmark
    from efficientllava.evaluation import evaluate
    from efficientllava.models import load_llava

    summary = evaluation_job.run_evaluation(config(toy_dir, tmp_path, "scienceqa"), tmp_path / "run")
    model, processor = load_llava(toy_dir, device="cpu")
    records = load_benchmark("scienceqa", str(FIXTURES / "scienceqa"), cache_dir=str(tmp_path / "hf"))["test"]
    assert summary["results"]["acc"] == pytest.approx(evaluate(model, processor, records)["acc"])
    assert summary["results"]["n"] == len(records) and summary["metric"] == "choice"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["benchmark"] == "scienceqa"


def test_vizwiz_writes_predictions_scored_by_vqa_accuracy(toy_dir, tmp_path):
    summary = evaluation_job.run_evaluation(config(toy_dir, tmp_path, "vizwiz", "max_new_tokens=3"), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == summary["results"]["n"] == 4
    expected = 100 * sum(vqa_accuracy(r["prediction"], r["answers"]) for r in rows) / len(rows)
    assert summary["results"]["acc"] == pytest.approx(expected)


def test_judged_benchmark_without_judge_stops_before_loading_the_model(toy_dir, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing judge was caught")

    monkeypatch.setattr(evaluation_job, "load_from_config", no_load)
    with pytest.raises(JudgeError, match="benchmark 'mmvet' is scored by a judge model and no judge is configured"):
        evaluation_job.run_evaluation(config(toy_dir, tmp_path, "mmvet"), tmp_path / "run")
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match=r"\$NO_SUCH_JUDGE_KEY, which is not set"):
        evaluation_job.run_evaluation(config(toy_dir, tmp_path, "llava_bench", "judge=openai",
                                             "judge.api_key_env=NO_SUCH_JUDGE_KEY"), tmp_path / "run")


@pytest.mark.parametrize("data, reply, key", [("mmvet", "0.4", "score/ocr"), ("llava_bench", "8 4\nshort", "score/conv")])
def test_judged_benchmark_scored_through_the_judge(toy_dir, tmp_path, monkeypatch, data, reply, key):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-local")
    with JudgeServer(lambda prompt: reply) as server:
        cfg = config(toy_dir, tmp_path, data, "judge=openai", f"judge.base_url={server.url}",
                     "judge.api_key_env=TEST_JUDGE_KEY", "judge.model=local-grader", "max_new_tokens=4")
        summary = evaluation_job.run_evaluation(cfg, tmp_path / "run")
    judged = [json.loads(line) for line in (tmp_path / "run" / "judgements.jsonl").read_text().splitlines()]
    assert len(server.requests) == len(judged) == summary["results"]["n"]
    expected = 40.0 if data == "mmvet" else 50.0  # 0.4 each; 4 / 8 of the reference
    assert summary["results"]["score"] == pytest.approx(expected) and summary["results"][key] == pytest.approx(expected)
    assert summary["results"]["judge"].startswith("local-grader")


def test_predictions_only_writes_answers_without_a_score(toy_dir, tmp_path):
    summary = evaluation_job.run_evaluation(config(toy_dir, tmp_path, "mmvet", "predictions_only=true",
                                                   "max_new_tokens=2"), tmp_path / "run")
    assert "score" not in summary["results"] and "predictions only" in summary["results"]["note"]
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 4
