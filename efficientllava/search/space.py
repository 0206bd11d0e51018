"""The search's joint policy space: unstructured weight sparsity, structured shrinking and visual-token pruning in one
genome, under a sparsity budget and a latency budget.

A genome is one list of choice indices, in this order:
- one gene per weight group (`policy.SearchSpace`: per-linear unstructured sparsity, repaired onto the sparsity band);
- `mlp:<block>` for every decoder block: the fraction of its MLP channels removed (from `structure.mlp_choices`);
- `attn:<block>` for every decoder block: the fraction of its query heads removed, whole KV groups only
  (`structure.attn_choices`);
- `tokens.layer` (K, from `tokens.layers`) and `tokens.keep` (R, from `tokens.keep`): FastV after layer K.
Structure and token choices are ordered from least to most pruning (index 0 prunes least: ratio 0, the latest layer,
R = 1), so "a higher index prunes more" holds for every gene. With R = 1 the layer gene means nothing and is set to 0,
so equal policies have equal genomes.

Latency budget: with a `LatencyTable` and a limit (speedup >= S, i.e. predicted prefill <= dense / S, or prefill <=
T), `repair` adds pruning until the predicted prefill meets the limit: each step moves one structure or token gene one
choice up, drawn uniformly among the moves that save predicted time, by a generator seeded with the genome being
repaired (so repair stays a function of the genome: resumed and shared runs repair alike). A fixed rule would always
spend the budget the same way (e.g. always on the gene that saves most, or least pruned so far), and a dimension
that costs much accuracy (the toy loses 30 points when half its heads go) would be forced onto every candidate;
drawn moves leave that choice to the fitness. Pruning beyond the limit is allowed (it is the front's faster side);
the fitness (accuracy) pulls candidates back toward the limit. Unstructured genes buy no measured speed on dense kernels, so
they keep their own budget (the sparsity band) and never enter the latency repair.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from efficientllava.policy import BudgetError, ModelIdentity, Policy, SearchSpace
from efficientllava.pruning.structured import (BlockGeometry, StructureError, is_ratio, kept_channels, kept_groups,
                                               ratio_span)
from efficientllava.token_pruning import TokenPruningError, check_keep, check_layer


@dataclass
class StructureChoices:
    """Per-block MLP and attention ratios and the unit counts they keep."""

    geometry: dict[str, BlockGeometry]
    mlp: list[float]
    attn: list[float]
    multiple: int = 1

    def __post_init__(self):
        self.mlp = _ratios(self.mlp, "structure.mlp_choices", whole=True)  # 1.0: the block's MLP removed
        self.attn = _ratios(self.attn, "structure.attn_choices")
        self.channels = {p: [kept_channels(g, r, self.multiple) for r in self.mlp] for p, g in self.geometry.items()}
        self.groups = {p: [kept_groups(g, r) for r in self.attn] for p, g in self.geometry.items()}


def _ratios(values, key: str, whole: bool = False) -> list[float]:
    values = list(values or [])
    if not values:
        raise StructureError(f"{key} is empty; expected a list of ratios in {ratio_span(whole)}, e.g. [0.0, 0.25, 0.5]")
    for v in values:
        if not is_ratio(v, whole):
            raise StructureError(f"{key} holds {v!r}; expected ratios in {ratio_span(whole)} (the fraction removed)")
    return sorted({float(v) for v in values})


@dataclass
class TokenChoices:
    """Visual-token pruning: K (the layer after which image tokens are dropped) and R (the fraction kept)."""

    n_layers: int
    layers: list[int]
    keeps: list[float]

    def __post_init__(self):
        if not self.layers or not self.keeps:
            raise TokenPruningError("tokens.layers and tokens.keep must both be non-empty lists; expected e.g. "
                                    "layers [1, 2] and keep [1.0, 0.5, 0.25]")
        layers = sorted({check_layer(k, self.n_layers) for k in self.layers}, reverse=True)  # latest first
        keeps = sorted({check_keep(r) for r in self.keeps}, reverse=True)  # keep most first
        if keeps[0] != 1.0:
            keeps = [1.0, *keeps]  # "no token pruning" is always a choice
        self.layers, self.keeps = layers, keeps


class JointSpace:
    def __init__(self, weights: SearchSpace, structure: StructureChoices | None = None,
                 tokens: TokenChoices | None = None, latency=None, max_seconds: float | None = None,
                 dense_widths: list[tuple[int, int]] | None = None):
        """`latency`: a LatencyTable (with `max_seconds`, the latency budget); `dense_widths`: (KV groups, channels)
        of every decoder block of the dense model (needed for latency predictions without structure genes)."""
        self.unstructured, self.structure, self.tokens = weights, structure, tokens
        if dense_widths is None and structure is not None:
            dense_widths = [(g.kv_heads, g.intermediate) for g in structure.geometry.values()]
        self.dense_widths = dense_widths
        self.latency, self.max_seconds = latency, max_seconds
        self.blocks = list(structure.geometry) if structure else []
        names, sizes = [g.name for g in weights.groups], [weights.n_choices] * weights.n_groups
        self.mlp_genes = self.attn_genes = range(0)
        if structure:
            start = len(names)
            if len(structure.mlp) > 1:
                names += [f"mlp:{p}" for p in self.blocks]
                sizes += [len(structure.mlp)] * len(self.blocks)
                self.mlp_genes = range(start, len(names))
            start = len(names)
            if len(structure.attn) > 1:
                names += [f"attn:{p}" for p in self.blocks]
                sizes += [len(structure.attn)] * len(self.blocks)
                self.attn_genes = range(start, len(names))
        self.layer_gene = self.keep_gene = None
        if tokens and len(tokens.keeps) > 1:
            self.layer_gene, self.keep_gene = len(names), len(names) + 1
            names += ["tokens.layer", "tokens.keep"]
            sizes += [len(tokens.layers), len(tokens.keeps)]
        self.gene_names, self.gene_sizes = names, sizes
        self.tail = list(range(weights.n_groups, len(names)))
        if latency is not None and max_seconds is not None:
            self.check_latency_budget()

    # ---- the SearchSpace interface ------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return len(self.gene_names)

    @property
    def n_choices(self) -> int:
        return max(self.gene_sizes)

    @property
    def groups(self):
        return self.unstructured.groups

    def with_unstructured(self, weights: SearchSpace) -> "JointSpace":
        """The same structure, token choices and latency budget over another weight space (e.g. block
        granularity for OWL / ECoFLaP)."""
        return JointSpace(weights, self.structure, self.tokens, self.latency, self.max_seconds, self.dense_widths)

    def set_latency(self, table, max_seconds: float | None) -> None:
        """Attach the latency table and budget (measured after the space was built) and check the budget."""
        self.latency, self.max_seconds = table, max_seconds
        if table is not None and max_seconds is not None:
            self.check_latency_budget()

    def extend(self, weight_genome) -> list[int]:
        """A weight-only genome (from a baseline) with no structure or token pruning, repaired onto the budgets."""
        return self.repair(list(weight_genome) + [0] * len(self.tail))

    @property
    def layers(self):
        return self.unstructured.layers

    @property
    def target(self) -> float:
        return self.unstructured.target

    @property
    def tolerance(self) -> float:
        return self.unstructured.tolerance

    @property
    def granularity(self) -> str:
        return self.unstructured.granularity

    @property
    def choices(self) -> list:
        return self.unstructured.choices

    def check_genome(self, genome) -> None:
        if len(genome) != self.n_groups:
            raise BudgetError(f"genome has {len(genome)} genes; expected {self.n_groups} ({self.unstructured.n_groups} "
                              f"weight groups + {len(self.tail)} structure/token genes)")
        bad = [(self.gene_names[i], int(v)) for i, v in enumerate(genome) if not 0 <= int(v) < self.gene_sizes[i]]
        if bad:
            raise BudgetError(f"genome gene {bad[0][0]!r} holds choice {bad[0][1]}; expected an index below "
                              f"{self.gene_sizes[self.gene_names.index(bad[0][0])]}")

    def key(self, genome) -> str:
        return ".".join(str(int(i)) for i in genome)

    def speed_key(self, genome) -> str:
        """Names what a plan's speed depends on, its structure and visual-token genes (plans that differ only in
        unstructured sparsity run the same dense kernels at the same speed)."""
        return self.key(self.split(genome)[1])

    def split(self, genome) -> tuple[list[int], list[int]]:
        g = [int(i) for i in genome]
        return g[: self.unstructured.n_groups], g[self.unstructured.n_groups:]

    def ratios(self, genome) -> dict:
        self.check_genome(genome)
        return self.unstructured.ratios(self.split(genome)[0])

    def sparsity(self, genome) -> float:
        return self.unstructured.sparsity(self.split(genome)[0])

    # ---- structure and tokens -----------------------------------------------------------------------------------
    def _index(self, genome, gene_range, block: int) -> int:
        return int(genome[gene_range[block]]) if len(gene_range) else 0

    def structure_ratios(self, genome) -> dict[str, dict[str, float]]:
        """{block path: {'mlp': ratio, 'attn': ratio}} for blocks that lose anything."""
        out = {}
        for b, path in enumerate(self.blocks):
            m, a = self.structure.mlp[self._index(genome, self.mlp_genes, b)], \
                self.structure.attn[self._index(genome, self.attn_genes, b)]
            if m or a:
                out[path] = {"mlp": m, "attn": a}
        return out

    def counts(self, genome) -> dict[str, dict[str, int]]:
        """{block path: {'mlp': channels kept, 'attn': KV groups kept}} for every block of the structure space."""
        return {path: {"mlp": self.structure.channels[path][self._index(genome, self.mlp_genes, b)],
                       "attn": self.structure.groups[path][self._index(genome, self.attn_genes, b)]}
                for b, path in enumerate(self.blocks)}

    def token_setting(self, genome) -> dict | None:
        """{'layer': K, 'keep': R}, or None when no image token is dropped."""
        if self.keep_gene is None or int(genome[self.keep_gene]) == 0:
            return None
        return {"layer": self.tokens.layers[int(genome[self.layer_gene])],
                "keep": self.tokens.keeps[int(genome[self.keep_gene])]}

    def widths(self, genome, dense: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(KV groups, channels) per decoder block; blocks outside the structure space stay at `dense`."""
        if not self.structure:
            return list(dense)
        counts = self.counts(genome)
        return [(counts[p]["attn"], counts[p]["mlp"]) for p in self.blocks]

    # ---- latency ------------------------------------------------------------------------------------------------
    def predicted_seconds(self, genome) -> float:
        tokens = self.token_setting(genome)
        widths = self.widths(genome, self.dense_widths)
        if tokens is None:
            return self.latency.predict(widths)
        return self.latency.predict(widths, tokens["layer"], tokens["keep"])

    def predicted_speedup(self, genome) -> float:
        return self.latency.dense / max(self.predicted_seconds(genome), 1e-12)

    def _most_pruned(self) -> list[int]:
        g = [0] * self.unstructured.n_groups + [self.gene_sizes[i] - 1 for i in self.tail]
        return g

    def check_latency_budget(self) -> None:
        fastest = self._most_pruned()
        if self.predicted_seconds(fastest) > self.max_seconds * (1 + 1e-9):
            raise BudgetError(
                f"the latency budget (predicted prefill <= {1000 * self.max_seconds:.2f} ms, speedup >= "
                f"{self.latency.dense / self.max_seconds:.2f}x) cannot be met: the most pruned policy of the space is "
                f"predicted at {1000 * self.predicted_seconds(fastest):.2f} ms ({self.predicted_speedup(fastest):.2f}x)"
                "; expected a lower speedup or larger structure/token choices")

    def _canonical(self, g: list[int]) -> list[int]:
        if self.keep_gene is not None and g[self.keep_gene] == 0:
            g[self.layer_gene] = 0
        return g

    def repair(self, genome, strict: bool = True) -> list[int]:
        g = [int(i) for i in genome]
        self.check_genome(g)
        w = self.unstructured.repair(g[: self.unstructured.n_groups], strict=strict)
        g = self._canonical(w + g[self.unstructured.n_groups:])
        if self.latency is None or self.max_seconds is None:
            return g
        now = self.predicted_seconds(g)
        rng = np.random.default_rng([zlib.crc32(self.key(g).encode()), 104729])
        while now > self.max_seconds * (1 + 1e-9):
            saving, stalled = [], []
            for i in self.tail:
                if g[i] + 1 >= self.gene_sizes[i] or (i == self.layer_gene and g[self.keep_gene] == 0):
                    continue
                trial = list(g)
                trial[i] += 1
                (saving if now - self.predicted_seconds(trial) > 1e-12 else stalled).append(i)
            moves = saving or stalled
            if not moves:
                break
            g[moves[int(rng.integers(len(moves)))]] += 1
            now = self.predicted_seconds(g)
        if strict and now > self.max_seconds * (1 + 1e-9):
            raise BudgetError(f"could not repair the genome onto the latency budget: predicted "
                              f"{1000 * now:.2f} ms > {1000 * self.max_seconds:.2f} ms")
        return g

    def uniform(self) -> list[int]:
        """Uniform weight sparsity, no structure or token pruning, then repaired onto the budgets."""
        return self.repair(self.unstructured.uniform() + [0] * len(self.tail))

    def random(self, rng, spread: float | None = None) -> list[int]:
        """Weight genes as `SearchSpace.random`; structure and token genes uniform over their choices; repaired."""
        w = self.unstructured.random(rng, spread)
        return self.repair(w + [int(rng.integers(self.gene_sizes[i])) for i in self.tail])

    # ---- policies -----------------------------------------------------------------------------------------------
    def policy(self, genome, identity: ModelIdentity, pruner: dict | None = None, **search) -> Policy:
        w, _ = self.split(genome)
        base = self.unstructured.policy(w, identity, pruner, **search)
        base.search["genome"] = [int(i) for i in genome]
        base.search["genes"] = list(self.gene_names)
        if self.latency is not None and self.max_seconds is not None:
            base.budget["max_prefill_seconds"] = self.max_seconds
            base.budget["min_speedup"] = self.latency.dense / self.max_seconds
        base.structure = self.structure_ratios(genome) if self.structure else {}
        base.tokens = self.token_setting(genome) or {}
        base._check_structure()
        base._check_tokens()
        return base

    def summary(self, genome) -> dict:
        w, _ = self.split(genome)
        out = self.unstructured.summary(w)
        out["genome"] = [int(i) for i in genome]
        if self.structure:
            out["structure"] = {p: {"mlp": r["mlp"], "attn": r["attn"]} for p, r in self.structure_ratios(genome).items()}
        out["tokens"] = self.token_setting(genome)
        return out

    def from_policy(self, policy: Policy) -> list[int]:
        """The genome nearest to a policy: weights as `SearchSpace.from_ratios`, structure and tokens at their
        nearest choices."""

        def nearest(values, value):
            return min(range(len(values)), key=lambda i: (abs(values[i] - value), i))

        tail = [0] * len(self.tail)
        offset = self.unstructured.n_groups
        for b, path in enumerate(self.blocks):
            r = policy.structure.get(path, {})
            if len(self.mlp_genes):
                tail[self.mlp_genes[b] - offset] = nearest(self.structure.mlp, r.get("mlp", 0.0))
            if len(self.attn_genes):
                tail[self.attn_genes[b] - offset] = nearest(self.structure.attn, r.get("attn", 0.0))
        if self.keep_gene is not None and policy.tokens:
            tail[self.keep_gene - offset] = nearest(self.tokens.keeps, policy.tokens["keep"])
            tail[self.layer_gene - offset] = nearest(self.tokens.layers, policy.tokens["layer"])
        return self._canonical(self.unstructured.from_ratios(policy.ratios) + tail)
