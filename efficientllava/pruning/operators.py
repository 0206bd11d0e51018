"""Pruning operators over one weight matrix: magnitude, Wanda and SparseGPT, unstructured or N:M.

Every operator has the form `op(weight, target, stats) -> (pruned_weight, kept_mask)`: `weight` is (out, in), the
mask is boolean with True where a weight is kept, the returned weight has the input's dtype and device and the input
is never modified. `target` is a ratio in [0, 1) or an N:M pattern (`"2:4"`: keep 2 of every 4 consecutive inputs).

Sparsity is exact per output row: an unstructured ratio r prunes round(r * in_features) weights of every row, so a
layer's sparsity is r to within half a weight per row.

- magnitude: score |W_ij|, the lowest per row are pruned (per row, like Wanda, so the two differ only by ||X_j||).
- wanda: score |W_ij| * ||X_j||_2 over the calibration tokens, the lowest per row are pruned; no update.
- sparsegpt: H = mean over tokens of x x^T, dampened by `damp` times its mean diagonal; U = upper Cholesky factor of
  H^-1. Columns are swept left to right in blocks of `blocksize`; at the start of a block the mask of that block is
  chosen from w^2 / U_jj^2 (the OBS saliency given the columns already fixed), then each column is pruned and its
  error is spread over the later columns of the row (the OBS update). SparseGPT's reference code picks one threshold
  over a whole block, which lets row counts drift; here the mask is chosen per row, pruning in block b exactly
  round(r * end_b) - round(r * start_b) weights, so every row ends with exactly round(r * in_features) zeros. N:M
  chooses the mask per group of M columns when the sweep reaches it. A dead input (H_jj = 0: the input was always
  zero) costs nothing to prune, so its weights are pruned first.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Target:
    """A sparsity target: an unstructured ratio, or keep `n` of every `m` consecutive inputs."""

    ratio: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def pruned_per_row(self, in_features: int) -> int:
        if self.is_nm:
            return in_features // self.m * (self.m - self.n)
        return int(round(self.ratio * in_features))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def parse_target(value, layer: str | None = None) -> Target:
    """A Target from a ratio (float in [0, 1)) or an N:M string ('2:4', '4:8')."""
    where = f"layer {layer!r} asks for" if layer else "asked for"
    if isinstance(value, Target):
        return value
    if isinstance(value, str):
        match = NM_PATTERN.match(value)
        if match:
            n, m = int(match[1]), int(match[2])
            if not 0 < n <= m:
                raise ValueError(f"{where} pattern {value!r}; N:M patterns need 0 < N <= M (keep N of every M)")
            return Target(ratio=1 - n / m, n=n, m=m)
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where} sparsity {value!r}; expected a ratio in [0, 1) or an N:M pattern like '2:4'")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} sparsity {value!r}; expected a ratio in [0, 1) or an N:M pattern like '2:4'")
    ratio = float(value)
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise ValueError(f"{where} sparsity {value!r}; ratios must be in [0, 1)")
    return Target(ratio=ratio)


def check_fits(target: Target, in_features: int, layer: str | None = None) -> None:
    if target.is_nm and in_features % target.m:
        name = f"layer {layer!r}" if layer else "a layer"
        raise ValueError(
            f"{name} has {in_features} input features, not a multiple of M={target.m}; "
            f"N:M pattern {target} needs in_features divisible by {target.m}"
        )


def mask_from_scores(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """Kept-mask pruning the lowest scores: round(ratio * in) per row, or M-N per group of M along each row."""
    out_features, in_features = scores.shape
    check_fits(target, in_features)
    if target.is_nm:
        groups = scores.reshape(out_features, in_features // target.m, target.m)
        drop = torch.topk(groups, target.m - target.n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(out_features, in_features)
    k = target.pruned_per_row(in_features)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        keep.scatter_(1, drop, False)
    return keep


def magnitude(weight: torch.Tensor, target, stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    target = parse_target(target)
    keep = mask_from_scores(weight.detach().abs().float(), target)
    return weight.detach() * keep, keep


def wanda(weight: torch.Tensor, target, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """`stats` holds `sq_norms` (in,): sum over calibration tokens of x_j^2."""
    target = parse_target(target)
    sq_norms = _require(stats, "sq_norms", "wanda")
    if sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"wanda got input norms of shape {tuple(sq_norms.shape)}; expected ({weight.shape[1]},)")
    scores = weight.detach().abs().float() * sq_norms.to(weight.device, torch.float32).sqrt()
    keep = mask_from_scores(scores, target)
    return weight.detach() * keep, keep


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01, layer: str | None = None):
    """(U, dead): the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 and the dead-input mask.

    Computed once per layer and shared by every ratio pruned from the same Hessian (the bank does this).
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"sparsegpt got a Hessian of shape {tuple(hessian.shape)}; expected a square matrix")
    if not damp > 0:
        raise ValueError(f"sparsegpt dampening is {damp}; expected a positive fraction of the mean diagonal (0.01)")
    H = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as err:
        name = f"layer {layer!r}" if layer else "the layer"
        raise torch.linalg.LinAlgError(
            f"sparsegpt: the Hessian of {name} is not positive definite after {damp:g} dampening; "
            f"expected finite calibration inputs, or raise `damp` ({err})"
        ) from err
    return U, dead


def sparsegpt(
    weight: torch.Tensor,
    target,
    stats=None,
    blocksize: int = 128,
    damp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`stats` holds `hessian` (in, in); or pass `factor` from `inverse_hessian_factor` to skip its computation."""
    target = parse_target(target)
    rows, cols = weight.shape
    check_fits(target, cols)
    if blocksize < 1 or (target.is_nm and blocksize % target.m):
        raise ValueError(f"sparsegpt blocksize is {blocksize}; expected a positive multiple of M={target.m or 1}")
    if factor is None:
        factor = inverse_hessian_factor(_require(stats, "hessian", "sparsegpt").to(weight.device), damp)
    U, dead = factor
    if U.shape != (cols, cols):
        raise ValueError(f"sparsegpt got a Hessian factor of shape {tuple(U.shape)}; expected ({cols}, {cols})")
    U, dead = U.to(weight.device), dead.to(weight.device)
    W = weight.detach().to(torch.float32).clone()
    keep = torch.ones_like(W, dtype=torch.bool)
    if target.pruned_per_row(cols) == 0:
        return weight.detach().clone(), keep

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        d = torch.diag(U1)
        err1 = torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if not target.is_nm:
            k = round(target.ratio * end) - round(target.ratio * start)
            keep1 = _per_row_keep(W1, d, dead[start:end], k)
        for i in range(end - start):
            if target.is_nm and i % target.m == 0:
                group = slice(i, i + target.m)
                keep1[:, group] = _per_row_keep(W1[:, group], d[group], dead[start:end][group], target.m - target.n)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            e = (w - q) / d[i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zeros where pruned, untouched where kept and nothing was pruned before
            err1[:, i] = e
        W[:, start:end] = W1
        keep[:, start:end] = keep1
        W[:, end:] -= err1 @ U[start:end, end:]
    W[~keep] = 0
    return W.to(weight.dtype), keep


def _saliency(w: torch.Tensor, d: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [H^-1]_jj^2 per weight; dead inputs score -1 so they go first."""
    scores = w.pow(2) / d.pow(2).unsqueeze(0)
    return torch.where(dead.unsqueeze(0), torch.full_like(scores, -1.0), scores)


def _per_row_keep(w: torch.Tensor, d: torch.Tensor, dead: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones_like(w, dtype=torch.bool)
    if k:
        drop = torch.topk(_saliency(w, d, dead), k, dim=1, largest=False).indices
        keep.scatter_(1, drop, False)
    return keep


OPERATORS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
NEEDS = {"magnitude": (), "wanda": ("sq_norms",), "sparsegpt": ("hessian",)}


def check_method(method: str) -> None:
    if method not in OPERATORS:
        raise ValueError(f"pruning method {method!r} is unknown; expected one of {sorted(OPERATORS)}")


def prune_weight(method: str, weight: torch.Tensor, target, stats=None, **options):
    """Dispatch to an operator by name; `options` go to SparseGPT (blocksize, damp, factor) and are ignored else."""
    check_method(method)
    if method == "sparsegpt":
        return sparsegpt(weight, target, stats, **options)
    return OPERATORS[method](weight, target, stats)


def _require(stats, field: str, method: str) -> torch.Tensor:
    value = getattr(stats, field, None) if not isinstance(stats, dict) else stats.get(field)
    if value is None:
        raise ValueError(f"{method} needs calibration statistics with '{field}'; got {type(stats).__name__}")
    return value
