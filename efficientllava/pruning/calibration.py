"""Calibration: the input statistics of each selected linear layer, gathered block by block with forward hooks.

Statistics per layer, over the calibration tokens that are not padding:
- `sq_norms[j]` = sum over tokens of x_j^2 (Wanda's ||X_j||_2^2),
- `hessian` = mean over tokens of x x^T (SparseGPT's H, up to the factor 2 that cancels out),
- `sums[j]` = sum over tokens of x_j (with `sq_norms`: each input's mean and variance, for structured shrinking).

The vision tower and the projector sit before the language model, so one forward pass of the whole model with hooks
calibrates them (and captures the decoder's inputs on the way). The decoder is calibrated block by block: the inputs
of block 0 (hidden states plus every keyword argument the model passes, e.g. position embeddings and the attention
mask) are captured once, then for each block i its forward runs on those inputs with hooks, the caller prunes it, and
its outputs become the inputs of block i+1: recomputed with the pruned weights (sequential, the default) or the dense
outputs (one-shot, used by the bank so that every (layer, ratio) sees the dense model's activations). Only one
block's activations are held on the model's device; `offload=True` keeps them on the CPU between blocks.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from efficientllava.pruning.layers import decoder_blocks, find_layers

NON_MODEL_KEYS = ("labels", "last_index")
STATISTICS = ("sq_norms", "hessian")  # the default; "sums" on request


class CalibrationError(ValueError):
    """Calibration inputs that cannot give statistics (none, all padding, or not finite)."""


@dataclass
class InputStats:
    """One layer's calibration statistics (float32)."""

    name: str
    tokens: int
    sq_norms: torch.Tensor | None = None  # (in,): sum over tokens of x_j^2
    hessian: torch.Tensor | None = None  # (in, in): mean over tokens of x x^T
    sums: torch.Tensor | None = None  # (in,): sum over tokens of x_j

    @property
    def column_norms(self) -> torch.Tensor:
        return self.sq_norms.sqrt()


@dataclass
class BlockInput:
    """What one batch feeds a decoder block: hidden states, other positional and keyword arguments, token mask."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    token_mask: torch.Tensor | None  # (batch, seq) bool, True for real tokens


class _Accumulator:
    def __init__(self, name: str, in_features: int, need, device, masked: bool):
        self.name, self.masked, self.tokens = name, masked, 0
        self.sq = torch.zeros(in_features, device=device) if "sq_norms" in need else None
        self.xtx = torch.zeros(in_features, in_features, device=device) if "hessian" in need else None
        self.sums = torch.zeros(in_features, device=device) if "sums" in need else None

    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        if self.masked and token_mask is not None and tuple(x.shape[:-1]) == tuple(token_mask.shape):
            x = x[token_mask.to(x.device)]
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(
                f"calibration inputs of layer {self.name!r} hold NaN or inf; expected finite activations "
                "(check the model's dtype and the calibration batches)"
            )
        self.tokens += x.shape[0]
        if self.sq is not None:
            self.sq += x.pow(2).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        if self.sums is not None:
            self.sums += x.sum(0)

    def finish(self) -> InputStats:
        if self.tokens == 0:
            raise CalibrationError(
                f"layer {self.name!r} saw no calibration tokens (all padding?); expected batches whose "
                "attention_mask marks at least one real token"
            )
        hessian = self.xtx / self.tokens if self.xtx is not None else None
        return InputStats(self.name, self.tokens, self.sq, hessian, self.sums)


class InputRecorder:
    """Context manager: hooks on the named linear layers that accumulate their input statistics.

    `token_mask` (batch, seq) is set by the caller before each batch; it filters the inputs of layers in
    `masked` (the language model's, whose inputs are (batch, seq, features)); other layers count every token.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], need=STATISTICS, masked: Iterable[str] = ()):
        masked = set(masked)
        self.model, self.token_mask, self.handles = model, None, []
        self.accumulators = {}
        for name in names:
            layer = model.get_submodule(name)
            device = layer.weight.device
            self.accumulators[name] = _Accumulator(name, layer.in_features, need, device, name in masked)

    def __enter__(self) -> "InputRecorder":
        for name, acc in self.accumulators.items():
            hook = self._hook(acc)
            self.handles.append(self.model.get_submodule(name).register_forward_pre_hook(hook))
        return self

    def _hook(self, acc: _Accumulator):
        def record(module, args):
            acc.add(args[0], self.token_mask)

        return record

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def stats(self) -> dict[str, InputStats]:
        return {name: acc.finish() for name, acc in self.accumulators.items()}


class _Stop(Exception):
    """Raised by the hook on decoder block 0 once its inputs are captured: the rest of the forward is not needed."""


def model_inputs(batch: dict, device) -> dict:
    """A collated batch without the keys the model does not take, on `device`."""
    return {k: _to(v, device) for k, v in batch.items() if k not in NON_MODEL_KEYS}


def check_batches(batches) -> list[dict]:
    batches = list(batches) if batches is not None else []
    if not batches:
        raise CalibrationError("the calibration set is empty; expected at least one batch (dict with input_ids)")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise CalibrationError(f"calibration batch {i} is {got}; expected a dict with 'input_ids'")
    return batches


def capture_block_inputs(
    model: nn.Module, batches: list[dict], block_path: str | None, recorder: InputRecorder | None = None,
    offload: bool = False,
) -> list[BlockInput] | None:
    """Run the model on each batch up to decoder block `block_path`, returning what each batch feeds that block.

    With `block_path=None` the whole model runs (hooks in `recorder` still fire) and None is returned.
    """
    device = model.get_input_embeddings().weight.device
    captured: list[BlockInput] = []
    current: dict = {}

    def grab(module, args, kwargs):
        store = torch.device("cpu") if offload else None
        current["input"] = BlockInput(
            _to(args[0], store), _to(tuple(args[1:]), store), _to(dict(kwargs), store), current["mask"]
        )
        raise _Stop

    handle = model.get_submodule(block_path).register_forward_pre_hook(grab, with_kwargs=True) if block_path else None
    try:
        for batch in batches:
            inputs = model_inputs(batch, device)
            mask = inputs.get("attention_mask")
            current["mask"] = mask.bool() if mask is not None else None
            if recorder is not None:
                recorder.token_mask = current["mask"]
            try:
                model(**inputs, use_cache=False)
            except _Stop:
                captured.append(current.pop("input"))
                continue
            if block_path:
                raise RuntimeError(f"decoder block {block_path!r} never ran; expected the model to call it")
    finally:
        if handle is not None:
            handle.remove()
    return captured if block_path else None


def run_block(
    block: nn.Module, inputs: list[BlockInput], recorder: InputRecorder | None = None, offload: bool = False,
    keep_outputs: bool = True,
) -> list[BlockInput] | None:
    """Run one decoder block on every captured batch; the outputs are the next block's inputs."""
    device = next(block.parameters()).device
    outputs = [] if keep_outputs else None
    for item in inputs:
        if recorder is not None:
            recorder.token_mask = item.token_mask
        out = block(_to(item.hidden, device), *_to(item.args, device), **_to(item.kwargs, device))
        if isinstance(out, (tuple, list)):  # older transformers return (hidden_states, ...)
            out = out[0]
        if keep_outputs:
            outputs.append(BlockInput(out.to("cpu") if offload else out, item.args, item.kwargs, item.token_mask))
    return outputs


def calibrated_blocks(
    model: nn.Module,
    batches,
    names: Iterable[str],
    need=STATISTICS,
    sequential: bool = True,
    offload: bool = False,
) -> Iterator[tuple[list[str], dict[str, InputStats]]]:
    """Yield (layer names, their statistics) group by group, in forward order.

    The first group is every selected vision-tower and projector layer (one whole-model pass); then one group per
    decoder block holding selected layers. The caller may prune the group's layers before asking for the next group:
    in sequential mode the next block's inputs are recomputed through the pruned block.
    """
    batches = check_batches(batches)
    registry = find_layers(model)
    names = list(names)
    missing = [n for n in names if n not in registry]
    if missing:
        raise KeyError(f"layers {missing} are not prunable linear layers of the model; see find_layers()")
    outer = [n for n in names if registry[n].component != "language_model"]
    inner = [n for n in names if registry[n].component == "language_model"]
    all_blocks = decoder_blocks({n: i for n, i in registry.items() if i.component == "language_model"})
    blocks = decoder_blocks({n: registry[n] for n in inner})
    first = all_blocks[0] if all_blocks else None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = None
            if outer:
                with InputRecorder(model, outer, need) as recorder:
                    inputs = capture_block_inputs(model, batches, first if blocks else None, recorder, offload)
                yield outer, recorder.stats()
                if sequential:
                    inputs = None  # the pruned vision side changes what the decoder sees
            if not blocks:
                return
            if inputs is None:
                inputs = capture_block_inputs(model, batches, first, offload=offload)
            for path in blocks:
                block = model.get_submodule(path)
                group = [n for n in inner if registry[n].block_path == path]
                if not group:
                    inputs = run_block(block, inputs, offload=offload)
                    continue
                last = path == blocks[-1]
                with InputRecorder(model, group, need, masked=group) as recorder:
                    outputs = run_block(block, inputs, recorder, offload, keep_outputs=not sequential and not last)
                yield group, recorder.stats()
                if sequential and not last:
                    outputs = run_block(block, inputs, offload=offload)
                inputs = outputs
    finally:
        model.train(was_training)


def calibrate(model: nn.Module, batches, names: Iterable[str], need=STATISTICS) -> dict[str, InputStats]:
    """Statistics of every named layer on the dense model (one-shot), without pruning anything."""
    stats = {}
    for _, group_stats in calibrated_blocks(model, batches, names, need, sequential=False):
        stats.update(group_stats)
    return stats


def _to(obj, device):
    """Move every tensor inside nested tuples, lists and dicts to `device` (None: leave where it is)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj
