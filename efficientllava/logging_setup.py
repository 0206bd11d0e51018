"""Loggers from the `logger` config group (each entry is a `_target_` node); W&B stays offline unless asked."""
from __future__ import annotations

import os

from hydra.utils import instantiate


def build_loggers(cfg) -> list:
    if not cfg:
        return []
    loggers = []
    for name, node in cfg.items():
        if node is None:
            continue
        if "WandbLogger" in str(node.get("_target_", "")) and node.get("offline", True):
            os.environ.setdefault("WANDB_MODE", "offline")  # no network call, not even a login check
            os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(instantiate(node))
    return loggers
