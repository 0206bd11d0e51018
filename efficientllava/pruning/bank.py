"""A bank of pruned weights: every (layer, ratio) pruned once, so a candidate policy is assembled by copying.

A search evaluates hundreds of policies; re-running SparseGPT for each is out of reach on a 7B (minutes per policy).
The bank calibrates once on the dense model (one-shot: every layer sees dense activations), prunes each selected
layer at each choice of the set (e.g. 0.0, 0.1, ..., 0.8, "2:4") and keeps the result. `assemble(model, policy)`
then writes the chosen weights into the model with no pruning call, and `restore(model)` puts the dense weights back.
Assembling a policy equals `prune_model(..., sequential=False)` with that policy, weight for weight.

Modes (`mode`):
- "weights": the pruned weight per (layer, choice). Exact for every method. Costs about (choices) x (model size).
- "masks": a bit-packed kept-mask per (layer, choice); assembly computes W_dense * mask. Exact for magnitude and
  Wanda (they do not change kept weights); for SparseGPT it keeps SparseGPT's mask but LOSES its weight update.
  Costs (choices) / 8 bytes per weight.
Storage (`directory`): None keeps everything in memory on `device` (default the CPU; "model" puts it beside the model,
so that assembly on a GPU moves nothing over PCIe); a directory writes one safetensors file per layer (its dense weight
and every choice) that assembly reads memory-mapped, for 7B-sized banks.
"""
from __future__ import annotations

import json
import logging
import re
import weakref
from contextlib import closing
from pathlib import Path

import torch
import torch.nn as nn

from efficientllava.pruning.calibration import calibrated_blocks, check_batches
from efficientllava.pruning.layers import find_layers, get_linear
from efficientllava.pruning.operators import NEEDS, check_fits, check_method, inverse_hessian_factor, parse_target
from efficientllava.pruning.operators import prune_weight

log = logging.getLogger(__name__)

MODES = ("weights", "masks")
DENSE = "dense"
BANK_FILE = "bank.json"


def choice_key(value) -> str:
    """The bank's key of a ratio or N:M pattern: '0.5', '2:4' (0.5 and '0.5' and 0.50 are the same choice)."""
    return str(parse_target(value))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> (out, ceil(in / 8)) uint8, eight kept-flags per byte."""
    out_features, in_features = mask.shape
    pad = (-in_features) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(out_features, -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.reshape(packed.shape[0], -1)[:, :in_features]


def _file_name(layer: str) -> str:
    return re.sub(r"[^\w.-]", "_", layer) + ".safetensors"


class PruningBank:
    def __init__(self, method: str, mode: str, choices: list[str], shapes: dict[str, list[int]],
                 directory: str | Path | None = None, device=None):
        if mode not in MODES:
            raise ValueError(f"bank mode {mode!r} is unknown; expected one of {list(MODES)}")
        self.method, self.mode, self.choices, self.shapes = method, mode, list(choices), dict(shapes)
        self.directory = Path(directory) if directory is not None else None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.entries: dict[str, dict[str, torch.Tensor]] = {}  # in-memory storage: layer -> key -> tensor
        self._current = weakref.WeakKeyDictionary()  # model -> {layer: the key assembled into it}

    # ---- building -------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        names,
        choices,
        method: str = "sparsegpt",
        batches=None,
        mode: str = "weights",
        directory: str | Path | None = None,
        device=None,
        blocksize: int = 128,
        damp: float = 0.01,
        offload: bool = False,
    ) -> "PruningBank":
        """Calibrate once (one-shot) and prune every named layer at every choice; the model is left unchanged."""
        check_method(method)
        registry = find_layers(model)
        names = list(names)
        missing = [n for n in names if n not in registry]
        if missing:
            raise KeyError(f"bank layers {missing} are not prunable linear layers of the model; see find_layers()")
        if not names:
            raise ValueError("the bank was given no layers; expected at least one name from find_layers()")
        keys = sorted({choice_key(c) for c in choices}, key=lambda k: (":" in k, parse_target(k).ratio, k))
        for name in names:
            for key in keys:
                check_fits(parse_target(key), registry[name].in_features, layer=name)
        if method == "sparsegpt" and mode == "masks":
            log.warning("mask-only sparsegpt bank: assembled weights are W_dense * mask, without SparseGPT's update")
        shapes = {n: [registry[n].out_features, registry[n].in_features] for n in names}
        if device == "model":
            device = get_linear(model, names[0]).weight.device
        bank = cls(method, mode, keys, shapes, directory, device)
        if bank.directory is not None:
            bank.directory.mkdir(parents=True, exist_ok=True)

        def store(name: str, stats=None) -> None:
            weight = get_linear(model, name).weight.detach()
            options = {}
            if method == "sparsegpt":
                hessian = stats.hessian.to(weight.device)
                options = {"blocksize": blocksize, "damp": damp,
                           "factor": inverse_hessian_factor(hessian, damp, layer=name)}
            entry = {DENSE: weight}
            for key in keys:
                target = parse_target(key)
                if target.pruned_per_row(weight.shape[1]) == 0:
                    continue  # ratio 0 is the dense weight
                pruned, keep = prune_weight(method, weight, target, stats, **options)
                entry[key] = pruned if mode == "weights" else pack_mask(keep)
            bank._put(name, entry)

        was_training = model.training
        model.eval()
        try:
            if NEEDS[method]:
                batches = check_batches(batches)
                with closing(calibrated_blocks(model, batches, names, NEEDS[method], False, offload)) as groups:
                    for group, stats in groups:
                        for name in group:
                            store(name, stats.pop(name))
            else:
                with torch.no_grad():
                    for name in names:
                        store(name)
        finally:
            model.train(was_training)
        if bank.directory is not None:
            bank._write_index()
        log.info("bank: %d layer(s) x %d choice(s), %s", len(names), len(keys), bank.memory_report())
        return bank

    def _put(self, name: str, entry: dict[str, torch.Tensor]) -> None:
        if self.directory is None:
            self.entries[name] = {k: v.to(self.device, copy=True) for k, v in entry.items()}
            return
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        save_file(tensors, str(self.directory / _file_name(name)), metadata={"layer": name})

    def _write_index(self) -> None:
        index = {"method": self.method, "mode": self.mode, "choices": self.choices, "shapes": self.shapes,
                 "files": {n: _file_name(n) for n in self.shapes}}
        (self.directory / BANK_FILE).write_text(json.dumps(index, indent=1))

    @classmethod
    def open(cls, directory: str | Path, device=None) -> "PruningBank":
        """A disk-backed bank written earlier by build(..., directory=...)."""
        path = Path(directory) / BANK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"'{directory}' holds no {BANK_FILE}; expected a directory written by build()")
        index = json.loads(path.read_text())
        return cls(index["method"], index["mode"], index["choices"], index["shapes"], directory, device)

    # ---- reading --------------------------------------------------------------------------------------------------
    def _get(self, name: str, key: str) -> torch.Tensor:
        if self.directory is None:
            return self.entries[name][key]
        from safetensors import safe_open

        with safe_open(str(self.directory / _file_name(name)), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def weight(self, name: str, choice) -> torch.Tensor:
        """The weight the bank assembles for one layer at one choice (ratio 0: the dense weight)."""
        return self._weight_by_key(name, self._check_choice(name, choice))

    def _weight_by_key(self, name: str, key: str) -> torch.Tensor:
        if key == DENSE or self.mode == "weights":
            return self._get(name, key)
        dense = self._get(name, DENSE)
        return dense * unpack_mask(self._get(name, key).to(dense.device), dense.shape[1]).to(dense.dtype)

    def mask(self, name: str, choice) -> torch.Tensor:
        key = self._check_choice(name, choice)
        in_features = self.shapes[name][1]
        if key == DENSE:
            return torch.ones(self.shapes[name], dtype=torch.bool)
        if self.mode == "masks":
            return unpack_mask(self._get(name, key), in_features)
        return self._get(name, key) != 0

    def _check_choice(self, name: str, choice) -> str:
        if name not in self.shapes:
            raise KeyError(f"layer {name!r} is not in the bank; expected one of its {len(self.shapes)} layers")
        key = choice_key(choice)
        if parse_target(key).pruned_per_row(self.shapes[name][1]) == 0:
            return DENSE
        if key not in self.choices:
            raise KeyError(f"layer {name!r} asks for choice {key!r}, which the bank does not hold; "
                           f"expected one of {self.choices}")
        return key

    # ---- using ----------------------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        for name, shape in self.shapes.items():
            try:
                have = list(get_linear(model, name).weight.shape)
            except (KeyError, TypeError) as err:
                raise ValueError(f"the bank's layer {name!r} is not a linear layer of this model ({err})") from None
            if have != list(shape):
                raise ValueError(f"the bank's layer {name!r} has shape {shape}; this model's is {have}")

    def assemble(self, model: nn.Module, policy: dict) -> None:
        """Write the policy's weights into the model (bank layers it does not name become dense).

        Everything is checked before a weight is written. Layers already holding the wanted choice from an earlier
        assemble on the same model are not copied again, so only this bank may write these layers in between.
        """
        self.check_model(model)
        wanted = {name: DENSE for name in self.shapes}
        for name, choice in policy.items():
            wanted[name] = self._check_choice(name, choice)
        current = self._current.setdefault(model, {})
        with torch.no_grad():
            for name, key in wanted.items():
                if current.get(name) == key:
                    continue
                layer = get_linear(model, name)
                layer.weight.copy_(self._weight_by_key(name, key).to(layer.weight.device, layer.weight.dtype))
                current[name] = key

    def restore(self, model: nn.Module) -> None:
        """Put the dense weights of every bank layer back."""
        self._current.pop(model, None)
        self.check_model(model)
        with torch.no_grad():
            for name in self.shapes:
                layer = get_linear(model, name)
                layer.weight.copy_(self._get(name, DENSE).to(layer.weight.device, layer.weight.dtype))
        self._current[model] = {name: DENSE for name in self.shapes}

    # ---- cost -----------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes the bank holds in memory (0 for the tensors of a disk-backed bank)."""
        return sum(t.numel() * t.element_size() for entry in self.entries.values() for t in entry.values())

    def disk_bytes(self) -> int:
        if self.directory is None:
            return 0
        return sum((self.directory / _file_name(n)).stat().st_size for n in self.shapes)

    def memory_report(self) -> dict:
        return {
            "method": self.method,
            "mode": self.mode,
            "layers": len(self.shapes),
            "choices": self.choices,
            "bytes_in_memory": self.nbytes(),
            "bytes_on_disk": self.disk_bytes(),
        }
