"""Cluster configs: the Slurm launcher (hydra-submitit-launcher) composes with this project's resources, and the
shared-study experiment asks for a database every worker reaches."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf.errors import InterpolationResolutionError

import efficientllava  # noqa: F401  (config resolvers)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_search(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("search", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_with_one_gpu_per_job():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_search(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "experiment=paper/scienceqa_7b"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.mem_gb >= 64 and launcher.timeout_min >= 60
    assert cfg.hydra.sweep.dir.startswith("multirun/search/")


def test_local_submitit_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_search(["hydra/launcher=local"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")


def test_shared_study_needs_a_storage_url(monkeypatch):
    monkeypatch.delenv("EFFICIENTLLAVA_STUDY_URL", raising=False)
    cfg = compose_search(["experiment=shared_study"])
    assert cfg.search.shared is True and cfg.search.strategy == "evolution"
    with pytest.raises(InterpolationResolutionError, match="EFFICIENTLLAVA_STUDY_URL"):
        cfg.search.storage
    monkeypatch.setenv("EFFICIENTLLAVA_STUDY_URL", "postgresql://u@db/study")
    assert compose_search(["experiment=shared_study"]).search.storage == "postgresql://u@db/study"
    cfg = compose_search(["experiment=shared_study", "search.storage=sqlite:////tmp/shared.db", "+worker=3"])
    assert cfg.search.storage == "sqlite:////tmp/shared.db" and cfg.worker == 3
