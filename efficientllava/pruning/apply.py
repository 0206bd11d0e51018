"""Pruning a model in place by a per-layer policy: check everything, calibrate block by block, prune, or roll back.

`prune_model(model, {"model.language_model.layers.0.mlp.up_proj": 0.5, ...}, "wanda", batches)` checks the whole
policy against the model before any weight changes, then prunes each named layer at its ratio (or N:M pattern) and
returns the kept-masks. If anything fails midway, every weight already changed is restored from a CPU copy and the
error is re-raised with a note saying so (`backup=False` saves that memory; the note then lists the pruned layers).
"""
from __future__ import annotations

import difflib
from contextlib import closing
import logging

import torch
import torch.nn as nn

from efficientllava.pruning.calibration import calibrated_blocks, check_batches
from efficientllava.pruning.layers import find_layers, get_linear
from efficientllava.pruning.operators import (
    NEEDS,
    Target,
    check_fits,
    check_method,
    inverse_hessian_factor,
    parse_target,
    prune_weight,
)

log = logging.getLogger(__name__)


class PolicyError(ValueError):
    """A policy that does not fit the model (unknown layer, bad ratio, N:M that does not divide the layer)."""


def check_policy(model: nn.Module, policy: dict) -> dict[str, Target]:
    """Every layer of the policy as a Target; raises PolicyError naming the first thing that does not fit."""
    if not hasattr(policy, "items"):
        raise PolicyError(f"policy is a {type(policy).__name__}; expected a mapping layer name -> ratio or 'N:M'")
    registry = find_layers(model)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = {}
    for name, value in policy.items():
        if name not in registry:
            if name in linear_names:
                raise PolicyError(
                    f"policy names layer {name!r}, which is not prunable (embeddings, lm_head and norms never are); "
                    "expected a layer from find_layers()"
                )
            close = difflib.get_close_matches(str(name), list(registry), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolicyError(
                f"policy names layer {name!r}, which does not exist in the model{hint}; expected a module path "
                "from find_layers(), e.g. 'model.language_model.layers.0.mlp.up_proj'"
            )
        try:
            target = parse_target(value, layer=name)
            check_fits(target, registry[name].in_features, layer=name)
        except ValueError as err:
            raise PolicyError(str(err)) from None
        targets[name] = target
    return targets


def prune_model(
    model: nn.Module,
    policy: dict,
    method: str = "sparsegpt",
    batches=None,
    sequential: bool = True,
    blocksize: int = 128,
    damp: float = 0.01,
    offload: bool = False,
    backup: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune the policy's layers in place; returns {layer name: bool kept-mask on the CPU}.

    `batches`: collated calibration batches (dicts with input_ids, attention_mask, pixel_values; extra keys such
    as labels and last_index are dropped); not needed by magnitude.
    `sequential`: each block is calibrated on the outputs of the already pruned blocks (True) or of the dense
    model (False, one-shot).
    """
    check_method(method)
    targets = check_policy(model, policy)
    need = NEEDS[method]
    if need:
        batches = check_batches(batches)
    registry = find_layers(model)
    masks: dict[str, torch.Tensor] = {}
    active = []
    for name, target in targets.items():
        if target.pruned_per_row(registry[name].in_features) == 0:
            masks[name] = torch.ones(registry[name].out_features, registry[name].in_features, dtype=torch.bool)
        else:
            active.append(name)

    originals: dict[str, torch.Tensor] = {}
    pruned: list[str] = []

    def prune_one(name: str, stats=None) -> None:
        layer = get_linear(model, name)
        if backup:
            originals[name] = layer.weight.detach().to("cpu", copy=True)
        options = {"blocksize": blocksize, "damp": damp} if method == "sparsegpt" else {}
        if method == "sparsegpt":  # factored here so that a singular Hessian names its layer
            options["factor"] = inverse_hessian_factor(stats.hessian.to(layer.weight.device), damp, layer=name)
        weight, keep = prune_weight(method, layer.weight, targets[name], stats, **options)
        with torch.no_grad():
            layer.weight.copy_(weight)
        pruned.append(name)
        masks[name] = keep.cpu()

    try:
        if not need:
            for name in active:
                prune_one(name)
        else:
            with closing(calibrated_blocks(model, batches, active, need, sequential, offload)) as groups:
                for group, stats in groups:
                    for name in group:
                        prune_one(name, stats.pop(name))
    except BaseException as err:
        if backup:
            restore_weights(model, originals)
            err.add_note(f"prune_model: {len(pruned)} layer(s) had been pruned; their dense weights were restored")
        else:
            err.add_note(f"prune_model: the model is HALF-PRUNED (no backup); layers already pruned: {pruned}")
        raise
    log.info("pruned %d layer(s) with %s (%s)", len(active), method, "sequential" if sequential else "one-shot")
    return {name: masks[name] for name in targets}


def restore_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved weights back into the named linear layers."""
    with torch.no_grad():
        for name, weight in weights.items():
            get_linear(model, name).weight.copy_(weight)


def sparsity(model: nn.Module, names) -> float:
    """Fraction of exact zeros over the named layers' weights."""
    zeros = total = 0
    for name in names:
        weight = get_linear(model, name).weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)


def pruner_options(cfg) -> dict:
    """prune_model keyword arguments from a `pruner` config node (conf/pruner/*.yaml)."""
    get = cfg.get
    return {
        "method": get("method", "sparsegpt"),
        "sequential": bool(get("sequential", True)),
        "blocksize": int(get("blocksize", 128)),
        "damp": float(get("damp", 0.01)),
        "offload": bool(get("offload", False)),
    }
