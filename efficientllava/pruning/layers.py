"""The registry of prunable linear layers of a LLaVA, derived from module names alone.

Every `nn.Linear` of the vision tower, the projector and the language model gets a stable name (its module path,
exactly as `model.named_modules()` spells it), a component, a block index and a role. Nothing here knows attribute
paths: the component and block come from the name, so the registry reads the same for the transformers-5 layout
(`model.language_model.layers.3.mlp.up_proj`), the older llava-hf layout (`language_model.model.layers.3...`,
`vision_tower.vision_model.encoder.layers.0...`) and the original LLaVA repository (`model.layers.3...`,
`model.mm_projector.0`). Embeddings, `lm_head` and norms are never prunable.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch.nn as nn

COMPONENTS = ("vision_tower", "projector", "language_model")
DEFAULT_COMPONENTS = ("language_model",)
ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "out",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "fc1": "fc1",
    "fc2": "fc2",
    "linear_1": "linear_1",
    "linear_2": "linear_2",
}
NEVER_PRUNED = re.compile(r"(^|\.)(lm_head|embed_tokens|embeddings|patch_embedding|position_embedding)(\.|$)")
BLOCK = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.")
PROJECTOR = re.compile(r"(^|\.)(multi_modal_projector|mm_projector)(\.|$)")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    component: str
    block: int | None  # index of the transformer block; None for the projector
    role: str
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    @property
    def block_path(self) -> str | None:
        """Module path of the enclosing transformer block, e.g. 'model.language_model.layers.3'."""
        match = BLOCK.match(self.name)
        return f"{match['prefix']}.{match['index']}" if match else None


def classify(name: str) -> tuple[str, int | None, str] | None:
    """(component, block index, role) of a linear layer's module path, or None if it is not prunable."""
    if NEVER_PRUNED.search(name):
        return None
    parts = name.split(".")
    if "vision_tower" in parts or "vision_model" in parts:
        component = "vision_tower"
    elif PROJECTOR.search(name):
        component = "projector"
    elif BLOCK.match(name):  # any other stack of numbered blocks is the language model's decoder
        component = "language_model"
    else:
        return None
    block = BLOCK.match(name)
    leaf = parts[-1]
    if component == "projector" and leaf.isdigit():  # original LLaVA: mm_projector = Sequential(Linear, GELU, Linear)
        role = f"linear_{int(leaf) // 2 + 1}"
    else:
        role = ROLES.get(leaf, leaf)
    return component, (int(block["index"]) if block and component != "projector" else None), role


def find_layers(model: nn.Module) -> dict[str, LayerInfo]:
    """Every prunable linear layer of the model, in module order."""
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        kind = classify(name)
        if kind is None:
            continue
        component, block, role = kind
        layers[name] = LayerInfo(name, component, block, role, module.in_features, module.out_features)
    return layers


def select_layers(
    model_or_layers,
    components=DEFAULT_COMPONENTS,
    include=None,
    exclude=None,
    roles=None,
) -> dict[str, LayerInfo]:
    """The registry filtered by component, role and glob patterns over names.

    `include` keeps only names matching at least one pattern; `exclude` drops names matching any pattern. Patterns
    are shell globs (`*.mlp.*`, `*.layers.3.*`).
    """
    layers = model_or_layers if isinstance(model_or_layers, dict) else find_layers(model_or_layers)
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"pruning components {unknown} are unknown; expected a subset of {list(COMPONENTS)}")
    selected = {}
    for name, info in layers.items():
        if info.component not in components:
            continue
        if roles is not None and info.role not in roles:
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        selected[name] = info
    return selected


def select_from_config(model, cfg) -> dict[str, LayerInfo]:
    """`select_layers` with a config node holding `components`, `include`, `exclude`, `roles` (all optional)."""
    cfg = cfg or {}
    get = cfg.get
    return select_layers(
        model,
        components=list(get("components", None) or DEFAULT_COMPONENTS),
        include=list(get("include", None) or []) or None,
        exclude=list(get("exclude", None) or []) or None,
        roles=list(get("roles", None) or []) or None,
    )


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    """The linear layer at `name`; an unknown or non-linear name raises naming it."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"layer {name!r} does not exist in the model; expected a module path from find_layers()")
    if not isinstance(module, nn.Linear):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}; expected an nn.Linear")
    return module


def decoder_blocks(layers: dict[str, LayerInfo], component: str = "language_model") -> list[str]:
    """Module paths of the component's blocks, 0..max index, derived from the registry's names.

    Every block up to the deepest one holding a layer of the registry is listed, so blocks without selected layers
    still carry activations forward during calibration.
    """
    paths = {info.block: info.block_path for info in layers.values() if info.component == component}
    if not paths:
        return []
    prefixes = {p.rsplit(".", 1)[0] for p in paths.values()}
    if len(prefixes) != 1:
        raise ValueError(f"{component} layers sit under several block lists {sorted(prefixes)}; expected one")
    prefix = prefixes.pop()
    return [f"{prefix}.{i}" for i in range(max(paths) + 1)]


def total_params(layers: dict[str, LayerInfo]) -> int:
    return sum(info.params for info in layers.values())
