import json

import pytest
import torch

from efficientllava.models import TOY_MODEL_DIR, ModelLoadError, load_llava


def test_toy_loads_through_the_same_loader_as_a_hub_id(toy):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, processor = toy
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 5e5 < n_params < 6e6
    assert (TOY_MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20


def test_dtype_from_config():
    model, _ = load_llava(TOY_MODEL_DIR, dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist; expected a local LLaVA checkpoint directory"):
        load_llava("/no/such/dir")


def test_not_a_llava_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="type 'bert'; expected a LLaVA checkpoint"):
        load_llava(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_llava(tmp_path)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="could not load a LLaVA from 'no-such-org/no-such-llava'"):
        load_llava("no-such-org/no-such-llava", local_files_only=True)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_llava(TOY_MODEL_DIR, dtype="float8")
