"""Auto-prune a LLaVA: search per-layer sparsity under a budget, prune the best policy, write the Pareto front.

`python search.py` searches the shipped toy (evolution, 64 samples, target 0.5); `search=uniform|owl|ecoflap|random`
runs a baseline; `experiment=no_generalization` etc. runs an ablation; rerunning with the same `hydra.run.dir`
resumes. Outputs land in the Hydra run directory (see efficientllava/search/loop.py).
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import efficientllava  # noqa: F401  (registers config resolvers)
from efficientllava.search.loop import report, run_search


@hydra.main(config_path="conf", config_name="search", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    summary = run_search(cfg, HydraConfig.get().runtime.output_dir)
    print(report(summary))
    return summary


if __name__ == "__main__":
    main()
