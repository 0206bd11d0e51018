"""Layer-wise sparsity allocations the search is compared with; each gives genomes of a `SearchSpace`.

- uniform: every group at the target (the choice nearest it, repaired onto the budget).
- OWL (Yin et al. 2024): per transformer block, the outlier ratio D_b = fraction of the block's Wanda scores
  |W_ij| * ||X_j||_2 (all its selected linears together) above M times their mean (M = 5). Blocks with more outliers
  are pruned less: s_b = target + lam - 2 * lam * (D_b - min D) / (max D - min D) (lam = 0.08), then shifted so the
  parameter-weighted mean is the target.
- ECoFLaP (Sung et al. 2024), zeroth-order allocation: the importance of block b is sum over calibration batches of
  |L(W + eps z) - L(W - eps z)| / (2 eps), z ~ N(0, I). Their code perturbs one tensor at a time; here all selected
  tensors of a block are perturbed at once (one random direction over the whole block), so the cost is 2 forwards per
  block, direction and batch instead of 2 per tensor: the estimate is the block's directional derivative, whose
  expected magnitude grows with the norm of the block's gradient (several `directions` average out the noise). Then
  every block keeps a floor of (1 - s_max) of its weights (s_max = target + 0.1), and the rest of the keep budget is
  split in proportion to the block scores, capped at what the densest choice keeps, overflow redistributed.
- random: genomes drawn uniformly over the choices, repaired onto the budget.
OWL and ECoFLaP allocate per block, so they work in a space of block granularity; their ratios are then rounded to the
nearest choices and repaired, which the rounding makes necessary whenever the choices are coarser than lam.
"""
from __future__ import annotations

import numpy as np
import torch

from efficientllava.evaluation import MODEL_INPUTS
from efficientllava.policy import SearchSpace
from efficientllava.pruning.calibration import calibrate
from efficientllava.pruning.layers import get_linear


def uniform_genomes(space: SearchSpace) -> list[list[int]]:
    return [space.uniform()]


def random_genomes(space: SearchSpace, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng([int(seed), 7919])
    genomes, seen = [], set()
    tries = 0
    while len(genomes) < n and tries < 100 * n:
        tries += 1
        genome = space.random(rng)
        if space.key(genome) not in seen:
            seen.add(space.key(genome))
            genomes.append(genome)
    return genomes


def _block_ratios(space: SearchSpace, block_sparsity: dict[str, float]) -> dict[str, float]:
    """Per-layer ratios from per-group (block) sparsities."""
    return {name: block_sparsity[g.name] for g in space.groups for name in g.layers}


def _shift_to_target(space: SearchSpace, sparsity: dict[str, float]) -> dict[str, float]:
    mean = sum(sparsity[g.name] * w for g, w in zip(space.groups, space.weights))
    return {k: v + space.target - mean for k, v in sparsity.items()}


# ---- OWL ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def owl_outlier_ratios(model, space: SearchSpace, batches, M: float = 5.0) -> dict[str, float]:
    """{block group: fraction of the block's Wanda scores above M x their mean}."""
    stats = calibrate(model, batches, list(space.layers), need=("sq_norms",))
    ratios = {}
    for group in space.groups:
        scores = []
        for name in group.layers:
            weight = get_linear(model, name).weight.detach().float()
            norms = stats[name].sq_norms.to(weight.device).sqrt()
            scores.append((weight.abs() * norms[None, :]).flatten())
        scores = torch.cat(scores)
        ratios[group.name] = (scores > M * scores.mean()).float().mean().item()
    return ratios


def owl_sparsities(space: SearchSpace, outlier_ratios: dict[str, float], lam: float = 0.08) -> dict[str, float]:
    values = np.array([outlier_ratios[g.name] for g in space.groups])
    spread = values.max() - values.min()
    norm = (values - values.min()) / spread if spread > 0 else np.full_like(values, 0.5)
    sparsity = {g.name: space.target + lam - 2 * lam * float(n) for g, n in zip(space.groups, norm)}
    return _shift_to_target(space, sparsity)


def owl_genomes(model, space: SearchSpace, batches, M: float = 5.0, lam: float = 0.08):
    """(genomes, info): one genome at block granularity."""
    outliers = owl_outlier_ratios(model, space, batches, M)
    sparsity = owl_sparsities(space, outliers, lam)
    genome = space.repair(space.from_ratios(_block_ratios(space, sparsity)))
    return [genome], {"outlier_ratio": outliers, "block_sparsity": sparsity}


# ---- ECoFLaP ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _loss(model, batches) -> list[float]:
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
        out.append(float(model(**inputs, labels=batch["labels"].to(device)).loss))
    return out


@torch.no_grad()
def zeroth_order_scores(model, space: SearchSpace, batches, eps: float = 1e-3, directions: int = 1,
                        seed: int = 0) -> dict[str, float]:
    """{block group: sum over batches and directions of |L(W + eps z) - L(W - eps z)| / (2 eps)}.

    All selected tensors of a block move together along one Gaussian direction z; the weights are copied back
    exactly afterwards (no drift from adding and subtracting)."""
    was_training = model.training
    model.eval()
    scores = {}
    try:
        for b, group in enumerate(space.groups):
            layers = [get_linear(model, n) for n in group.layers]
            originals = [layer.weight.detach().clone() for layer in layers]
            total = 0.0
            for d in range(directions):
                gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + b * 1009 + d)
                noise = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in originals]
                for layer, orig, z in zip(layers, originals, noise):
                    layer.weight.copy_(orig + eps * z)
                plus = _loss(model, batches)
                for layer, orig, z in zip(layers, originals, noise):
                    layer.weight.copy_(orig - eps * z)
                minus = _loss(model, batches)
                for layer, orig in zip(layers, originals):
                    layer.weight.copy_(orig)
                total += sum(abs(p - m) / (2 * eps) for p, m in zip(plus, minus))
            scores[group.name] = total / directions
    finally:
        model.train(was_training)
    return scores


def ecoflap_sparsities(space: SearchSpace, scores: dict[str, float], s_max_offset: float = 0.1) -> dict[str, float]:
    """Keep-floor (1 - s_max) per block, the rest of the keep budget in proportion to the scores (capped)."""
    s_min = min(space.ratios_of_choices)
    s_max = min(space.target + s_max_offset, max(space.ratios_of_choices))
    params = {g.name: g.params for g in space.groups}
    keep = {k: (1 - s_max) * p for k, p in params.items()}
    cap = {k: (1 - s_min) * p for k, p in params.items()}
    budget = (1 - space.target) * space.total - sum(keep.values())
    active = [g.name for g in space.groups]
    weights = {k: max(float(scores[k]), 0.0) for k in active}
    if sum(weights.values()) == 0:
        weights = {k: float(params[k]) for k in active}  # no signal: in proportion to size (uniform)
    while budget > 1e-9 and active:
        total = sum(weights[k] for k in active) or 1.0
        overflow = 0.0
        still = []
        for k in active:
            want = keep[k] + budget * weights[k] / total
            if want >= cap[k]:
                overflow += want - cap[k]
                keep[k] = cap[k]
            else:
                keep[k] = want
                still.append(k)
        budget, active = overflow, still
    return {k: 1 - keep[k] / params[k] for k in params}


def ecoflap_genomes(model, space: SearchSpace, batches, eps: float = 1e-3, directions: int = 1,
                    s_max_offset: float = 0.1, seed: int = 0):
    scores = zeroth_order_scores(model, space, batches, eps, directions, seed)
    sparsity = ecoflap_sparsities(space, scores, s_max_offset)
    genome = space.repair(space.from_ratios(_block_ratios(space, sparsity)))
    return [genome], {"block_scores": scores, "block_sparsity": sparsity}


def block_space(space: SearchSpace) -> SearchSpace:
    """The same layers, choices and budget at block granularity (OWL and ECoFLaP allocate per block)."""
    return SearchSpace(space.layers, space.choices, "block", space.target, space.tolerance)

