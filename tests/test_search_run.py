"""search.py end to end on tiny settings, every strategy, the configs, and bad inputs failing before any work."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import efficientllava  # noqa: F401  (config resolvers)
from efficientllava.policy import ModelIdentity, PolicyMismatchError, SearchSpace
from efficientllava.pruning.layers import select_layers
from efficientllava.search import loop
from efficientllava.search.settings import STRATEGIES, SettingsError
from efficientllava.toy_model import ToyArchitecture, build_toy_llava

from experiment_scripts import load_experiment

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A random toy LLaVA saved like a checkpoint."""
    path = tmp_path_factory.mktemp("toy")
    model, processor = build_toy_llava(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(toy_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return [f"model.path={toy_dir}", "model.device=cpu", "data.build.sizes={train:8,val:32,test:32}",
            f"+data.build.cache_dir={cache}", "logger=none", "n_search=8", "n_heldout=16", "heldout_top=1",
            "speed_repeats=1", "search.population=4", "search.generations=2", "search.top_k=2",
            "search.projector.every=1", "search.projector.top_k=2", "search.projector.steps=1",
            # the unstructured search alone (structure, tokens and latency: tests/test_search_acceleration.py)
            "search.structure.enabled=false", "search.tokens.enabled=false", "search.latency.min_speedup=null"]


def compose_search(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("search", overrides=list(overrides))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_composes(strategy):
    cfg = compose_search([f"search={strategy}"])
    assert cfg.search.strategy == strategy and cfg.search.target_sparsity == 0.5
    assert cfg.bank.method == "wanda" and cfg.final.method == "sparsegpt" and cfg.n_search == 64


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_search([f"experiment={experiment}"])
    assert cfg.search.strategy == "evolution"


def test_ablations_change_what_they_say():
    assert compose_search(["experiment=no_generalization"]).search.eta == 0
    assert compose_search(["experiment=no_projector"]).search.projector.enabled is False
    assert compose_search(["experiment=granularity_role"]).search.granularity == "role"
    assert compose_search(["experiment=n16"]).n_search == 16
    speed = compose_search(["experiment=speed_toy"])
    assert speed.model.attn_implementation == "eager" and speed.search.target_sparsity == 0.0
    assert list(speed.search.structure.attn_choices) == [0.0]
    assert speed.search.latency.min_speedup == 1.8 and speed.search.latency.margin == 0.05  # 1.8x measured
    assert min(speed.search.tokens.keep) == 0.0625  # one of the toy's 16 image tokens
    assert 1.0 in speed.search.structure.mlp_choices and speed.search.eta == 0  # whole MLPs may go: eta must be 0


@pytest.fixture
def no_work(monkeypatch):
    """Any bad input must raise before the dense reference and the bank: make starting them fail loudly."""
    def fail(*args, **kwargs):
        raise AssertionError("work started before the bad input was caught")

    monkeypatch.setattr(loop.SearchRun, "reference", fail)
    monkeypatch.setattr(loop.PruningBank, "build", fail)


@pytest.mark.parametrize("overrides, error, match", [
    (["search.target_sparsity=0.95"], SettingsError, r"target_sparsity is 0.95; expected at most the largest"),
    (["search.target_sparsity=0.3", "search.choices=[0.5,0.7]"], SettingsError, "at least the smallest choice 0.5"),
    (["n_search=5000"], SettingsError, r"n_search is 5000; expected at most the size of the search split 'val'"),
    (["search.eta=-1"], SettingsError, r"search.eta is -1.0; expected eta >= 0"),
    (["search.task_score=hits"], SettingsError, r"search.task_score is 'hits'; expected one of \['accuracy', "),
    (["search.top_k=8"], SettingsError, r"top_k is 8; expected 1 <= top_k <= population \(4\)"),
    (["search.projector.top_k=5"], SettingsError, r"projector.top_k is 5; expected at most search.population \(4\)"),
    (["search.strategy=annealing"], SettingsError, "search.strategy is 'annealing'"),
    (["search.tolerance=0", "search.granularity=block", "search.choices=[0.0,0.9]"], ValueError,
     "cannot be met within tolerance"),
    (["search.granularity=head"], SettingsError, "search.granularity is 'head'"),
    (["bank.layers.components=[projector,language_model]"], SettingsError, "selects projector layer"),
    (["search.projector.holdout=1.0"], SettingsError, r"holdout is 1.0; expected a share in \[0, 1\)"),
    (["search.projector.holdout=0.01"], SettingsError, "0 of the 8 search samples"),
    (["search.projector.check=accuracy"], SettingsError,
     r"search.projector.check is 'accuracy'; expected one of \['both', 'score', 'loss'\]"),
    (["search.projector.loss=mse"], SettingsError, r"search.projector.loss is 'mse'; expected one of \['answer', "
                                                   r"'distill'\]"),
    (["final_rerank=0"], SettingsError, r"final_rerank is 0; expected an integer >= 1"),
    (["final_rerank=2", "search.tokens.enabled=true"], SettingsError,
     r"final_rerank is 2 with structured shrinking, visual-token pruning or a latency budget enabled; expected 1"),
])
def test_bad_inputs_raise_before_work(tiny, tmp_path, no_work, overrides, error, match):
    with pytest.raises(error, match=match):
        loop.run_search(compose_search(tiny + overrides), tmp_path)


def test_n_larger_than_the_split_is_caught_by_the_loader_too(tiny):
    """A data config that does not declare its sizes: the loader checks the split's real length."""
    from efficientllava.search.settings import read_settings
    from efficientllava.toy_model import build_processor

    cfg = compose_search(tiny)
    settings = read_settings(cfg)
    settings.n_search = 40
    with pytest.raises(SettingsError, match=r"n_search is 40; expected at most .* 'val' \(32 records\)"):
        loop.load_records(cfg, settings, build_processor())


def test_a_policy_for_another_model_is_refused_before_work(tiny, tmp_path, no_work):
    other, _ = build_toy_llava(ToyArchitecture(intermediate=2 * ToyArchitecture().intermediate))
    space = SearchSpace(select_layers(other), [0.0, 0.5], "linear", 0.5)
    path = space.policy(space.uniform(), ModelIdentity.of(other, "other-toy")).save(tmp_path / "other.json")
    with pytest.raises(PolicyMismatchError, match="other-toy"):
        loop.run_search(compose_search(tiny + [f"search.init_policy={path}"]), tmp_path / "run")


def test_search_end_to_end_writes_every_output(tiny, tmp_path):
    import json

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from efficientllava.pruning import get_linear

    summary = loop.run_search(compose_search(tiny), tmp_path)
    for name in ("pareto.json", "pareto.png", "best_policy.json", "summary.json", "search.db",
                 "projector/round_1.safetensors"):
        assert (tmp_path / name).is_file(), name
    pareto = json.loads((tmp_path / "pareto.json").read_text())
    rows = pareto["candidates"]
    assert len(rows) == summary["candidates_evaluated"] >= 4
    for key in ("id", "policy", "search_acc", "heldout_acc", "sparsity", "speedup", "speedup_kind", "G",
                "fitness", "on_front"):
        assert all(key in r for r in rows), key
    assert any(r["on_front"] for r in rows) and any(r["heldout_acc"] is not None for r in rows)
    assert {r["speedup_kind"] for r in rows} == {"estimated"}
    for key in ("dense", "pruned", "speedup", "search_seconds", "candidates_evaluated", "seconds_per_candidate",
                "candidate_to_dense_forward"):
        assert key in summary, key
    assert abs(summary["pruned"]["policy_sparsity"] - 0.5) <= 0.005
    assert summary["speedup"]["measured"] > 0 and summary["speedup"]["estimated"] > 1
    projector = summary["pruned"]["projector"]  # round 1 either kept or rejected by the held-back check
    assert projector in ("searched (round 1)", "original; round(s) 1 rejected"), projector
    # final_rerank: null reranks up to 8 distinct weight-sparsity plans (population 4 here: at most 4)
    assert 1 <= len(summary["final_rerank"]["tried"]) <= 4
    assert summary["best_candidate"]["id"] == summary["final_rerank"]["chosen"]

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "pruned_model")
    AutoProcessor.from_pretrained(tmp_path / "pruned_model")
    policy = json.loads((tmp_path / "best_policy.json").read_text())
    zeros = total = 0
    for name in policy["ratios"]:
        weight = get_linear(model, name).weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    assert zeros / total == pytest.approx(summary["pruned"]["sparsity"])
    assert torch.isfinite(next(model.parameters())).all()

    again = loop.run_search(compose_search(tiny), tmp_path)  # same run dir: everything is reused
    assert again["candidates_evaluated_this_run"] == 0
    assert json.loads((tmp_path / "best_policy.json").read_text())["ratios"] == policy["ratios"]


def test_the_final_rerank_prunes_the_best_plans_and_keeps_the_best_by_its_own_fitness(tiny, tmp_path, monkeypatch):
    """final_rerank=3: up to three distinct plans (fitness order) are pruned by the final pruner and scored again;
    the best of them by that fitness is the result, whatever the bank ranked first. Here the second try is made the
    best by its G, so the result must be the second plan, pruned as the rerank pruned it."""
    import json

    real, calls = loop.generalization_of, []

    def generalization_of(model, bank, names):
        calls.append(1)
        return -1e4 if len(calls) == 2 else real(model, bank, names)

    monkeypatch.setattr(loop, "generalization_of", generalization_of)
    summary = loop.run_search(compose_search(tiny + ["final_rerank=3", "heldout_top=2", "save_pruned_model=false",
                                                     "search.population=6"]), tmp_path)
    rerank = summary["final_rerank"]
    tried = rerank["tried"]
    assert 2 <= len(tried) <= 3 and len({t["id"] for t in tried}) == len(tried)
    assert [t["bank_fitness"] for t in tried] == sorted((t["bank_fitness"] for t in tried), reverse=True)
    assert ["heldout_acc" in t for t in tried] == [True, True, False][: len(tried)]
    for t in tried:
        assert t["fitness"] == pytest.approx(t["score"] / 100 - 0.01 * t["G"])
    assert rerank["chosen"] == tried[1]["id"] and rerank["changed"] is True
    assert summary["best_candidate"]["id"] == tried[1]["id"]
    assert f"final rerank: {len(tried)} plan(s)" in loop.report(summary)
    assert f"candidate {tried[1]['id']} (the search's #2) chosen" in loop.report(summary)
    assert json.loads((tmp_path / "best_policy.json").read_text())["search"]["candidate"] == tried[1]["id"]
    # the result is the rerank's second try, pruned again: the same samples scored the same
    assert summary["pruned"]["search_acc"] == pytest.approx(tried[1]["search_acc"])
    assert summary["pruned"]["heldout_acc"] == pytest.approx(tried[1]["heldout_acc"])


@pytest.mark.parametrize("check, losses, scores, accepted", [
    ("score", (1.0, 2.0), (50.0, 60.0), True), ("score", (2.0, 1.0), (60.0, 50.0), False),
    ("loss", (1.0, 2.0), (50.0, 60.0), False), ("loss", (2.0, 1.0), (60.0, 50.0), True),
    ("both", (1.0, 2.0), (50.0, 60.0), False), ("both", (2.0, 1.0), (60.0, 50.0), False),
    ("both", (2.0, 1.0), (50.0, 60.0), True), ("both", (1.0, 1.0), (50.0, 50.0), True)])
def test_a_projector_round_is_kept_only_if_the_held_back_samples_do_not_get_worse(tiny, toy_dir, tmp_path,
                                                                                 monkeypatch, check, losses, scores,
                                                                                 accepted):
    """check=score: kept if the search's task score on the held-back samples does not fall, whatever their answer loss
    does; check=loss: kept if their answer loss does not rise, whatever the score does; check=both (default): kept
    only if neither happens."""
    import json

    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from efficientllava.projector import projector_state

    seen, scored = [], []

    def check_loss(model, bank, policies, batches):  # before, then after the round
        seen.append(sum(len(b["labels"]) for b in batches))
        return losses[len(seen) - 1]

    def mean_over_policies(model, bank, policies, measure):
        scored.append(len(policies))
        return scores[len(scored) - 1]

    monkeypatch.setattr(loop, "check_loss", check_loss)
    monkeypatch.setattr(loop, "mean_over_policies", mean_over_policies)
    overrides = ["search.projector.holdout=0.25", "search.projector.lr=0.1", "save_pruned_model=false",
                 f"search.projector.check={check}"]
    summary = loop.run_search(compose_search(tiny + overrides), tmp_path)
    assert seen == [2, 2]  # 2 of the 8 search samples held back, read before and after the round
    assert scored == [2, 2]  # the round's top-2 policies, before and after
    info = json.loads((tmp_path / "projector" / "round_1.json").read_text())
    assert info["accepted"] is accepted and summary["projector_rounds"][0]["accepted"] is accepted
    assert (info["check_score_before"], info["check_score_after"]) == scores
    assert (info["check_loss_before"], info["check_loss_after"]) == losses
    original = projector_state(LlavaForConditionalGeneration.from_pretrained(toy_dir))
    saved = load_file(str(tmp_path / "projector" / "round_1.safetensors"))
    unchanged = all(torch.equal(saved[k], v) for k, v in original.items())
    assert unchanged is not accepted  # rejected: the previous projector stayed; kept: the trained one
    assert summary["pruned"]["projector"] == ("searched (round 1)" if accepted else "original; round(s) 1 rejected")


def test_the_held_back_score_is_the_task_score_against_the_dense_answers(tiny, tmp_path):
    """Unmocked: round 1's check_score_before is the agreement of its policies with the dense model on the held-back
    samples, averaged; a projector that has not moved yet (lr 0 is refused, so steps=0) keeps the score equal."""
    import json

    overrides = ["search.projector.holdout=0.25", "search.projector.steps=0", "save_pruned_model=false",
                 "search.task_score=agreement"]
    loop.run_search(compose_search(tiny + overrides), tmp_path)
    info = json.loads((tmp_path / "projector" / "round_1.json").read_text())
    assert 0.0 < info["check_score_before"] <= 100.0
    assert info["check_score_after"] == pytest.approx(info["check_score_before"])  # nothing trained
    assert info["accepted"] is True


@pytest.mark.parametrize("loss", ["answer", "distill"])
def test_the_rounds_train_on_the_chosen_loss(tiny, tmp_path, monkeypatch, loss):
    """distill: the rounds' batches carry the dense model's answer distributions, taken before any round (equal to
    with_teacher on the freshly loaded model); answer: the gold-label batches alone."""
    from efficientllava.projector import with_teacher

    given = []
    real = loop.train_projector

    def spy(model, bank, policies, batches, *args, **kwargs):
        given.append(batches)
        return real(model, bank, policies, batches, *args, **kwargs)

    monkeypatch.setattr(loop, "train_projector", spy)
    run = loop.SearchRun(compose_search(tiny + [f"search.projector.loss={loss}", "search.projector.lr=0.1",
                                                "save_pruned_model=false"]), tmp_path)
    run.prepare()
    run.reference()
    run.run_strategy()
    summary = run.finish()
    assert given and summary["projector_rounds"]
    if loss == "answer":
        assert all("teacher" not in b for batches in given for b in batches)
        return
    from transformers import LlavaForConditionalGeneration

    dense = LlavaForConditionalGeneration.from_pretrained(run.model_path)
    expected = with_teacher(dense, run.loss_batches)
    for batches in given:  # the same teacher in every round, though the projector has moved
        assert len(batches) == len(expected)
        for got, want in zip(batches, expected):
            assert torch.allclose(got["teacher"], want["teacher"], atol=1e-5)


@pytest.mark.parametrize("strategy", ["uniform", "owl", "ecoflap", "random"])
def test_baselines_run_end_to_end_on_budget(tiny, tmp_path, strategy):
    extra = ["search.n_candidates=5"] if strategy == "random" else []
    common = [o for o in tiny if not o.startswith("search.")]  # the evolution's own settings
    summary = loop.run_search(compose_search(common + [f"search={strategy}", "save_pruned_model=false"] + extra),
                              tmp_path)
    assert summary["strategy"] == strategy
    assert abs(summary["pruned"]["policy_sparsity"] - 0.5) <= 0.005
    assert (tmp_path / "pareto.json").is_file() and (tmp_path / "pareto.png").is_file()
    if strategy == "random":
        assert summary["candidates_evaluated"] == 5


def test_projector_effect_scores_the_pruned_model_with_its_projector_and_the_original(tiny, tmp_path, monkeypatch):
    """experiments/projector_effect.py on a finished run whose round was kept: the carried column is the run's own
    held-out accuracy, the original column that of the same pruned model with the dense model's projector."""
    from omegaconf import OmegaConf

    from efficientllava.models import load_llava
    from efficientllava.projector import load_projector_state, projector_state

    effect = load_experiment("projector_effect")
    monkeypatch.setattr(loop, "check_loss", lambda model, bank, policies, batches, _seq=iter([2.0, 1.0]): next(_seq))
    cfg = compose_search(tiny + ["search.projector.holdout=0.25", "search.projector.lr=0.1",
                                 "search.projector.check=loss"])
    summary = loop.run_search(cfg, tmp_path)
    assert summary["pruned"]["projector"] == "searched (round 1)"
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    result = effect.run_effect(tmp_path)
    assert result["n_check"] == 2
    assert result["carried"]["heldout_acc"] == pytest.approx(summary["pruned"]["heldout_acc"])
    dense, processor = load_llava(summary["model"], device="cpu")
    pruned, _ = load_llava(tmp_path / "pruned_model", device="cpu")
    load_projector_state(pruned, projector_state(dense))
    heldout = loop.SearchSamples.build(loop.load_records(cfg, loop.read_settings(cfg), processor)[1], processor)
    assert result["original"]["heldout_acc"] == pytest.approx(loop.accuracy_by_category(pruned, heldout)["acc"])
    for column in ("carried", "original"):
        assert 0.0 <= result[column]["check_agreement"] <= 100.0 and 0.0 < result[column]["check_probability"] <= 100
    assert result["carried"] != result["original"]  # the kept round moved the projector (lr 0.1)
    with pytest.raises(SystemExit, match="summary.json is missing"):
        effect.run_effect(tmp_path / "pruned_model")
