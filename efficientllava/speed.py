"""Speed of a pruned model: latency measured on the machine, and FLOP-based estimates labelled as such.

Measured (`kind: "measured"`), always dense against pruned in one process, interleaved (dense, pruned, dense, ...)
so that drifting machine load hits both alike, median of the repeats after warm-up runs:
- prefill: one forward over image + prompt, filling the KV cache and computing the next-token logits only (what
  generation's first step does), over given batches or over the prompts of the search's N samples;
- decode: tokens per second of greedy steps after a prefill (the prefill itself not timed).
On CUDA each call is timed with CUDA events around it; on the CPU with `time.perf_counter`. On CUDA a prefill can
also be captured once as a CUDA graph and replayed (`GraphedPrefill`, `graphed_prefill_speedup`): eager prefill of
one prompt is bound by kernel launches from Python, which a graph removes for both models alike. `compare` times two
models (e.g. dense and a shrunk copy); `measure_speedup` swaps two weight sets in one model (unstructured masks on
dense kernels: expect ~1.0x, which is the honest number for them).

Estimated (`kind: "estimated"`): FLOPs counted by `torch.utils.flop_counter` over the same forward (every op: vision
tower, projector, attention, LM head), minus what an ideal engine would skip. For unstructured sparsity that is
ratio x the layer's FLOPs (a sparse engine that skips every pruned multiply-add at no overhead: an upper bound).
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from statistics import quantiles
from typing import Callable

import torch

from efficientllava.evaluation import MODEL_INPUTS
from efficientllava.models import cache_argument, image_features, model_device
from efficientllava.policy import choice_ratio
from efficientllava.pruning.layers import get_linear
from efficientllava.search.fitness import SearchSamples
from efficientllava.token_pruning import image_token_id, token_pruner

MEASURED = "measured"
ESTIMATED = "estimated"


class SpeedError(ValueError):
    """A speed measurement asked for with settings that cannot work."""


def describe_device(device: torch.device) -> str:
    """The device a timing belongs to: a GPU's name, or the CPU with its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} thread(s))"


def _check_counts(repeats: int, warmup: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise SpeedError(f"repeats is {repeats!r}; expected an integer >= 1 (timed calls per model)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise SpeedError(f"warmup is {warmup!r}; expected an integer >= 0 (untimed calls first)")


@contextmanager
def gc_paused():
    """Python's garbage collector paused (after a full collection) while timing, as `timeit` does: a collection pass
    over a large heap (a search holds thousands of candidate records) would land on whichever call is running, and
    it costs a short pruned call relatively more than a long dense one. Nested blocks collect once, at the outermost."""
    if not gc.isenabled():  # already paused (an outer block, or the caller): nothing to collect or restore
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes on `device` (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


# ---- what is timed ----------------------------------------------------------------------------------------------
def _inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


@torch.no_grad()
def prefill(model, batch: dict):
    """Image + prompt through the whole model, KV cache filled, logits of the next token only."""
    return model(**_inputs(batch, model_device(model)), use_cache=True, logits_to_keep=1)


@torch.no_grad()
def lean_prefill(model, batch: dict, plan: dict | None = None) -> torch.Tensor:
    """The prefill's work without the checks that read the device, so that a CUDA graph can capture it: image
    features, their placement at the image tokens, the language model (cache filled) and the next-token logits,
    (batch, 1, vocab). Equal to `prefill`'s logits (tested). `batch` holds input_ids and pixel_values, unpadded;
    `plan` is the attached visual-token pruner's plan for these input_ids (`VisualTokenPruner.plan`)."""
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    features = image_features(model, pixels)
    embeds = model.get_input_embeddings()(ids)
    rows, cols = batch["image_positions"]
    embeds = embeds.index_put((rows, cols), features.reshape(-1, features.shape[-1]).to(embeds.dtype))
    pruner = token_pruner(model)
    if pruner is not None:
        pruner.forward_state = None if plan is None else {**plan, "kept": None, "kwargs": None}
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=True).last_hidden_state
    return model.lm_head(hidden[:, -1:])


def lean_inputs(model, batch: dict) -> tuple[dict, dict | None]:
    """`lean_prefill`'s inputs on the model's device (the image token positions found once, here) and the visual-token
    pruner's plan, if one is attached."""
    device = model_device(model)
    inputs = _inputs(batch, device)
    mask = inputs.pop("attention_mask", None)
    if mask is not None and not bool(mask.all()):
        raise SpeedError("a lean (graph-capturable) prefill got a padded batch; expected prompts of equal length")
    image = inputs["input_ids"] == image_token_id(model)
    per_row = image.sum(1)
    if int(per_row.min()) != int(per_row.max()) or int(per_row.min()) == 0:
        raise SpeedError(f"the batch's rows hold {sorted(set(per_row.tolist()))} image tokens; a lean prefill expects "
                         "one image per row")
    inputs["image_positions"] = image.nonzero(as_tuple=True)
    pruner = token_pruner(model)
    plan = pruner.plan(inputs["input_ids"]) if pruner is not None else None
    return inputs, plan


class GraphedPrefill:
    """One prefill of `batch` captured as a CUDA graph; calling it replays the graph (no Python, no kernel launches
    from the host: what a serving engine does for a fixed shape). The inputs stay fixed: for timing."""

    def __init__(self, model, batch: dict, warmup: int = 2):
        device = model_device(model)
        if device.type != "cuda":
            raise SpeedError(f"CUDA-graph prefill needs the model on a CUDA device; it is on {device}")
        inputs, plan = lean_inputs(model, batch)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):  # CUDA graphs want their first runs on a side stream
                lean_prefill(model, inputs, plan)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = lean_prefill(model, inputs, plan)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


def graphed_prefill_speedup(dense, pruned, batch: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Measured prefill speedup of `pruned` over `dense` with each prefill captured as a CUDA graph (launch overhead
    removed from both); a model whose forward cannot be captured raises SpeedError with the reason."""
    device = model_device(dense)
    graphs = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        try:
            graphs[name] = GraphedPrefill(model, batch)
        except RuntimeError as err:  # e.g. an operation that reads the device during capture
            raise SpeedError(f"the {name} model's prefill could not be captured as a CUDA graph: {err}") from err
    med = compare(graphs, device, repeats, warmup)
    return {
        "dense_seconds": med["dense"], "pruned_seconds": med["pruned"],
        "speedup": med["dense"] / max(med["pruned"], 1e-12), "kind": MEASURED,
        "how": f"median of {repeats} interleaved CUDA-graph replays of one prefill ({int(batch['input_ids'].numel())} "
               f"prompt tokens), dense vs pruned model in one process, on {describe_device(device)}",
    }


@torch.no_grad()
def decode_seconds(model, batch: dict, steps: int) -> float:
    """Seconds of `steps` greedy decode steps after a prefill of `batch` (the prefill is not timed)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SpeedError(f"decode steps is {steps!r}; expected an integer >= 1 (new tokens per row)")
    device = model_device(model)
    inputs = _inputs(batch, device)
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise SpeedError("decode timing got a padded batch; expected prompts of equal length (no padding), so "
                         "every row decodes from a real last token")
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    state = {"past": out.past_key_values, "token": out.logits[:, -1].argmax(-1, keepdim=True), "mask": mask}

    cache_name = cache_argument(model)

    def run():
        for _ in range(steps):
            if state["mask"] is not None:
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(state["mask"].shape[0], 1)], 1)
            out = model(input_ids=state["token"], attention_mask=state["mask"], **{cache_name: state["past"]},
                        use_cache=True, logits_to_keep=1)
            state["past"], state["token"] = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    return timed(run, device)


# ---- comparisons ------------------------------------------------------------------------------------------------
STATISTICS = {"median": median, "min": min}


def _statistic(name: str) -> Callable[[list[float]], float]:
    if name not in STATISTICS:
        raise SpeedError(f"statistic is {name!r}; expected one of {list(STATISTICS)}")
    return STATISTICS[name]


def interleaved_times(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each callable over `repeats` rounds, one call of each per round (interleaved): {name: [seconds]}."""
    _check_counts(repeats, warmup)
    times = {name: [] for name in runs}
    with gc_paused():
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn, device))
    return times


def compare(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 1,
            statistic: str = "median") -> dict:
    """Seconds of each callable, timed interleaved, reduced by `statistic` over the repeats: {name: seconds}.

    "median" is what is reported; "min" (noise on a shared machine only adds time) is what the latency table is
    calibrated with, like its own entries."""
    reduce = _statistic(statistic)
    return {name: reduce(t) for name, t in interleaved_times(runs, device, repeats, warmup).items()}


def paired_quartiles(dense: list[float], pruned: list[float]) -> tuple[float, float]:
    """First and third quartiles of the per-round speedups dense_i / pruned_i: the spread of a measured speedup
    (a round's two calls run back to back, so a slow stretch of the machine slows both)."""
    ratios = sorted(d / max(p, 1e-12) for d, p in zip(dense, pruned))
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q = quantiles(ratios, n=4, method="inclusive")
    return q[0], q[2]


def prefill_speedup(dense, pruned, batches: list[dict], repeats: int = 5, warmup: int = 1) -> dict:
    """Measured prefill speedup of `pruned` over `dense` (two models on one device) over `batches`."""
    device = model_device(dense)
    if model_device(pruned) != device:
        raise SpeedError(f"dense model is on {device} and pruned on {model_device(pruned)}; expected one device")

    def run(model):
        return lambda: [prefill(model, b) for b in batches]

    med = compare({"dense": run(dense), "pruned": run(pruned)}, device, repeats, warmup)
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return {
        "dense_seconds": med["dense"], "pruned_seconds": med["pruned"],
        "speedup": med["dense"] / max(med["pruned"], 1e-12), "kind": MEASURED,
        "how": f"median of {repeats} interleaved prefills ({len(batches)} batch(es), {tokens} prompt tokens), dense vs "
               f"pruned model in one process, on {describe_device(device)}",
    }


def decode_speedup(dense, pruned, batch: dict, steps: int = 16, repeats: int = 5, warmup: int = 1) -> dict:
    """Measured decode tokens/s of both models (greedy steps after an untimed prefill, interleaved) and their ratio."""
    _check_counts(repeats, warmup)
    times = {"dense": [], "pruned": []}
    with gc_paused():
        for _ in range(warmup):
            decode_seconds(dense, batch, steps)
            decode_seconds(pruned, batch, steps)
        for _ in range(repeats):
            times["dense"].append(decode_seconds(dense, batch, steps))
            times["pruned"].append(decode_seconds(pruned, batch, steps))
    med = {k: median(v) for k, v in times.items()}
    rows = int(batch["input_ids"].shape[0])
    return {
        "dense_tokens_per_s": rows * steps / med["dense"], "pruned_tokens_per_s": rows * steps / med["pruned"],
        "speedup": med["dense"] / max(med["pruned"], 1e-12), "kind": MEASURED,
        "how": f"median of {repeats} interleaved runs of {steps} greedy decode steps x {rows} row(s) after an "
               f"untimed prefill, on {describe_device(model_device(dense))}",
    }


def scoring_speedup(dense, pruned, samples: SearchSamples, repeats: int = 5, warmup: int = 1,
                    statistic: str = "median") -> dict:
    """Measured prefill speedup over the search samples' prompts (image + prompt: the scoring forward that pruning
    speeds up; option-likelihood continuations over the cache are a few tokens each and not timed), two models.
    `quartiles`: the spread of the per-round speedups (`paired_quartiles`)."""
    reduce = _statistic(statistic)
    device = model_device(dense)
    times = interleaved_times({"dense": lambda: _prefill_all(dense, samples),
                               "pruned": lambda: _prefill_all(pruned, samples)}, device, repeats, warmup)
    med = {name: reduce(t) for name, t in times.items()}
    q1, q3 = paired_quartiles(times["dense"], times["pruned"])
    return {
        "dense_seconds": med["dense"], "pruned_seconds": med["pruned"],
        "speedup": med["dense"] / max(med["pruned"], 1e-12), "kind": MEASURED, "quartiles": [q1, q3],
        "how": f"{statistic} of {repeats} interleaved prefills (image + prompt) of the {len(samples)} search samples, "
               f"dense vs pruned model in one process, on {describe_device(device)}; per-round speedups' quartiles "
               f"{q1:.2f}-{q3:.2f}",
    }


def _prefill_all(model, samples: SearchSamples) -> None:
    for batch in samples.batches:
        prefill(model, batch)


def _swap_in(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in weights.items():
            layer = get_linear(model, name)
            layer.weight.copy_(weight.to(layer.weight.device, layer.weight.dtype))


def measure_speedup(model, samples: SearchSamples, dense: dict[str, torch.Tensor],
                    pruned: dict[str, torch.Tensor], repeats: int = 5, warmup: int = 1) -> dict:
    """Median latency of the scoring forward with `dense` and with `pruned` weights swapped in (same shapes); the
    model ends holding the pruned weights."""
    _check_counts(repeats, warmup)
    device = model_device(model)
    times = {"dense": [], "pruned": []}
    with gc_paused():
        for _ in range(warmup):
            _prefill_all(model, samples)
        for _ in range(repeats):
            for kind, weights in (("dense", dense), ("pruned", pruned)):
                _swap_in(model, weights)
                times[kind].append(timed(lambda: _prefill_all(model, samples), device))
    _swap_in(model, pruned)
    med = {k: median(v) for k, v in times.items()}
    q1, q3 = paired_quartiles(times["dense"], times["pruned"])
    return {
        "dense_seconds": med["dense"],
        "pruned_seconds": med["pruned"],
        "speedup": med["dense"] / max(med["pruned"], 1e-12),
        "kind": MEASURED,
        "quartiles": [q1, q3],
        "how": f"median of {repeats} interleaved prefills (image + prompt) of the {len(samples)} search samples, "
               f"dense vs pruned weights in one process, on {describe_device(device)} (dense kernels: masks buy no "
               f"speed); per-round speedups' quartiles {q1:.2f}-{q3:.2f}",
    }


# ---- size and FLOPs ---------------------------------------------------------------------------------------------
def parameter_count(model, prefix: str | None = None) -> int:
    """Parameters of the model (or of the submodule at `prefix`), tied weights counted once."""
    module = model.get_submodule(prefix) if prefix else model
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@torch.no_grad()
def prefill_flops(model, batch: dict) -> int:
    """FLOPs of one prefill of `batch`, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        prefill(model, batch)
    return int(counter.get_total_flops())


def flop_profile(model, samples: SearchSamples, names) -> dict:
    """{'total': FLOPs of one prefill of the samples' prompts, 'layers': {name: FLOPs of that linear layer},
    'rows': {name: rows (tokens) that passed through it}}."""
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
            _prefill_all(model, samples)
    finally:
        for h in handles:
            h.remove()
    layers = {}
    for name, n_rows in rows.items():
        layer = get_linear(model, name)
        layers[name] = 2 * n_rows * layer.in_features * layer.out_features
    return {"total": int(counter.get_total_flops()), "layers": layers, "rows": rows}


def estimated_speedup(profile: dict, ratios: dict, kept: dict[str, float] | None = None) -> float:
    """Dense FLOPs / FLOPs left when every pruned weight's multiply-add is skipped (ideal sparse engine).

    `kept` ({layer: fraction of its dense FLOPs still computed}, from structured shrinking and dropped tokens) scales
    each layer before its unstructured ratio applies; other FLOPs (attention scores, vision tower, LM head) are left
    as they are, so with `kept` this stays an estimate for the linear layers only."""
    kept = kept or {}
    saved = 0.0
    for name, flops in profile["layers"].items():
        fraction = kept.get(name, 1.0) * (1 - choice_ratio(ratios.get(name, 0.0)))
        saved += (1 - fraction) * flops
    return profile["total"] / max(profile["total"] - saved, 1.0)


ESTIMATE_HOW = ("FLOPs of the scoring forward (torch.utils.flop_counter) minus ratio x FLOPs of each pruned linear: "
                "an ideal sparse engine that skips pruned weights at no overhead")
