"""Speed of a pruned model: measured latency (dense vs pruned, same process) and a FLOP-based estimate.

- Measured: wall time of the search's scoring forward over the N samples, on the device the model sits on, dense and
  pruned weights swapped in turn (interleaved repeats, median of each), in one process. Masked weights on dense
  kernels cost the same as dense ones, so expect ~1.0x here: that is the honest number for this engine.
- Estimated: the FLOPs of the same forward counted by `torch.utils.flop_counter` (every op of the model: vision
  tower, projector, attention, LM head), minus, for each pruned linear layer, its ratio times its own FLOPs (counted
  from the rows that actually pass through it). It assumes a sparse engine that skips every pruned weight's
  multiply-add at no overhead, so it is an upper bound on what unstructured sparsity can buy, labelled "estimated".
"""
from __future__ import annotations

import time

import torch

from efficientllava.policy import choice_ratio
from efficientllava.pruning.layers import get_linear
from efficientllava.search.fitness import SearchSamples, letter_predictions

MEASURED = "measured"
ESTIMATED = "estimated"


def _sync(model):
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_forward(model, samples: SearchSamples) -> float:
    _sync(model)
    start = time.perf_counter()
    letter_predictions(model, samples)
    _sync(model)
    return time.perf_counter() - start


def _swap_in(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in weights.items():
            layer = get_linear(model, name)
            layer.weight.copy_(weight.to(layer.weight.device, layer.weight.dtype))


def measure_speedup(model, samples: SearchSamples, dense: dict[str, torch.Tensor],
                    pruned: dict[str, torch.Tensor], repeats: int = 5, warmup: int = 1) -> dict:
    """Median latency of the scoring forward with `dense` and with `pruned` weights swapped in; the model ends
    holding the pruned weights."""
    times = {"dense": [], "pruned": []}
    for _ in range(max(warmup, 0)):
        _timed_forward(model, samples)
    for _ in range(max(repeats, 1)):
        for kind, weights in (("dense", dense), ("pruned", pruned)):
            _swap_in(model, weights)
            times[kind].append(_timed_forward(model, samples))
    _swap_in(model, pruned)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    device = next(model.parameters()).device
    return {
        "dense_seconds": med["dense"],
        "pruned_seconds": med["pruned"],
        "speedup": med["dense"] / max(med["pruned"], 1e-12),
        "kind": MEASURED,
        "how": f"median of {max(repeats, 1)} interleaved scoring forwards over {len(samples)} samples, dense vs "
               f"pruned weights in one process, on {describe_device(device)} (dense kernels: masks buy no speed)",
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} thread(s))"


def flop_profile(model, samples: SearchSamples, names) -> dict:
    """{'total': FLOPs of one scoring forward over the samples, 'layers': {name: FLOPs of that linear layer}}."""
    from torch.utils.flop_counter import FlopCounterMode

    rows: dict[str, int] = {n: 0 for n in names}
    handles = []
    for name in rows:
        layer = get_linear(model, name)

        def hook(module, args, name=name):
            rows[name] += args[0].numel() // module.in_features

        handles.append(layer.register_forward_pre_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            letter_predictions(model, samples)
    finally:
        for h in handles:
            h.remove()
    layers = {}
    for name, n_rows in rows.items():
        layer = get_linear(model, name)
        layers[name] = 2 * n_rows * layer.in_features * layer.out_features
    return {"total": int(counter.get_total_flops()), "layers": layers}


def estimated_speedup(profile: dict, ratios: dict) -> float:
    """Dense FLOPs / FLOPs left when every pruned weight's multiply-add is skipped (ideal sparse engine)."""
    saved = sum(choice_ratio(r) * profile["layers"][n] for n, r in ratios.items())
    return profile["total"] / max(profile["total"] - saved, 1.0)


ESTIMATE_HOW = ("FLOPs of the scoring forward (torch.utils.flop_counter) minus ratio x FLOPs of each pruned linear: "
                "an ideal sparse engine that skips pruned weights at no overhead")
