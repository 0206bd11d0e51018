from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import efficientllava  # noqa: F401  (config resolvers)
from efficientllava.models import TOY_MODEL_DIR

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("model", ["toy", "llava15_7b"])
@pytest.mark.parametrize("logger", ["wandb", "csv", "none"])
def test_train_config_composes(model, logger):
    cfg = compose_train([f"model={model}", f"logger={logger}"])
    assert cfg.model.path
    assert cfg.data._target_.endswith("BenchmarkDataModule")


def test_toy_model_points_inside_the_package():
    cfg = compose_train()
    assert Path(cfg.model.path) == TOY_MODEL_DIR
    assert cfg.logger.wandb.offline is True


def test_unknown_config_option_is_rejected():
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        compose_train(["learning_rate=0.1"])


def test_unknown_group_option_is_rejected():
    with pytest.raises(ConfigCompositionException, match="llava99"):
        compose_train(["model=llava99"])
