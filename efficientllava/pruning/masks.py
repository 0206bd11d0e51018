"""Kept-masks on disk: one safetensors file holding a bool mask per layer and the model's identity.

The identity is the layer names and weight shapes the masks were made for; loading them against a model whose
layers differ raises an error naming the first mismatch. `apply_masks` zeroes the pruned weights (W <- W * mask),
which reproduces a magnitude or Wanda pruning exactly; a SparseGPT pruning also changed the kept weights, so its
masks alone only give the mask, not the update (save the model with save_pretrained for that).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from efficientllava.pruning.layers import find_layers, get_linear

FORMAT = "efficientllava.masks/1"


class MaskMismatchError(ValueError):
    """Masks that were made for another model."""


def model_identity(model: nn.Module, names=None) -> dict[str, list[int]]:
    """{layer name: [out_features, in_features]} for the named (default: all prunable) layers."""
    registry = find_layers(model)
    names = list(registry) if names is None else list(names)
    return {n: [registry[n].out_features, registry[n].in_features] for n in names if n in registry}


def check_identity(model: nn.Module, identity: dict[str, list[int]], source: str = "masks") -> None:
    registry = find_layers(model)
    for name, shape in identity.items():
        if name not in registry:
            raise MaskMismatchError(
                f"{source} hold layer {name!r}, which this model does not have; expected masks made for this model"
            )
        have = [registry[name].out_features, registry[name].in_features]
        if list(shape) != have:
            raise MaskMismatchError(
                f"{source} hold layer {name!r} with shape {list(shape)}; this model's layer is {have}"
            )


def save_masks(path: str | Path, masks: dict[str, torch.Tensor], model: nn.Module, metadata: dict | None = None):
    """Write masks + the model identity (+ free-form metadata, e.g. method and policy) to a safetensors file."""
    from safetensors.torch import save_file

    identity = {n: list(m.shape) for n, m in masks.items()}
    check_identity(model, identity, source="the masks to save")
    header = {
        "format": FORMAT,
        "identity": json.dumps(identity),
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        "metadata": json.dumps(metadata or {}),
    }
    tensors = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in masks.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def load_masks(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Masks from a file written by save_masks; with `model`, checked against its layers first."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file '{path}' does not exist; expected a file written by save_masks")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise MaskMismatchError(f"'{path}' is not a mask file (format {header.get('format')!r}); expected {FORMAT}")
        identity = json.loads(header["identity"])
        if model is not None:
            check_identity(model, identity, source=f"masks in '{path}'")
        return {name: f.get_tensor(name) for name in f.keys()}


def mask_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("metadata", "{}"))


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight whose mask is False (checks every mask's layer and shape before touching any)."""
    check_identity(model, {n: list(m.shape) for n, m in masks.items()})
    with torch.no_grad():
        for name, mask in masks.items():
            weight = get_linear(model, name).weight
            weight.mul_(mask.to(weight.device, weight.dtype))
