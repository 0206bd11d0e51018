"""2:4 export with torch's semi-structured sparse tensors, layer by layer, only where measured faster than dense.

A layer pruned 2:4 (in every group of 4 consecutive inputs of a row at most 2 weights are nonzero) can be stored as a
`SparseSemiStructuredTensor` (`torch.sparse.to_sparse_semi_structured`) whose matmul runs on the GPU's sparse tensor
cores (cuSPARSELt or CUTLASS). Whether that is faster depends on the device, the shape and the token count: on an
H100 (torch 2.11) a 2:4 11008x4096 fp16 layer ran at 0.10x of dense at 640 tokens and 0.63x at 4096 tokens, and the
CUTLASS path refused sm90. So `export_semi_structured` times every layer at the given token count, dense weight
against its semi-structured copy on the same random inputs (CUDA events, median of `repeats` after a warm-up), and
swaps in the sparse weight only where it measured at least `min_speedup` times faster. The report lists every layer
with both times, the speedup, whether it was swapped, or why it could not be tried (e.g. a shape the kernels refuse).

Requirements come from torch: a CUDA device and a half-precision (or int8) weight whose dimensions the backend
accepts. On the CPU nothing can be swapped and `SemiStructuredUnavailable` says so; a layer that is not 2:4 is
refused with `SemiStructuredError` naming it, before anything is timed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientllava.pruning.layers import get_linear
from efficientllava.speed import median, timed

BACKENDS = (None, "cusparselt", "cutlass")


class SemiStructuredError(ValueError):
    """A layer that cannot be stored 2:4 (its weight is not 2:4 sparse, or its width is not a multiple of 4)."""


class SemiStructuredUnavailable(RuntimeError):
    """No semi-structured sparse kernels on this device / torch build."""


def two_four_violation(weight: torch.Tensor) -> str | None:
    """None if every group of 4 consecutive inputs of every row has at most 2 nonzeros; else what breaks it."""
    rows, cols = weight.shape
    if cols % 4:
        return f"{cols} input features, not a multiple of 4"
    nonzero = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(-1)
    bad = (nonzero > 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        return f"row {r}, inputs {4 * g}..{4 * g + 3} hold {int(nonzero[r, g])} nonzeros"
    return None


def check_two_four(model: nn.Module, names) -> None:
    for name in names:
        problem = two_four_violation(get_linear(model, name).weight)
        if problem:
            raise SemiStructuredError(f"layer {name!r} is not 2:4 sparse ({problem}); expected a layer pruned with "
                                      "the '2:4' pattern (e.g. prune_model(..., {layer: '2:4'}, ...))")


def availability(device: torch.device) -> str | None:
    """None when semi-structured kernels can be tried on `device`, else why not."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if torch.device(device).type != "cuda":
        return f"semi-structured sparse kernels need a CUDA GPU; the model is on {device}"
    return None


def _backend(name: str | None):
    """Set torch's CUTLASS / cuSPARSELt choice; returns the previous value to restore."""
    if name not in BACKENDS:
        raise SemiStructuredError(f"semi-structured backend {name!r} is unknown; expected one of {list(BACKENDS)}")
    from torch.sparse import SparseSemiStructuredTensor

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    if name is not None:
        SparseSemiStructuredTensor._FORCE_CUTLASS = name == "cutlass"
    return previous


@torch.no_grad()
def time_layer(layer: nn.Linear, tokens: int, repeats: int = 20) -> dict:
    """Dense vs semi-structured matmul of one 2:4 layer on `tokens` random input rows."""
    weight = layer.weight.detach()
    device = weight.device
    x = torch.randn(tokens, layer.in_features, device=device, dtype=weight.dtype)
    bias = layer.bias.detach() if layer.bias is not None else None
    try:
        sparse = torch.sparse.to_sparse_semi_structured(weight)
        F.linear(x, sparse, bias)
    except (RuntimeError, ValueError, NotImplementedError) as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}

    def run(w):
        return lambda: F.linear(x, w, bias)

    for fn in (run(weight), run(sparse)):
        fn()
    dense = median([timed(run(weight), device) for _ in range(repeats)])
    semi = median([timed(run(sparse), device) for _ in range(repeats)])
    return {"dense_ms": 1000 * dense, "sparse_ms": 1000 * semi, "speedup": dense / max(semi, 1e-12),
            "sparse_weight": sparse}


def export_semi_structured(model: nn.Module, names, tokens: int, repeats: int = 20, min_speedup: float = 1.0,
                           backend: str | None = None) -> list[dict]:
    """Swap in semi-structured weights where measured faster (by `min_speedup`) at `tokens` rows; returns one row
    per layer: name, shape, dense_ms, sparse_ms, speedup, swapped (or error)."""
    names = list(names)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise SemiStructuredError(f"tokens is {tokens!r}; expected a positive number of input rows to time")
    check_two_four(model, names)
    device = next(model.parameters()).device
    reason = availability(device)
    if reason:
        raise SemiStructuredUnavailable(reason + "; nothing was swapped")
    previous = _backend(backend)
    report = []
    try:
        for name in names:
            layer = get_linear(model, name)
            row = {"layer": name, "shape": [layer.out_features, layer.in_features], "tokens": tokens,
                   "backend": backend or "default"}
            result = time_layer(layer, tokens, repeats)
            sparse = result.pop("sparse_weight", None)
            row.update(result)
            row["swapped"] = sparse is not None and result["speedup"] >= min_speedup
            if row["swapped"]:
                layer.weight = nn.Parameter(sparse, requires_grad=False)
            report.append(row)
    finally:
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return report
