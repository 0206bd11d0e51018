"""What a search run asks for, read from the Hydra config and checked before any work starts.

Every check raises `SettingsError` naming the config key, the bad value and what was expected. Checks that need the
model or the data (budget feasibility, N against the split, a policy file's model) run in `search/loop.py` right
after loading them and still before the bank is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from efficientllava.host_memory import MAX_MMAP_THRESHOLD_MIB, HostMemoryError, check_threshold
from efficientllava.policy import GRANULARITIES, BudgetError, choice_ratio, sorted_choices
from efficientllava.projector import CHECKS, LOSSES
from efficientllava.search.evolution import EvolutionSettings
from efficientllava.search.fitness import TASK_SCORES

STRATEGIES = ("evolution", "uniform", "owl", "ecoflap", "random")


class SettingsError(ValueError):
    """A search setting that cannot work."""


@dataclass
class ProjectorSettings:
    enabled: bool = False
    every: int = 4  # R: a round before every R-th generation
    top_k: int = 3
    steps: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    holdout: float = 0.0  # share of the N samples kept out of the loss to accept or reject each round
    loss: str = "answer"  # answer (gold labels, the paper's) or distill (KL to the dense model's answers)
    check: str = "both"  # a round is kept if the held-back task score does not fall (score), their answer loss does
    # not rise (loss), or both hold (both)


@dataclass
class SearchSettings:
    strategy: str
    target: float
    tolerance: float
    choices: list
    granularity: str
    eta: float
    task_score: str
    seed: int
    n_search: int
    search_split: str
    heldout_split: str
    n_heldout: int | None
    heldout_top: int
    final_rerank: int | None  # None: AUTO_RERANK for weight-sparsity plans, 1 with structure/tokens/latency
    eval_batch_size: int
    speed_repeats: int
    steady_heap_mib: int | None
    storage: str | None
    shared: bool
    claim_timeout_s: float
    init_policy: str | None
    evolution: EvolutionSettings
    projector: ProjectorSettings
    options: dict = field(default_factory=dict)  # strategy-specific: owl, ecoflap, random

    def fingerprint(self, extra: dict) -> dict:
        """Settings that decide the candidates and their scores; a resumed study must have been made with them.
        `generations` and `n_candidates` are left out, so a finished run can be extended."""
        evo = {k: v for k, v in vars(self.evolution).items() if k != "generations"}
        options = {k: v for k, v in self.options.items() if k != "n_candidates"}
        return {
            "strategy": self.strategy, "target": self.target, "tolerance": self.tolerance,
            "choices": [str(c) for c in self.choices], "granularity": self.granularity, "eta": self.eta,
            "seed": self.seed, "n_search": self.n_search, "search_split": self.search_split,
            "evolution": evo, "projector": vars(self.projector), "options": options, **extra,
            **({"task_score": self.task_score} if self.task_score != "accuracy" else {}),
        }


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _fail(key: str, value, expected: str):
    raise SettingsError(f"{key} is {value!r}; expected {expected}")


def _int(cfg, key: str, default=None, minimum: int | None = None, where: str = "search") -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(_name(where, key), value, "an integer")
    if minimum is not None and value < minimum:
        _fail(_name(where, key), value, f"an integer >= {minimum}")
    return value


def _steady_heap(value):
    try:
        check_threshold(value)
    except HostMemoryError:
        _fail("steady_heap_mib", value, f"an integer from 1 to {MAX_MMAP_THRESHOLD_MIB} (MiB), or null/0 to leave the "
              "allocator alone")
    return value or None


def _float(cfg, key: str, default=None, where: str = "search") -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        _fail(_name(where, key), value, "a finite number")
    return float(value)


def read_settings(cfg) -> SearchSettings:
    """SearchSettings from the composed config; raises SettingsError before anything is loaded."""
    s = cfg.search
    strategy = s.get("strategy")
    if strategy not in STRATEGIES:
        _fail("search.strategy", strategy, f"one of {list(STRATEGIES)}")
    target = _float(s, "target_sparsity")
    if not 0 <= target < 1:
        _fail("search.target_sparsity", target, "a fraction in [0, 1)")
    tolerance = _float(s, "tolerance", 0.005)
    if tolerance < 0:
        _fail("search.tolerance", tolerance, "a non-negative fraction, e.g. 0.005")
    try:
        choices = sorted_choices(list(s.get("choices") or []))
    except BudgetError as err:
        raise SettingsError(f"search.choices: {err}") from None
    lo, hi = min(map(choice_ratio, choices)), max(map(choice_ratio, choices))
    if target > hi + tolerance:
        _fail("search.target_sparsity", target, f"at most the largest choice {hi} (search.choices); the budget "
              "is infeasible")
    if target < lo - tolerance:
        _fail("search.target_sparsity", target, f"at least the smallest choice {lo} (search.choices); the budget "
              "is infeasible")
    granularity = s.get("granularity", "linear")
    if granularity not in GRANULARITIES:
        _fail("search.granularity", granularity, f"one of {list(GRANULARITIES)}")
    eta = _float(s, "eta", 0.0)
    if eta < 0:
        _fail("search.eta", eta, "eta >= 0 (0 disables the generalization term: the 'w/o Gen' ablation)")
    task_score = s.get("task_score", "accuracy")
    if task_score not in TASK_SCORES:
        _fail("search.task_score", task_score, f"one of {list(TASK_SCORES)}")

    n_search = _int(cfg, "n_search", 64, minimum=1, where="")
    declared = OmegaConf.select(cfg, f"data.build.sizes.{cfg.get('search_split', 'val')}", default=None)
    if declared is not None and n_search > int(declared):
        _fail("n_search", n_search, f"at most the size of the search split '{cfg.get('search_split')}' "
              f"({declared} records, data.build.sizes)")
    n_heldout = cfg.get("n_heldout")
    if n_heldout is not None:
        n_heldout = _int(cfg, "n_heldout", minimum=1, where="")
    if cfg.get("search_split") == cfg.get("heldout_split"):
        _fail("heldout_split", cfg.get("heldout_split"), "a split other than search_split (held out from the "
              "search)")

    evolution = EvolutionSettings(
        population=_int(s, "population", 24, minimum=2),
        generations=_int(s, "generations", 12, minimum=1),
        top_k=_int(s, "top_k", 6, minimum=1),
        mutation_prob=_float(s, "mutation_prob", 0.1),
        crossover_prob=_float(s, "crossover_prob", 0.5),
        init_spread=_float(s, "init_spread", 3.0),
        max_step=_int(s, "max_step", 2, minimum=1),
        seed=_int(cfg, "seed", 0, where=""),
    )
    if strategy == "evolution":
        try:
            evolution.check()
        except ValueError as err:
            raise SettingsError(str(err)) from None

    p = s.get("projector") or {}
    projector = ProjectorSettings(
        enabled=bool(p.get("enabled", False)) and strategy == "evolution",
        every=_int(p, "every", 4, minimum=1, where="search.projector"),
        top_k=_int(p, "top_k", 3, minimum=1, where="search.projector"),
        steps=_int(p, "steps", 10, minimum=0, where="search.projector"),
        lr=_float(p, "lr", 1e-4, where="search.projector"),
        weight_decay=_float(p, "weight_decay", 0.0, where="search.projector"),
        batch_size=_int(p, "batch_size", 64, minimum=1, where="search.projector"),
        holdout=_float(p, "holdout", 0.0, where="search.projector"),
        loss=str(p.get("loss", "answer")),
        check=str(p.get("check", "both")),
    )
    if projector.loss not in LOSSES:
        _fail("search.projector.loss", projector.loss, f"one of {list(LOSSES)}")
    if projector.check not in CHECKS:
        _fail("search.projector.check", projector.check, f"one of {list(CHECKS)}")
    if not 0.0 <= projector.holdout < 1.0:
        _fail("search.projector.holdout", projector.holdout, "a share in [0, 1) of the N search samples")
    if projector.enabled and projector.top_k > evolution.population:
        _fail("search.projector.top_k", projector.top_k, f"at most search.population ({evolution.population}): "
              "the projector is trained over the best candidates of a generation")
    if projector.enabled and projector.lr <= 0:
        _fail("search.projector.lr", projector.lr, "a positive learning rate")

    options = {}
    if strategy == "owl":
        options = {"M": _float(s, "outlier_threshold", 5.0), "lam": _float(s, "lam", 0.08)}
        if options["M"] <= 0 or options["lam"] < 0:
            _fail("search.outlier_threshold/lam", (options["M"], options["lam"]), "M > 0 and lam >= 0")
    elif strategy == "ecoflap":
        options = {"eps": _float(s, "eps", 1e-3), "directions": _int(s, "directions", 1, minimum=1),
                   "s_max_offset": _float(s, "s_max_offset", 0.1)}
        if options["eps"] <= 0:
            _fail("search.eps", options["eps"], "a positive perturbation size, e.g. 1e-3")
    elif strategy == "random":
        options = {"n_candidates": _int(s, "n_candidates", 64, minimum=1)}

    return SearchSettings(
        strategy=strategy, target=target, tolerance=tolerance, choices=choices, granularity=granularity, eta=eta,
        task_score=task_score, seed=evolution.seed, n_search=n_search,
        search_split=str(cfg.get("search_split", "val")),
        heldout_split=str(cfg.get("heldout_split", "test")), n_heldout=n_heldout,
        heldout_top=_int(cfg, "heldout_top", 3, minimum=0, where=""),
        final_rerank=(None if cfg.get("final_rerank", None) is None
                      else _int(cfg, "final_rerank", minimum=1, where="")),
        eval_batch_size=_int(cfg, "eval_batch_size", 64, minimum=1, where=""),
        speed_repeats=_int(cfg, "speed_repeats", 5, minimum=1, where=""),
        steady_heap_mib=_steady_heap(cfg.get("steady_heap_mib", None)),
        storage=s.get("storage"), shared=bool(s.get("shared", False)),
        claim_timeout_s=_float(s, "claim_timeout_s", 600.0), init_policy=s.get("init_policy"),
        evolution=evolution, projector=projector, options=options,
    )
