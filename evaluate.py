"""Evaluate a LLaVA on a benchmark: `python evaluate.py model=llava15_7b data=scienceqa`.

Multiple choice (toy, ScienceQA) by option letter; VizWiz by VQA accuracy of greedy answers; MM-Vet and LLaVA-Bench
by a judge model (`judge=openai`, API key from the environment). `trainer.devices=4 trainer.strategy=ddp` spreads
the records over several devices. Writes metrics.json (and predictions.jsonl) into the Hydra run directory
(see efficientllava/evaluation_job.py).
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import efficientllava  # noqa: F401  (registers config resolvers)
from efficientllava.evaluation_job import report, run_evaluation


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    summary = run_evaluation(cfg, HydraConfig.get().runtime.output_dir)
    if summary["rank"] == 0:  # under DDP every process returns; one reports
        print(report(summary))
    return summary


if __name__ == "__main__":
    main()
