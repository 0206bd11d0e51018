"""One loader for every LLaVA: a hub id or a local directory, through `LlavaForConditionalGeneration`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_MODEL_DIR = ASSETS / "toy_llava"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model path or id that does not lead to a LLaVA checkpoint."""


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model dtype {dtype!r} is unknown; expected one of {list(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_local_checkpoint(path: Path) -> None:
    """A local directory must hold a config.json of model_type 'llava'."""
    if not path.is_dir():
        raise ModelLoadError(f"model path '{path}' is not a directory; expected a LLaVA checkpoint directory")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"'{path}' has no config.json; expected a LLaVA checkpoint saved with save_pretrained")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "llava":
        raise ModelLoadError(f"'{path}' holds a model of type {model_type!r}; expected a LLaVA checkpoint ('llava')")


def load_llava(path: str | Path, dtype="float32", device: str | None = "auto", local_files_only: bool = False):
    """(model, processor) from a local directory or a hub id such as 'llava-hf/llava-1.5-7b-hf'.

    Weights load from safetensors only; no remote code runs. The model is returned in eval mode.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = str(path)
    local = Path(path).expanduser()
    if local.exists():
        check_local_checkpoint(local)
        source = str(local)
    elif HUB_ID.match(path):
        source = path
    else:
        raise ModelLoadError(
            f"model path '{path}' does not exist; expected a local LLaVA checkpoint directory or a hub id 'org/name'"
        )
    kwargs = dict(local_files_only=local_files_only, trust_remote_code=False)
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        model = LlavaForConditionalGeneration.from_pretrained(
            source, dtype=resolve_dtype(dtype), use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a LLaVA from '{path}': {err}") from err
    return model.to(resolve_device(device)).eval(), processor


def load_from_config(cfg):
    """`load_llava` with a Hydra `model` config node (path, dtype, device)."""
    return load_llava(cfg.path, dtype=cfg.get("dtype", "float32"), device=cfg.get("device", "auto"))
