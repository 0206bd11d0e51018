"""Evolution: determinism, budget, elitism, and resuming from the Optuna trial store without re-evaluating."""
import pytest

from efficientllava.policy import SearchSpace
from efficientllava.pruning.layers import select_layers
from efficientllava.search.evolution import EvolutionSettings, rank, run_evolution
from efficientllava.search.trials import StudyMismatchError, TrialStore, sqlite_url
from efficientllava.toy_model import build_toy_llava

CHOICES = [round(0.1 * i, 1) for i in range(10)]


@pytest.fixture(scope="module")
def space():
    model, _ = build_toy_llava(seed=0)
    return SearchSpace(select_layers(model), CHOICES, "linear", 0.5, tolerance=0.01)


def synthetic_fitness(space, genome):
    """Deterministic and structured: rewards sparse MLPs and dense attention."""
    ratios = space.ratios(genome)
    return sum((1 if ".mlp." in n else -1) * r for n, r in ratios.items())


def plain_evaluator(space, calls):
    def evaluate_generation(g, genomes):
        calls.extend(space.key(x) for x in genomes)
        return [{"genome": x, "slot": i, "fitness": synthetic_fitness(space, x)} for i, x in enumerate(genomes)]

    return evaluate_generation


SETTINGS = dict(population=4, generations=3, top_k=2, seed=0)


def test_evolution_is_deterministic_and_on_budget(space):
    runs = []
    for _ in range(2):
        history = run_evolution(space, EvolutionSettings(**SETTINGS), plain_evaluator(space, []), progress=False)
        runs.append([[r["genome"] for r in gen] for gen in history])
    assert runs[0] == runs[1]
    assert all(space.on_budget(g) for gen in runs[0] for g in gen)
    assert all(len({space.key(g) for g in gen}) == len(gen) for gen in runs[0])  # no duplicates in a generation
    other = run_evolution(space, EvolutionSettings(**{**SETTINGS, "seed": 1}), plain_evaluator(space, []),
                          progress=False)
    assert [[r["genome"] for r in gen] for gen in other] != runs[0]


def test_elitism_never_loses_the_best(space):
    history = run_evolution(space, EvolutionSettings(population=6, generations=5, top_k=2, seed=3),
                            plain_evaluator(space, []), progress=False)
    best = [rank(gen)[0]["fitness"] for gen in history]
    assert best == sorted(best)
    assert history[0][0]["genome"] == space.uniform()  # generation 0 starts from the uniform policy


@pytest.mark.parametrize("bad, match", [({"top_k": 5}, "top_k is 5; expected 1 <= top_k <= population"),
                                        ({"population": 1}, "population is 1"),
                                        ({"mutation_prob": 1.5}, "mutation_prob is 1.5")])
def test_bad_settings_are_named(space, bad, match):
    with pytest.raises(ValueError, match=match):
        run_evolution(space, EvolutionSettings(**{**SETTINGS, **bad}), plain_evaluator(space, []), progress=False)


def stored_evaluator(space, store, counter, crash_after=None):
    def evaluate(genome):
        if crash_after is not None and counter["n"] >= crash_after:
            raise KeyboardInterrupt("simulated kill")
        counter["n"] += 1
        f = synthetic_fitness(space, genome)
        return {"acc": f, "G": 0.0, "sparsity": space.sparsity(genome), "fitness": f, "seconds": 0.0}

    def evaluate_generation(g, genomes):
        items = [(space.key(x), x, {"generation": g, "slot": i}) for i, x in enumerate(genomes)]
        return [{**r, "slot": i} for i, r in enumerate(store.evaluate_all(items, evaluate))]

    return evaluate_generation


def open_store(space, url, fingerprint=None):
    return TrialStore(url, "evolution", [g.name for g in space.groups], space.n_choices,
                      fingerprint or {"seed": 0})


def test_resume_reuses_completed_trials_and_ends_the_same(space, tmp_path):
    settings = EvolutionSettings(population=4, generations=4, top_k=2, seed=0)
    reference_store = open_store(space, sqlite_url(tmp_path / "a"))
    reference = run_evolution(space, settings, stored_evaluator(space, reference_store, {"n": 0}), progress=False)
    total = reference_store.evaluated

    url = sqlite_url(tmp_path / "b")
    first = {"n": 0}
    with pytest.raises(KeyboardInterrupt):
        run_evolution(space, settings, stored_evaluator(space, open_store(space, url), first, crash_after=6),
                      progress=False)
    assert first["n"] == 6
    resumed_store = open_store(space, url)
    assert len(resumed_store.records()) == 6
    second = {"n": 0}
    resumed = run_evolution(space, settings, stored_evaluator(space, resumed_store, second), progress=False)
    assert second["n"] == total - 6  # nothing completed before the kill was evaluated again
    assert rank(resumed[-1])[0]["genome"] == rank(reference[-1])[0]["genome"]
    assert [[r["genome"] for r in g] for g in resumed] == [[r["genome"] for r in g] for g in reference]
    keys = [r["key"] for r in resumed_store.records()]
    assert len(keys) == len(set(keys)) == total
    trial = resumed_store.study.trials[0]
    assert trial.params and set(trial.user_attrs) >= {"acc", "G", "sparsity", "fitness", "generation"}


def test_a_study_made_with_other_settings_is_refused(space, tmp_path):
    url = sqlite_url(tmp_path)
    open_store(space, url, {"eta": 0.01})
    with pytest.raises(StudyMismatchError, match="eta=0.01.*eta=0.0"):
        open_store(space, url, {"eta": 0.0})


def test_shared_study_workers_reuse_each_others_trials(space, tmp_path):
    url = sqlite_url(tmp_path)
    settings = EvolutionSettings(population=4, generations=2, top_k=2, seed=0)
    one = TrialStore(url, "evolution", [g.name for g in space.groups], space.n_choices, {"seed": 0}, shared=True)
    run_evolution(space, settings, stored_evaluator(space, one, {"n": 0}), progress=False)
    two = TrialStore(url, "evolution", [g.name for g in space.groups], space.n_choices, {"seed": 0}, shared=True)
    counter = {"n": 0}
    run_evolution(space, settings, stored_evaluator(space, two, counter), progress=False)
    assert counter["n"] == 0 and two.reused > 0
