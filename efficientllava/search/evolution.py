"""Evolutionary search over genomes (one sparsity choice per group), every candidate repaired onto the budget.

Generation 0: the uniform genome, any seed genomes (e.g. a policy file), then random genomes drawn around the target
(choice index = target's index + round(N(0, init_spread))) and repaired. Generation g > 0: the top-k of generation
g - 1 survive unchanged (elitism), and the rest are children: two parents drawn uniformly from the top-k, uniform
crossover with probability `crossover_prob` (else a copy of the first), each gene mutated with probability
`mutation_prob` by +-1..max_step choices, then repaired; a child equal to a genome already in the generation is
redrawn. Ranking is by fitness, ties by slot, so it never depends on dictionary or set order.

The random generator of generation g is seeded from (seed, g) alone, and the fitness of an already stored candidate
is read back rather than recomputed, so a run interrupted after any generation and resumed ends exactly where an
uninterrupted run ends. The evaluation and the hooks (projector rounds, logging) are passed in by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from efficientllava.policy import SearchSpace  # or search.space.JointSpace: the same interface


@dataclass
class EvolutionSettings:
    population: int = 24
    generations: int = 12
    top_k: int = 6
    mutation_prob: float = 0.1
    crossover_prob: float = 0.5
    init_spread: float = 3.0
    max_step: int = 2
    seed: int = 0

    def check(self) -> "EvolutionSettings":
        if self.population < 2:
            raise ValueError(f"search.population is {self.population}; expected at least 2")
        if self.generations < 1:
            raise ValueError(f"search.generations is {self.generations}; expected at least 1")
        if not 1 <= self.top_k <= self.population:
            raise ValueError(f"search.top_k is {self.top_k}; expected 1 <= top_k <= population ({self.population})")
        for name in ("mutation_prob", "crossover_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"search.{name} is {value}; expected a probability in [0, 1]")
        if self.init_spread < 0 or self.max_step < 1:
            raise ValueError(f"search.init_spread={self.init_spread}, search.max_step={self.max_step}; expected "
                             "init_spread >= 0 and max_step >= 1")
        return self


def generation_rng(seed: int, generation: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(generation)])


def rank(records: list[dict]) -> list[dict]:
    """Best first: by fitness, ties by slot."""
    return sorted(records, key=lambda r: (-r["fitness"], r["slot"]))


def distinct_best(records: list[dict], key, limit: int) -> list[dict]:
    """The first `limit` records (in the given order) whose plans differ: `key(genome)` names a plan."""
    out, seen = [], set()
    for record in records:
        k = key(record["genome"])
        if k not in seen and len(out) < limit:
            seen.add(k)
            out.append(record)
    return out


def mutate(space: SearchSpace, genome, prob: float, max_step: int, rng: np.random.Generator) -> list[int]:
    out = list(genome)
    sizes = space.gene_sizes
    for i in range(len(out)):
        if rng.random() < prob:
            step = int(rng.integers(1, max_step + 1)) * (1 if rng.random() < 0.5 else -1)
            out[i] = int(min(max(out[i] + step, 0), sizes[i] - 1))
    return out


def crossover(a, b, rng: np.random.Generator) -> list[int]:
    pick = rng.random(len(a)) < 0.5
    return [int(x if p else y) for x, y, p in zip(a, b, pick)]


def _add_unique(space, population, genome, seen) -> bool:
    key = space.key(genome)
    if key in seen:
        return False
    seen.add(key)
    population.append([int(i) for i in genome])
    return True


def initial_population(space: SearchSpace, s: EvolutionSettings, rng: np.random.Generator, seeds=()) -> list:
    population, seen = [], set()
    for genome in [space.uniform(), *[space.repair(g) for g in seeds]]:
        _add_unique(space, population, genome, seen)
    tries = 0
    while len(population) < s.population:
        tries += 1
        genome = space.random(rng, spread=s.init_spread if tries < 20 * s.population else None)
        if not _add_unique(space, population, genome, seen) and tries > 100 * s.population:
            population.append(genome)  # the space is smaller than the population: allow repeats
    return population[: s.population]


def next_population(space: SearchSpace, parents: list, s: EvolutionSettings, rng: np.random.Generator) -> list:
    population, seen = [], set()
    for genome in parents:
        _add_unique(space, population, genome, seen)
    tries = 0
    while len(population) < s.population:
        tries += 1
        i, j = rng.integers(len(parents), size=2)
        child = crossover(parents[i], parents[j], rng) if rng.random() < s.crossover_prob else list(parents[i])
        # a duplicate is redrawn with a mutation rate that grows with the tries, so small spaces still fill up
        prob = min(1.0, s.mutation_prob * (1 + tries // s.population))
        child = space.repair(mutate(space, child, prob, s.max_step, rng))
        if not _add_unique(space, population, child, seen) and tries > 100 * s.population:
            population.append(child)
    return population


def run_evolution(
    space: SearchSpace,
    settings: EvolutionSettings,
    evaluate_generation: Callable[[int, list], list[dict]],
    before_generation: Callable[[int, list], None] | None = None,
    on_generation: Callable[[int, list], None] | None = None,
    seeds=(),
    progress: bool = True,
) -> list[list[dict]]:
    """Run the generations; returns the records of every generation.

    `evaluate_generation(g, genomes)` returns one record per genome with at least 'fitness', 'slot', 'genome'.
    `before_generation(g, ranked)` runs before generation g is evaluated (ranked: every record of generation g - 1,
    best first; empty for g = 0): the projector rounds hook in here.
    """
    from tqdm.auto import tqdm

    settings.check()
    history: list[list[dict]] = []
    ranked: list[dict] = []
    bar = tqdm(range(settings.generations), desc="evolution", unit="gen", disable=not progress)
    for g in bar:
        rng = generation_rng(settings.seed, g)
        if g == 0:
            population = initial_population(space, settings, rng, seeds)
        else:
            population = next_population(space, [r["genome"] for r in ranked[: settings.top_k]], settings, rng)
        if before_generation is not None:
            before_generation(g, ranked)
        records = evaluate_generation(g, population)
        ranked = rank(records)
        history.append(records)
        bar.set_postfix(best_fitness=f"{ranked[0]['fitness']:.4f}", acc=f"{ranked[0].get('acc', 0):.1f}")
        if on_generation is not None:
            on_generation(g, records)
    return history
