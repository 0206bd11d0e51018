"""Train the toy LLaVA from scratch and evaluate it, or evaluate any LLaVA checkpoint (eval_only=true)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import efficientllava  # noqa: F401  (registers config resolvers)
from efficientllava.evaluation import MultipleChoiceEvaluator
from efficientllava.host_memory import HostMemoryError, steady_heap
from efficientllava.logging_setup import build_loggers
from efficientllava.models import load_from_config
from efficientllava.outputs import atomic_directory, write_json
from efficientllava.toy_model import ToyArchitecture, build_toy_llava
from efficientllava.toy_training import StagedToyTraining, check_stages, format_curriculum

log = logging.getLogger("train")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:  # before anything is allocated (efficientllava/host_memory.py); numerics are unchanged
        heap = steady_heap(cfg.get("steady_heap_mib"))
    except HostMemoryError as error:
        raise HostMemoryError(f"steady_heap_mib: {error}") from None
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    if cfg.eval_only:
        model, processor = load_from_config(cfg.model)
    else:
        model, processor = build_toy_llava(ToyArchitecture(**cfg.architecture), seed=cfg.seed,
                                           attn_implementation=cfg.model.get("attn_implementation"))
    stages = check_stages(OmegaConf.to_container(cfg.stages, resolve=True))
    total_steps = sum(stage["steps"] for stage in stages.values())
    if cfg.eval_only:
        datamodule = instantiate(cfg.data, processor=processor)
    else:
        datamodule = instantiate(cfg.data, processor=processor, train_formats=format_curriculum(stages))
    categories = datamodule.categories()
    loggers = build_loggers(cfg.get("logger"))
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True)]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, max_steps=total_steps)

    summary: dict = {"model": str(cfg.model.path) if cfg.eval_only else "toy (trained here)", "seed": cfg.seed,
                     "host_heap": heap}
    if not cfg.eval_only:
        start = time.perf_counter()
        module = StagedToyTraining(model, processor, categories, stages, **OmegaConf.to_container(cfg.optim, resolve=True),
                                   scene=OmegaConf.to_container(cfg.scene, resolve=True))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
        summary["train_seconds"] = round(time.perf_counter() - start, 1)
        with atomic_directory(cfg.save_dir) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        summary["saved_to"] = str(Path(cfg.save_dir).resolve())
        log.info("model saved to %s", summary["saved_to"])

    evaluator = MultipleChoiceEvaluator(model, processor, categories, modes=cfg.eval_modes)
    trainer.test(evaluator, datamodule=datamodule)
    summary["test"] = evaluator.results
    write_json(run_dir / "metrics.json", summary)
    log.info("test accuracy: %s", {k: round(v, 2) for k, v in evaluator.results.items()})
    return summary


if __name__ == "__main__":
    main()
