"""One loader for every LLaVA: a hub id or a local directory, through `LlavaForConditionalGeneration`.

Before any weight is read, the config's parameter count (the model built on the meta device, so nothing is
allocated) times the dtype's size is checked against the free memory of the target device: a model that cannot fit
is refused with both numbers. `random_init=True` builds the model from the checkpoint's config with random weights
(for timing the pipeline at a real model's shape without its weights); the processor still comes from the path.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent / "assets"
TOY_MODEL_DIR = ASSETS / "toy_llava"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model path or id that does not lead to a LLaVA checkpoint."""


class ModelTooLargeError(ModelLoadError):
    """A model whose weights alone need more memory than the target device has free."""


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


def parameter_count(config) -> int:
    """Parameters of the LLaVA a config describes, counted on the meta device (no memory allocated)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config)
    return sum(p.numel() for p in model.parameters())


def free_memory(device: torch.device) -> int | None:
    """Free bytes on the device: CUDA's free memory, or the host's available memory for the CPU; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_fits(path: str, n_params: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ModelTooLargeError when the weights alone need more than the device's free memory."""
    need = n_params * torch.empty((), dtype=dtype).element_size()
    free = free_memory(device)
    if free is not None and need > free:
        gib = 2**30
        raise ModelTooLargeError(
            f"model '{path}' has {n_params / 1e9:.2f}B parameters: its weights need {need / gib:.1f} GiB in "
            f"{str(dtype).replace('torch.', '')}, but {device} has {free / gib:.1f} GiB free; expected a device with "
            "more free memory (or model.device=..., or a smaller model.dtype such as bfloat16)")


def load_llava(path: str | Path, dtype="float32", device: str | None = "auto", local_files_only: bool = False,
               check_memory: bool = True, random_init: bool = False, seed: int = 0,
               attn_implementation: str | None = None, trim_vision_tower: bool = False):
    """(model, processor) from a local directory or a hub id such as 'llava-hf/llava-1.5-7b-hf'.

    Weights load from safetensors only; no remote code runs. The model is returned in eval mode. With
    `check_memory` the model's size is checked against the device's free memory before any weight is read.
    `random_init` builds the model from the config with random weights (seeded) instead of loading weights.
    A model saved after structured shrinking is rebuilt at its recorded per-block sizes
    (`pruning/structured.load_shrunk`), and visual-token pruning saved with a model is re-attached.
    `attn_implementation` (e.g. 'eager', 'sdpa') sets the attention kernels of every sub-model; None keeps
    transformers' default. `trim_vision_tower` drops the vision-tower layers after the one LLaVA reads its image
    features from (`trim_vision_tower` below): the same outputs, less work.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from efficientllava.pruning.structured import RECORD_KEY, load_shrunk
    from efficientllava.token_pruning import attach_from_config

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
    torch_dtype, target = resolve_dtype(dtype), resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a LLaVA from '{path}': {err}") from err
    if config.model_type != "llava":
        raise ModelLoadError(f"'{path}' holds a model of type {config.model_type!r}; expected a LLaVA checkpoint "
                             "('llava')")
    if check_memory:
        check_fits(path, parameter_count(config), torch_dtype, target)
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        if random_init:
            torch.manual_seed(seed)
            with torch.device(target):
                model = LlavaForConditionalGeneration._from_config(config, dtype=torch_dtype)
        elif getattr(config, RECORD_KEY, None) is not None:  # structurally shrunk: rebuilt at its recorded sizes
            model = load_shrunk(source, dtype=torch_dtype)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch_dtype, use_safetensors=True,
                                                                  **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a LLaVA from '{path}': {err}") from err
    if attn_implementation is not None:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError) as err:
            raise ModelLoadError(f"attention implementation {attn_implementation!r} is not available for '{path}': "
                                 f"{err}; expected one transformers supports here, e.g. 'eager' or 'sdpa'") from err
    if trim_vision_tower:
        trim_vision_tower_layers(model)
    attach_from_config(model)  # visual-token pruning recorded with the model, if any
    return model.to(target).eval(), processor


def trim_vision_tower_layers(model) -> int:
    """Drop the vision-tower layers whose output no image feature reads; returns how many went.

    LLaVA-1.5 takes its image features from the vision tower's second-to-last layer (`vision_feature_layer: -2`),
    so its forward computes the last layer and throws the result away (serving engines such as vLLM build the tower
    only up to the feature layer). The layers after the deepest feature layer are removed and the configs rewritten
    to match (the feature layers as non-negative indices, the tower's `num_hidden_layers`), so outputs are unchanged
    and a trimmed model saves and loads back as an ordinary LLaVA. A tower without `encoder.layers` and
    `num_hidden_layers`, or one whose last layer is read, is left as it is.
    """
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    n_layers = getattr(getattr(tower, "config", None), "num_hidden_layers", None)
    feature = getattr(model.config, "vision_feature_layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or n_layers != len(layers) or feature is None:
        logger.info("vision tower not trimmed: expected encoder.layers matching config.num_hidden_layers")
        return 0
    states = n_layers + 1  # hidden states: the embeddings' output, then one per layer
    wanted = [feature] if isinstance(feature, int) else list(feature)
    if any(not -states <= i < states for i in wanted):
        raise ModelLoadError(f"vision_feature_layer {feature!r} is outside the vision tower's {states} hidden states; "
                             f"expected indices in [-{states}, {states - 1}]")
    wanted = [i % states for i in wanted]
    keep = max(wanted)
    if keep >= n_layers:
        return 0
    del layers[keep:]
    tower.config.num_hidden_layers = keep
    model.config.vision_config.num_hidden_layers = keep
    model.config.vision_feature_layer = wanted[0] if isinstance(feature, int) else wanted
    return n_layers - keep


def model_device(model) -> torch.device:
    """The device of a model's (first) parameters."""
    return next(model.parameters()).device


def cache_argument(module) -> str:
    """The keyword a transformers forward takes its key/value cache by: `cache` from transformers 5.24 on,
    `past_key_values` before (5.24 still accepts the old name, with a warning, until 5.40)."""
    forward = getattr(module, "forward", module)  # a module, or a plain callable standing in for one
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_in(kwargs: dict):
    """The key/value cache a forward (or a forward hook) was called with, under either of its names (None: none)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's output for each image, as (batch, image tokens, hidden)."""
    out = model.get_image_features(pixel_values=pixel_values)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = torch.stack(list(out))
    return out.reshape(pixel_values.shape[0], -1, out.shape[-1])


def load_from_config(cfg, device=None):
    """`load_llava` with a Hydra `model` config node (path, dtype, device, check_memory, random_init, seed,
    attn_implementation, trim_vision_tower);
    `device` overrides the node's device (e.g. one GPU per process under DDP)."""
    return load_llava(cfg.path, dtype=cfg.get("dtype", "float32"),
                      device=device if device is not None else cfg.get("device", "auto"),
                      check_memory=cfg.get("check_memory", True), random_init=cfg.get("random_init", False),
                      seed=cfg.get("seed", 0), attn_implementation=cfg.get("attn_implementation"),
                      trim_vision_tower=cfg.get("trim_vision_tower", False))
