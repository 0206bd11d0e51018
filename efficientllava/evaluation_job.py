"""`python evaluate.py`: one model on one benchmark split, under a Lightning Trainer (one device or several).

1. The data first: the benchmark's split and how it is scored (letters, VQA accuracy, or a judge model). A
   judge-scored benchmark without a judge stops here, before the model is loaded and any answer generated
   (`predictions_only=true` writes the answers without a score instead).
2. The model (one loader for every LLaVA; refused before loading when it cannot fit the device). Under DDP on GPUs
   each process loads onto its own device (LOCAL_RANK).
3. `trainer.test`: `MultipleChoiceEvaluator` (letter, and likelihood if asked) or `OpenEndedEvaluator` (greedy
   answers); results are merged across devices by record id.
4. Rank 0 writes `metrics.json` (and for open-ended benchmarks `predictions.jsonl`, and for judged ones
   `judgements.jsonl` with each judge reply) into the run directory.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from efficientllava.data.schema import CHOICE, JUDGED, VQA, record_metric
from efficientllava.evaluation import MultipleChoiceEvaluator, OpenEndedEvaluator
from efficientllava.judge import JudgeError, require_judge, score_with_judge
from efficientllava.logging_setup import build_loggers
from efficientllava.models import load_from_config
from efficientllava.outputs import write_json

log = logging.getLogger("evaluate")

DEFAULT_NEW_TOKENS = {VQA: 16, **{m: 1024 for m in JUDGED}}  # short answers; LLaVA-1.5's limit for long ones


def benchmark_name(cfg) -> str:
    name = OmegaConf.select(cfg, "data.build.name", default=None)
    if name:
        return str(name)
    target = str(OmegaConf.select(cfg, "data.build._target_", default="") or "")
    return "toy" if target.endswith("build_toy_benchmark") else target.rsplit(".", 1)[-1] or "unknown"


def process_device(cfg):
    """The device this process loads the model onto: its own GPU under multi-GPU DDP, else the model config's."""
    import torch

    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    several = (isinstance(devices, int) and devices > 1) or (not isinstance(devices, (int, str))
                                                           and len(list(devices)) > 1)
    if several and str(cfg.model.get("device", "auto")) in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return None


def build_judge(node):
    """The configured judge, or None; its own errors (e.g. a missing API key) surface as they are."""
    if not node:
        return None
    try:
        return instantiate(node)
    except Exception as err:  # Hydra wraps the constructor's error
        if isinstance(err.__cause__, JudgeError):
            raise err.__cause__ from None
        raise


def run_evaluation(cfg, run_dir: str | Path) -> dict:
    start = time.perf_counter()
    run_dir = Path(run_dir)
    name = benchmark_name(cfg)
    datamodule = instantiate(cfg.data, processor=None)
    split = datamodule.split(cfg.data.test_split)
    if len(split) == 0:
        raise ValueError(f"split '{cfg.data.test_split}' of benchmark '{name}' is empty; expected records")
    metric = record_metric(split[0])
    judge = None
    if metric in JUDGED and not cfg.get("predictions_only", False):
        judge = build_judge(cfg.get("judge"))
        require_judge(metric, judge, name)

    model, processor = load_from_config(cfg.model, device=process_device(cfg))
    datamodule.processor = processor
    if metric == CHOICE:
        evaluator = MultipleChoiceEvaluator(model, processor, datamodule.categories(),
                                            modes=list(cfg.get("eval_modes", ["letter"])))
    else:
        new_tokens = cfg.get("max_new_tokens") or DEFAULT_NEW_TOKENS[metric]
        evaluator = OpenEndedEvaluator(model, processor, max_new_tokens=new_tokens)
    loggers = build_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, logger=loggers or False)
    trainer.test(evaluator, datamodule=datamodule, verbose=False)

    summary = {"benchmark": name, "metric": metric, "model": str(cfg.model.path), "split": cfg.data.test_split,
               "results": dict(evaluator.results), "devices": trainer.world_size, "rank": trainer.global_rank}
    if trainer.global_rank != 0:
        return summary
    run_dir.mkdir(parents=True, exist_ok=True)
    if metric != CHOICE:
        _write_jsonl(run_dir / "predictions.jsonl", evaluator.predictions)
        summary["outputs"] = {"predictions": str(run_dir / "predictions.jsonl")}
    if judge is not None:
        scores, judged = score_with_judge(evaluator.predictions, judge)
        summary["results"] = {**summary["results"], **scores}
        _write_jsonl(run_dir / "judgements.jsonl", judged)
        summary["outputs"]["judgements"] = str(run_dir / "judgements.jsonl")
    elif metric in JUDGED:
        summary["results"]["note"] = "predictions only: no judge was asked (predictions_only=true)"
    summary["seconds"] = time.perf_counter() - start
    write_json(run_dir / "metrics.json", summary)
    log.info("%s (%s) on %s: %s", name, metric, cfg.model.path,
             {k: round(v, 2) if isinstance(v, float) else v for k, v in summary["results"].items()})
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def report(summary: dict) -> str:
    r = summary["results"]
    key = "score" if "score" in r else "acc"
    value = f"{r[key]:.2f}" if key in r else "not scored"
    return (f"{summary['benchmark']} ({summary['metric']}, {summary['split']}, n={r.get('n')}): {key} {value} "
            f"- {summary['model']} on {summary['devices']} device(s)")
