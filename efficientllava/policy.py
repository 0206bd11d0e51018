"""A pruning policy: per-layer sparsity ratios (or N:M patterns) for one model, under a budget.

Two objects:
- `SearchSpace` maps a genome (one choice index per group of layers) to per-layer ratios. Groups come from the
  granularity: "linear" (every weight matrix alone), "block" (every transformer block, all its linears together) or
  "role" (e.g. every q_proj of the decoder together). It measures a genome's parameter-weighted average sparsity and
  `repair`s any genome onto the budget.
- `Policy` is what a search hands out and a pruner takes: model identity, pruner, per-layer ratios, budget, and
  optionally structured shrinking ({decoder block: {'mlp': ratio, 'attn': ratio}}, efficientllava/pruning/
  structured.py) and visual-token pruning ({'layer': K, 'keep': R}, efficientllava/token_pruning.py). It is saved as
  JSON; loading it against a model whose prunable layers differ raises `PolicyMismatchError` naming the first
  difference. (The search space over all of these is efficientllava/search/space.py.)

Sparsity is always parameter-weighted over the policy's layers: sum_l s_l * |W_l| / sum_l |W_l|. Every linear layer
of the language model sees the same tokens, so the same average is the fraction of their matmul FLOPs removed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from efficientllava.pruning.layers import LayerInfo, find_layers
from efficientllava.pruning.operators import check_fits, parse_target

FORMAT = "efficientllava.policy/1"
GRANULARITIES = ("linear", "block", "role")


class BudgetError(ValueError):
    """A budget the choices and granularity cannot meet."""


class PolicyMismatchError(ValueError):
    """A policy made for another model."""


# ---- choices ----------------------------------------------------------------------------------------------------
def choice_value(value):
    """The canonical JSON value of a choice: a float ratio, or an 'N:M' string."""
    target = parse_target(value)
    return str(target) if target.is_nm else float(f"{target.ratio:g}")


def choice_ratio(value) -> float:
    return parse_target(value).ratio


def sorted_choices(choices) -> list:
    """Canonical, de-duplicated choices sorted by sparsity (an N:M pattern after the ratio it equals)."""
    if not choices:
        raise BudgetError("the search was given no sparsity choices; expected e.g. [0.0, 0.1, ..., 0.9]")
    values = {}
    for c in choices:
        try:
            v = choice_value(c)
        except ValueError as err:
            raise BudgetError(f"sparsity choice {c!r} is invalid: {err}") from None
        values[str(v)] = v
    return sorted(values.values(), key=lambda v: (choice_ratio(v), isinstance(v, str), str(v)))


# ---- model identity ---------------------------------------------------------------------------------------------
def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """{name: [out_features, in_features]} of every prunable linear layer, in module order."""
    return {n: [i.out_features, i.in_features] for n, i in find_layers(model).items()}


def identity_hash(shapes: dict[str, list[int]]) -> str:
    return hashlib.sha1(json.dumps(sorted((n, list(s)) for n, s in shapes.items())).encode()).hexdigest()[:16]


@dataclass
class ModelIdentity:
    """Which model a policy was made for: its path (informative) and every prunable layer's name and shape."""

    path: str
    layers: dict[str, list[int]]

    @property
    def hash(self) -> str:
        return identity_hash(self.layers)

    @classmethod
    def of(cls, model: nn.Module, path: str | None = None) -> "ModelIdentity":
        path = path or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
        return cls(str(path), layer_shapes(model))

    def to_json(self) -> dict:
        return {"path": self.path, "hash": self.hash, "layers": self.layers}

    def check(self, other: "ModelIdentity", what: str = "the policy") -> None:
        """Raise PolicyMismatchError naming the first layer that differs between self (made for) and other."""
        if self.hash == other.hash:
            return
        for name, shape in self.layers.items():
            if name not in other.layers:
                raise PolicyMismatchError(
                    f"{what} was made for model '{self.path}' (identity {self.hash}), which has layer {name!r}; "
                    f"this model ('{other.path}', identity {other.hash}) has no such layer; expected a policy made "
                    "for this model"
                )
            if list(other.layers[name]) != list(shape):
                raise PolicyMismatchError(
                    f"{what} was made for model '{self.path}' whose layer {name!r} has shape {list(shape)}; "
                    f"this model's ('{other.path}') is {list(other.layers[name])}; expected a policy made for "
                    "this model"
                )
        extra = next(n for n in other.layers if n not in self.layers)
        raise PolicyMismatchError(
            f"{what} was made for model '{self.path}' (identity {self.hash}), which has no layer {extra!r}; this "
            f"model ('{other.path}') has it; expected a policy made for this model"
        )


# ---- policy -----------------------------------------------------------------------------------------------------
@dataclass
class Policy:
    """Per-layer ratios (float in [0, 1) or 'N:M') for one model, the pruner that applies them and the budget."""

    model: ModelIdentity
    ratios: dict[str, object]
    pruner: dict = field(default_factory=lambda: {"method": "sparsegpt", "sequential": True})
    budget: dict = field(default_factory=dict)  # target_sparsity, tolerance
    search: dict = field(default_factory=dict)  # free-form provenance: granularity, choices, genome, fitness
    structure: dict = field(default_factory=dict)  # {decoder block path: {'mlp': ratio, 'attn': ratio}}
    tokens: dict = field(default_factory=dict)  # {'layer': K, 'keep': R}; empty: no visual-token pruning

    def __post_init__(self):
        self._check_structure()
        self._check_tokens()
        for name, value in self.ratios.items():
            if name not in self.model.layers:
                raise PolicyMismatchError(
                    f"policy names layer {name!r}, which is not a prunable layer of its model '{self.model.path}'"
                )
            try:
                self.ratios[name] = choice_value(value)
                check_fits(parse_target(value), self.model.layers[name][1], layer=name)
            except ValueError as err:
                raise PolicyMismatchError(str(err)) from None

    def blocks(self) -> list[str]:
        """Decoder block paths of the model's language model, from the identity's layer names."""
        from efficientllava.pruning.layers import BLOCK, classify

        paths = {}
        for name in self.model.layers:
            kind = classify(name)
            if kind and kind[0] == "language_model" and kind[1] is not None:
                match = BLOCK.match(name)
                paths[kind[1]] = f"{match['prefix']}.{match['index']}"
        return [paths[i] for i in sorted(paths)]

    def _check_structure(self) -> None:
        if not self.structure:
            return
        from efficientllava.pruning.structured import is_ratio, ratio_span

        blocks = set(self.blocks())
        for path, ratios in self.structure.items():
            if path not in blocks:
                raise PolicyMismatchError(f"policy shrinks block {path!r}, which is not a decoder block of its model "
                                          f"'{self.model.path}'")
            if not isinstance(ratios, dict) or set(ratios) - {"mlp", "attn"}:
                raise PolicyMismatchError(f"policy structure for block {path!r} is {ratios!r}; expected "
                                          "{'mlp': ratio, 'attn': ratio}")
            for key, value in ratios.items():  # mlp 1.0 removes the block's whole MLP; attention keeps a group
                if not is_ratio(value, whole=key == "mlp"):
                    raise PolicyMismatchError(f"policy asks block {path!r} for {key} ratio {value!r}; expected a "
                                              f"ratio in {ratio_span(key == 'mlp')} (the fraction removed)")

    def _check_tokens(self) -> None:
        if not self.tokens:
            return
        from efficientllava.token_pruning import TokenPruningError, check_keep, check_layer

        if set(self.tokens) != {"layer", "keep"}:
            raise PolicyMismatchError(f"policy tokens are {self.tokens!r}; expected {{'layer': K, 'keep': R}}")
        try:
            check_layer(self.tokens["layer"], len(self.blocks()))
            check_keep(self.tokens["keep"])
        except TokenPruningError as err:
            raise PolicyMismatchError(f"policy tokens: {err}") from None

    @property
    def params(self) -> int:
        return sum(self.model.layers[n][0] * self.model.layers[n][1] for n in self.ratios)

    def sparsity(self) -> float:
        """Parameter-weighted average sparsity over the policy's layers."""
        total = self.params
        pruned = sum(choice_ratio(r) * self.model.layers[n][0] * self.model.layers[n][1]
                     for n, r in self.ratios.items())
        return pruned / max(total, 1)

    def flops_per_token(self) -> dict:
        """Multiply-accumulate FLOPs per token of the policy's linears: dense, and kept by an ideal sparse engine."""
        dense = sum(2 * self.model.layers[n][0] * self.model.layers[n][1] for n in self.ratios)
        kept = sum(2 * (1 - choice_ratio(r)) * self.model.layers[n][0] * self.model.layers[n][1]
                   for n, r in self.ratios.items())
        return {"dense": dense, "kept": kept}

    def check_model(self, model: nn.Module, path: str | None = None) -> None:
        self.model.check(ModelIdentity.of(model, path))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model.to_json(),
            "pruner": dict(self.pruner),
            "budget": dict(self.budget),
            "sparsity": round(self.sparsity(), 6),
            "ratios": dict(self.ratios),
            **({"structure": {k: dict(v) for k, v in self.structure.items()}} if self.structure else {}),
            **({"tokens": dict(self.tokens)} if self.tokens else {}),
            "search": dict(self.search),
        }

    def save(self, path: str | Path) -> Path:
        from efficientllava.outputs import write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, data: dict, source: str = "policy") -> "Policy":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PolicyMismatchError(f"{source} is not a policy file (format {found!r}); expected {FORMAT!r}")
        model = data["model"]
        identity = ModelIdentity(model.get("path", ""), {n: list(s) for n, s in model["layers"].items()})
        if model.get("hash") and model["hash"] != identity.hash:
            raise PolicyMismatchError(
                f"{source}: its model identity hash {model['hash']} does not match its layer list "
                f"({identity.hash}); the file was edited by hand"
            )
        return cls(identity, dict(data["ratios"]), dict(data.get("pruner", {})), dict(data.get("budget", {})),
                   dict(data.get("search", {})), dict(data.get("structure", {})), dict(data.get("tokens", {})))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, model_path: str | None = None) -> "Policy":
        """A policy from JSON; with `model`, checked against its prunable layers (PolicyMismatchError)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"policy file '{path}' does not exist; expected a JSON file written by a search")
        policy = cls.from_json(json.loads(path.read_text()), source=f"policy file '{path}'")
        if model is not None:
            policy.model.check(ModelIdentity.of(model, model_path), what=f"policy file '{path}'")
        return policy


# ---- search space -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    name: str
    layers: tuple[str, ...]
    params: int


def build_groups(layers: dict[str, LayerInfo], granularity: str) -> list[Group]:
    """Layers grouped by granularity, in module order of each group's first layer."""
    if granularity not in GRANULARITIES:
        raise BudgetError(f"granularity {granularity!r} is unknown; expected one of {list(GRANULARITIES)}")
    members: dict[str, list[str]] = {}
    for name, info in layers.items():
        if granularity == "linear":
            key = name
        elif granularity == "block":
            key = f"{info.component}.block{info.block}" if info.block is not None else info.component
        else:
            key = f"{info.component}.{info.role}"
        members.setdefault(key, []).append(name)
    return [Group(k, tuple(v), sum(layers[n].params for n in v)) for k, v in members.items()]


class SearchSpace:
    """Genomes (one choice index per group) over the selected layers, with the budget they must meet."""

    def __init__(self, layers: dict[str, LayerInfo], choices, granularity: str = "linear",
                 target: float = 0.5, tolerance: float = 0.005):
        if not layers:
            raise BudgetError("the search space has no layers; expected at least one prunable linear layer")
        self.layers = dict(layers)
        self.choices = sorted_choices(choices)
        self.ratios_of_choices = [choice_ratio(c) for c in self.choices]
        for c in self.choices:
            for name, info in self.layers.items():
                try:
                    check_fits(parse_target(c), info.in_features, layer=name)
                except ValueError as err:
                    raise BudgetError(f"sparsity choice {c!r} does not fit: {err}") from None
        self.granularity = granularity
        self.groups = build_groups(self.layers, granularity)
        self.total = sum(g.params for g in self.groups)
        self.weights = [g.params / self.total for g in self.groups]
        self.target, self.tolerance = float(target), float(tolerance)
        self.check_budget()

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_choices(self) -> int:
        return len(self.choices)

    @property
    def gene_sizes(self) -> list[int]:
        """Choices per gene (the same for every group here; the joint space of search/space.py mixes sizes)."""
        return [self.n_choices] * self.n_groups

    @property
    def gene_names(self) -> list[str]:
        return [g.name for g in self.groups]

    # ---- genome -> policy ---------------------------------------------------------------------------------------
    def ratios(self, genome) -> dict[str, object]:
        self.check_genome(genome)
        return {name: self.choices[i] for g, i in zip(self.groups, genome) for name in g.layers}

    def sparsity(self, genome) -> float:
        return sum(w * self.ratios_of_choices[i] for w, i in zip(self.weights, genome))

    def check_genome(self, genome) -> None:
        if len(genome) != self.n_groups:
            raise BudgetError(f"genome has {len(genome)} genes; expected one per group ({self.n_groups})")
        bad = [i for i in genome if not 0 <= int(i) < self.n_choices]
        if bad:
            raise BudgetError(f"genome holds choice indices {bad}; expected indices in [0, {self.n_choices - 1}]")

    def key(self, genome) -> str:
        return ".".join(str(int(i)) for i in genome)

    def policy(self, genome, identity: ModelIdentity, pruner: dict | None = None, **search) -> Policy:
        return Policy(
            identity,
            self.ratios(genome),
            dict(pruner or {}),
            {"target_sparsity": self.target, "tolerance": self.tolerance},
            {"granularity": self.granularity, "choices": self.choices, "genome": [int(i) for i in genome], **search},
        )

    def summary(self, genome) -> dict:
        """A compact description for tables: the genome and the mean ratio per block and per role."""
        ratios = {n: choice_ratio(c) for n, c in self.ratios(genome).items()}

        def mean_by(key):
            acc: dict = {}
            for n, r in ratios.items():
                k = key(self.layers[n])
                acc.setdefault(k, []).append((r, self.layers[n].params))
            return {str(k): round(sum(r * p for r, p in v) / sum(p for _, p in v), 4) for k, v in acc.items()}

        return {
            "granularity": self.granularity,
            "genome": [int(i) for i in genome],
            "per_block": mean_by(lambda i: f"{i.component}.{i.block}"),
            "per_role": mean_by(lambda i: f"{i.component}.{i.role}"),
        }

    # ---- genomes from ratios ------------------------------------------------------------------------------------
    def nearest_index(self, ratio: float) -> int:
        """The unstructured choice nearest to `ratio` (ties: the lower one)."""
        best = min(range(self.n_choices),
                   key=lambda i: (isinstance(self.choices[i], str), abs(self.ratios_of_choices[i] - ratio), i))
        return best

    def from_ratios(self, ratios: dict[str, float]) -> list[int]:
        """The genome nearest to per-layer ratios (each group: the choice nearest its parameter-weighted mean)."""
        missing = [n for n in self.layers if n not in ratios]
        if missing:
            raise BudgetError(f"ratios miss layer(s) {missing[:3]}; expected a ratio for every searched layer")
        genome = []
        keys = [str(c) for c in self.choices]
        for g in self.groups:
            values = {str(choice_value(ratios[n])) for n in g.layers}
            if len(values) == 1 and next(iter(values)) in keys:  # exactly one of the choices (N:M included)
                genome.append(keys.index(values.pop()))
                continue
            mean = sum(choice_ratio(ratios[n]) * self.layers[n].params for n in g.layers) / g.params
            genome.append(self.nearest_index(mean))
        return genome

    def uniform(self) -> list[int]:
        """Every group at the choice nearest the target, then repaired onto the budget."""
        return self.repair([self.nearest_index(self.target)] * self.n_groups)

    # ---- budget -------------------------------------------------------------------------------------------------
    def gap(self, genome) -> float:
        return self.target - self.sparsity(genome)

    def on_budget(self, genome) -> bool:
        return abs(self.gap(genome)) <= self.tolerance + 1e-12

    def check_budget(self) -> None:
        lo, hi = min(self.ratios_of_choices), max(self.ratios_of_choices)
        if not 0 <= self.target < 1:
            raise BudgetError(f"target sparsity {self.target}; expected a fraction in [0, 1)")
        if self.tolerance < 0:
            raise BudgetError(f"budget tolerance {self.tolerance}; expected a non-negative fraction (e.g. 0.005)")
        if self.target > hi + self.tolerance:
            raise BudgetError(f"target sparsity {self.target} is above the largest sparsity choice {hi}; expected "
                              f"a target in [{lo}, {hi}] or more choices")
        if self.target < lo - self.tolerance:
            raise BudgetError(f"target sparsity {self.target} is below the smallest sparsity choice {lo}; expected "
                              f"a target in [{lo}, {hi}] or more choices")
        best = self.repair([self.nearest_index(self.target)] * self.n_groups, strict=False)
        if not self.on_budget(best):
            raise BudgetError(
                f"target sparsity {self.target} cannot be met within tolerance {self.tolerance} with granularity "
                f"{self.granularity!r} and choices {self.choices}: the nearest reachable average is "
                f"{self.sparsity(best):.4f}; expected a larger tolerance or finer choices"
            )

    def repair(self, genome, strict: bool = True) -> list[int]:
        """The genome moved onto the budget (|sparsity - target| <= tolerance), deterministically.

        Phase 1 walks toward the target one step of one group at a time, always moving the most extreme group
        (the densest when sparsity must rise, the sparsest when it must fall; ties: the move landing nearest the
        target, then group order) and never stepping past the far edge of the tolerance band. Phase 2, if the
        band is still missed (a group's step is too coarse), takes the single move or (up, down) pair that brings
        the average nearest the target, while that strictly improves.
        """
        g = [int(i) for i in genome]
        self.check_genome(g)
        r, w, tol = self.ratios_of_choices, self.weights, self.tolerance + 1e-12
        s = self.sparsity(g)

        def delta(i, d):
            return w[i] * (r[g[i] + d] - r[g[i]])

        while abs(self.target - s) > tol:  # phase 1
            d = 1 if self.target > s else -1
            moves = []
            for i in range(self.n_groups):
                if not 0 <= g[i] + d < self.n_choices:
                    continue
                new_gap = self.target - (s + delta(i, d))
                if d * new_gap < -tol:  # would step past the far edge of the band
                    continue
                extreme = r[g[i]] if d > 0 else -r[g[i]]
                moves.append((extreme, abs(new_gap), i))
            if not moves:
                break
            _, _, i = min(moves)
            g[i] += d
            s = self.sparsity(g)

        while abs(self.target - s) > tol:  # phase 2
            best = (abs(self.target - s), None)
            n = self.n_groups
            steps = [(i, d) for i in range(n) for d in (1, -1) if 0 <= g[i] + d < self.n_choices]
            for i, d in steps:
                cand = abs(self.target - (s + delta(i, d)))
                if cand < best[0] - 1e-15:
                    best = (cand, ((i, d),))
            ups = [i for i in range(n) if g[i] + 1 < self.n_choices]
            downs = [j for j in range(n) if g[j] > 0]
            for i in ups:
                for j in downs:
                    if i != j:
                        cand = abs(self.target - (s + delta(i, 1) + delta(j, -1)))
                        if cand < best[0] - 1e-15:
                            best = (cand, ((i, 1), (j, -1)))
            if best[1] is None:
                break
            for i, d in best[1]:
                g[i] += d
            s = self.sparsity(g)

        if strict and not self.on_budget(g):
            raise BudgetError(f"could not repair the genome onto the budget {self.target} +- {self.tolerance}: "
                              f"nearest {s:.4f}")
        return g

    def random(self, rng, spread: float | None = None) -> list[int]:
        """A random genome on the budget: indices uniform over the choices (or target index +- `spread` steps)."""
        if spread is None:
            g = [int(rng.integers(self.n_choices)) for _ in range(self.n_groups)]
        else:
            centre = self.nearest_index(self.target)
            g = [int(min(max(centre + round(rng.normal(0, spread)), 0), self.n_choices - 1))
                 for _ in range(self.n_groups)]
        return self.repair(g)
