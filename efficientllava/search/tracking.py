"""Logging a search to the configured loggers (conf/logger): per generation and at the end.

With W&B (offline unless `logger.wandb.offline=false`; nothing waits for the network) every generation logs a
`wandb.Table` of all candidates so far, a scatter plot of accuracy vs speedup over it (measured, predicted by the
latency table or estimated: `speedup_kind`), and updates the run summary. Other Lightning loggers (CSV) get the
scalar metrics. No logger: nothing happens.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

COLUMNS = ("id", "strategy", "generation", "projector_round", "search_acc", "heldout_acc", "sparsity", "speedup",
           "speedup_kind", "G", "fitness", "on_front")


class SearchTracker:
    def __init__(self, loggers: list, config: dict | None = None):
        self.loggers = list(loggers or [])
        self.wandb_runs = []
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                run = logger.experiment
                if config:
                    run.config.update(config, allow_val_change=True)
                self.wandb_runs.append(run)

    def _metrics(self, step: int, metrics: dict) -> None:
        for logger in self.loggers:
            if type(logger).__name__ != "WandbLogger":
                logger.log_metrics(metrics, step=step)

    def generation(self, step: int, rows: list[dict], best: dict) -> None:
        metrics = {f"search/best_{k}": float(best[k]) for k in ("fitness", "search_acc", "G", "sparsity")
                   if best.get(k) is not None}
        metrics["search/candidates"] = float(len(rows))
        self._metrics(step, metrics)
        if not self.wandb_runs:
            return
        import wandb

        table = wandb.Table(columns=list(COLUMNS),
                            data=[[r.get(c) if c != "on_front" else bool(r.get(c)) for c in COLUMNS] for r in rows])
        for run in self.wandb_runs:
            run.log({**metrics, "search/candidate_table": table,
                     "search/front": wandb.plot.scatter(table, "speedup", "search_acc",
                                                        title="accuracy vs speedup (speedup_kind says how)")}, step=step)
            run.summary.update(metrics)

    def finish(self, summary: dict, step: int) -> None:
        flat = {f"final/{k}": v for k, v in _flatten(summary).items() if isinstance(v, (int, float, str, bool))}
        self._metrics(step, {k: float(v) for k, v in flat.items() if isinstance(v, (int, float))})
        for logger in self.loggers:
            try:
                logger.save()
                logger.finalize("success")
            except Exception as err:  # a logger failing at the end must not lose the run's outputs
                log.warning("logger %s did not finalize: %s", type(logger).__name__, err)
        for run in self.wandb_runs:
            run.summary.update(flat)
            run.finish()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out
