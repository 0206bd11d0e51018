"""search.py with structured shrinking and visual-token pruning in the policy space: outputs, the reloaded pruned
model, resume, and bad input refused before any work."""
import json

import pytest
from hydra import compose, initialize_config_dir

import efficientllava  # noqa: F401  (config resolvers)
from efficientllava.latency import LatencyTableError
from efficientllava.search import loop
from efficientllava.search.settings import SettingsError
from test_search_run import CONF, toy_dir  # noqa: F401  (module fixture: a random toy saved like a checkpoint)


@pytest.fixture(scope="module")
def tiny(toy_dir, tmp_path_factory):  # noqa: F811
    cache = tmp_path_factory.mktemp("cache")
    return [f"model.path={toy_dir}", "model.device=cpu", "scoring=letter", "data.build.sizes={train:8,val:32,test:32}",
            f"+data.build.cache_dir={cache}", "logger=none", "n_search=8", "n_heldout=16", "heldout_top=1",
            "speed_repeats=1", "search.population=4", "search.generations=2", "search.top_k=2",
            "search.projector.every=1", "search.projector.top_k=2", "search.projector.steps=1",
            "search.latency.min_speedup=null", "search.latency.repeats=1", "search.latency.measure_front=3"]


def compose_search(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("search", overrides=list(overrides))


def test_joint_search_writes_speed_columns_and_a_loadable_shrunk_model(tiny, tmp_path):
    from efficientllava.models import load_llava
    from efficientllava.search.fitness import SearchSamples, letter_accuracy
    from efficientllava.search.settings import read_settings

    cfg = compose_search(tiny + ["search.init_policy=null"])
    summary = loop.run_search(cfg, tmp_path)
    rows = json.loads((tmp_path / "pareto.json").read_text())["candidates"]
    assert (tmp_path / "latency_table.json").is_file()
    assert {r["speedup_kind"] for r in rows} <= {"measured", "latency_table"}
    measured = [r for r in rows if r["speedup_kind"] == "measured"]
    assert 1 <= len(measured) and all(r["speedup"] == r["measured_speedup"] for r in measured)
    assert all(r["on_front"] for r in rows if r["on_front"] and r["speedup_kind"] == "measured")
    assert all(r["predicted_speedup"] > 0 and r["estimated_speedup"] >= 1 for r in rows)
    assert summary["speedup"]["front_measured"] == len({json.dumps(r["policy"]["genome"]) for r in measured})
    assert "predicted" in summary["speedup"] and summary["pruned"]["parameters"]["pruned"] > 0
    assert summary["final_rerank"] is None  # final_rerank: null is 1 with structure / tokens / latency on

    policy = json.loads((tmp_path / "best_policy.json").read_text())
    assert policy["structure"] == summary["pruned"]["structure"] and policy.get("tokens", {}) == \
        summary["pruned"]["tokens"]
    model, processor = load_llava(tmp_path / "pruned_model", device="cpu")  # rebuilt sizes, tokens re-attached
    search_records, _ = loop.load_records(cfg, read_settings(cfg), processor)
    samples = SearchSamples.build(search_records, processor, 64)
    assert letter_accuracy(model, samples) == pytest.approx(summary["pruned"]["search_acc"])

    again = loop.run_search(cfg, tmp_path)  # resumed: the run's latency table and every trial are reused
    assert again["candidates_evaluated_this_run"] == 0
    assert json.loads((tmp_path / "best_policy.json").read_text())["search"]["genome"] == policy["search"]["genome"]

    table = json.loads((tmp_path / "latency_table.json").read_text())
    table["device"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "latency_table.json").write_text(json.dumps(table))
    with pytest.raises(LatencyTableError, match="measured with device 'NVIDIA H100 80GB HBM3'; this run has 'CPU"):
        loop.run_search(cfg, tmp_path)


def test_whole_mlp_removal_is_timed_searched_and_saved_with_zero_channels(tiny, tmp_path):
    from efficientllava.models import load_llava
    from efficientllava.pruning.structured import decoder_geometry

    cfg = compose_search(tiny + ["search.init_policy=null", "search.eta=0", "search.structure.mlp_choices=[0.0,1.0]",
                                 "search.structure.attn_choices=[0.0]", "search.tokens.enabled=false"])
    summary = loop.run_search(cfg, tmp_path)
    table = json.loads((tmp_path / "latency_table.json").read_text())
    for entries in table["mlp"].values():  # every block signature timed at 0 channels and at its dense width
        assert {key.rsplit(":", 1)[1] for key in entries} == {"0", "352"}
        assert all(v > 0 for v in entries.values())
    rows = json.loads((tmp_path / "pareto.json").read_text())["candidates"]
    assert any(r["policy"]["structure"][p]["mlp"] == 1.0 for r in rows for p in r["policy"]["structure"])
    model, _ = load_llava(tmp_path / "pruned_model", device="cpu")
    widths = {p: g.intermediate for p, g in decoder_geometry(model).items()}
    chosen = summary["pruned"]["structure"]  # the blocks the best policy shrinks (none here may be shrunk)
    assert widths == {p: 0 if chosen.get(p, {}).get("mlp") == 1.0 else 352 for p in widths}


@pytest.fixture
def no_bank(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the bank was built before the bad input was caught")

    monkeypatch.setattr(loop.PruningBank, "build", fail)


@pytest.mark.parametrize("overrides, error, match", [
    (["search.tokens.keep=[0.5,1.5]"], SettingsError, r"search.tokens: visual-token keep ratio R is 1.5"),
    (["search.tokens.layers=[2,4]"], SettingsError, r"search.tokens: .*K=4, but the language model has 4 decoder"),
    (["search.structure.attn_choices=[0.0,0.25]"], SettingsError, r"search.structure: .*grouped-query attention"),
    (["search.latency.min_speedup=50", "search.latency.margin=0"], ValueError, r"speedup >= 50.00x\) cannot be met"),
    (["search.latency.min_speedup=50"], ValueError,  # the default search aims 5% past its budget
     r"speedup >= 52.50x\) cannot be met.*includes search.latency.margin=0.05 .*a smaller margin may fit"),
])
def test_bad_structure_token_and_budget_settings_stop_before_the_bank(tiny, tmp_path, no_bank, overrides, error,
                                                                      match):
    with pytest.raises(error, match=match):
        loop.run_search(compose_search(tiny + overrides), tmp_path)


def _fake_acceleration(settings):
    from types import SimpleNamespace

    from efficientllava.search.acceleration import Acceleration

    fake = SimpleNamespace(settings=settings, measured={}, model="dense", release=lambda: None,
                           build=lambda genome, space: genome)
    fake.meets_budget = lambda measured: Acceleration.meets_budget(fake, measured)
    return fake


PREDICTED = {"a": 1.8, "b": 1.9, "c": 2.0}  # the fakes' latency table: predicted speedup of each plan


def _fake_space(predicted=PREDICTED, speed_key=lambda genome: genome):
    from types import SimpleNamespace

    return SimpleNamespace(key=lambda genome: genome, speed_key=speed_key,
                           predicted_speedup=lambda genome: predicted[speed_key(genome)],
                           predicted_seconds=lambda genome: 0.18 / predicted[speed_key(genome)])


@pytest.mark.parametrize("budget, verify, speeds, chosen, tried, met", [
    ({"min_speedup": 1.8}, 8, {"a": 1.75, "b": 1.82, "c": 1.9}, 3, [1, 3], True),  # a is below: step to b
    ({"min_speedup": 1.8}, 8, {"a": 1.81, "b": 1.82, "c": 1.9}, 1, [1], True),  # the best already meets it
    ({"min_speedup": 1.8}, 2, {"a": 1.78, "b": 1.75, "c": 1.9}, 1, [1, 3], False),  # c would, but only 2 plans tried
    ({"max_prefill_ms": 95.0}, 8, {"a": 1.9, "b": 1.95, "c": 2.0}, 3, [1, 3], True),  # prefill 100 / 95 / 90 ms
])
@pytest.mark.parametrize("confirm", [0, 1, 2])
def test_budget_check_prunes_the_best_plan_that_meets_the_budget_measured(monkeypatch, budget, verify, speeds,
                                                                          chosen, tried, met, confirm):
    from types import SimpleNamespace

    from efficientllava.search import acceleration
    from efficientllava.search.acceleration import Acceleration, AccelerationSettings

    calls = []

    def measure(dense, twin, samples, repeats):
        calls.append((dense, twin, repeats))
        ms = {"a": 100.0, "b": 95.0, "c": 90.0}[twin]
        return {"speedup": speeds[twin], "pruned_seconds": ms / 1000, "quartiles": [speeds[twin] - 0.02,
                                                                                     speeds[twin] + 0.02]}

    monkeypatch.setattr(acceleration, "scoring_speedup", measure)
    fake = _fake_acceleration(AccelerationSettings(verify=verify, confirm=confirm, **budget))
    space = _fake_space()
    candidates = [{"id": 1, "genome": "a", "fitness": 0.70}, {"id": 2, "genome": "a", "fitness": 0.69},
                  {"id": 3, "genome": "b", "fitness": 0.68}, {"id": 4, "genome": "c", "fitness": 0.60}]
    check = Acceleration.verify_budget(fake, space, candidates, samples=None, repeats=21)
    assert check["candidate"]["id"] == chosen and check["met"] is met
    assert [c["id"] for c in check["checked"]] == tried  # candidate 2 repeats plan a: not timed twice
    # a plan below the budget is timed once; the plan that meets it, 1 + confirm times
    assert all(dense == "dense" and repeats == 21 for dense, _, repeats in calls)
    assert len(calls) == len(tried) + (confirm if met else 0)
    assert [len(c["measurements"]) for c in check["checked"]] == [1] * (len(tried) - 1) + [1 + confirm if met else 1]
    assert [c["meets_budget"] for c in check["checked"]] == [False] * (len(tried) - 1) + [met]
    assert set(fake.measured) == {candidates[i - 1]["genome"] for i in tried}  # the front shows them measured


@pytest.mark.parametrize("confirm, chosen, met", [(0, 1, True), (1, 3, True), (2, 3, True), (3, 1, False)])
def test_a_plan_passes_the_budget_check_only_if_every_measurement_meets_it(monkeypatch, confirm, chosen, met):
    """Plan a measures 1.82x, then 1.76x (one lucky measurement); plan b meets 1.8x three times, then not."""
    from types import SimpleNamespace

    from efficientllava.search import acceleration
    from efficientllava.search.acceleration import Acceleration, AccelerationSettings

    series = {"a": [1.82, 1.76, 1.9], "b": [1.85, 1.81, 1.83, 1.78]}
    seen = {"a": 0, "b": 0}

    def measure(dense, twin, samples, repeats):
        speed = series[twin][seen[twin]]
        seen[twin] += 1
        return {"speedup": speed, "pruned_seconds": 0.1 / speed, "quartiles": [speed - 0.02, speed + 0.02]}

    monkeypatch.setattr(acceleration, "scoring_speedup", measure)
    fake = _fake_acceleration(AccelerationSettings(verify=8, confirm=confirm, min_speedup=1.8))
    space = _fake_space({"a": 1.8, "b": 1.85})
    candidates = [{"id": 1, "genome": "a", "fitness": 0.70}, {"id": 3, "genome": "b", "fitness": 0.68}]
    check = Acceleration.verify_budget(fake, space, candidates, samples=None, repeats=21)
    assert check["candidate"]["id"] == chosen and check["met"] is met and check["confirm"] == confirm
    first = check["checked"][0]
    assert first["measurements"] == ([1.82] if confirm == 0 else [1.82, 1.76])  # stops at the first miss
    assert first["measured_speedup"] == min(first["measurements"])  # a plan is reported at its lowest
    assert first["meets_budget"] is (confirm == 0)
    if confirm:
        assert check["checked"][1]["measurements"] == series["b"][: 1 + min(confirm, 3)]
        assert check["checked"][1]["meets_budget"] is met
    assert fake.measured["a"]["speedup"] == min(first["measurements"])


def test_budget_check_times_each_speed_plan_once(monkeypatch):
    """Candidates that differ only in unstructured sparsity share a speed plan: the check moves on to the next
    structure / visual-token plan instead of timing the same one again."""
    from types import SimpleNamespace

    from efficientllava.search import acceleration
    from efficientllava.search.acceleration import Acceleration, AccelerationSettings

    timed = []

    def measure(dense, twin, samples, repeats):
        timed.append(twin)
        speed = {"s1": 1.48, "s2": 1.45, "s3": 1.6}[twin[1]]
        return {"speedup": speed, "pruned_seconds": 0.1 / speed, "quartiles": [speed, speed]}

    monkeypatch.setattr(acceleration, "scoring_speedup", measure)
    fake = _fake_acceleration(AccelerationSettings(verify=8, confirm=1, min_speedup=1.5))
    space = _fake_space({"s1": 1.5, "s2": 1.55, "s3": 1.65}, speed_key=lambda genome: genome[1])
    space.key = lambda genome: ".".join(genome)
    genomes = [("w1", "s1"), ("w2", "s1"), ("w3", "s1"), ("w1", "s2"), ("w2", "s2"), ("w4", "s3"), ("w5", "s1")]
    candidates = [{"id": i, "genome": g, "fitness": 1 - i / 10} for i, g in enumerate(genomes)]
    check = Acceleration.verify_budget(fake, space, candidates, samples=None, repeats=21)
    assert [c["id"] for c in check["checked"]] == [0, 3, 5]  # the best candidate of each speed plan
    assert timed == [("w1", "s1"), ("w1", "s2"), ("w4", "s3"), ("w4", "s3")]  # s3 met it and was confirmed
    assert check["candidate"]["id"] == 5 and check["met"] is True


def test_budget_check_is_off_without_a_budget_or_with_verify_zero():
    from types import SimpleNamespace

    from efficientllava.search.acceleration import Acceleration, AccelerationSettings

    space = _fake_space({"a": 1.0})
    candidates = [{"id": 1, "genome": "a", "fitness": 0.7}]
    assert Acceleration.verify_budget(_fake_acceleration(AccelerationSettings()), space, candidates, None, 5) is None
    off = AccelerationSettings(min_speedup=1.5, verify=0)
    assert Acceleration.verify_budget(_fake_acceleration(off), space, candidates, None, 5) is None


def test_search_with_a_budget_reports_its_budget_check(tiny, tmp_path, monkeypatch):
    from efficientllava.search import acceleration

    real = acceleration.scoring_speedup

    def below(dense, twin, samples, repeats, **kwargs):  # every plan checked measures under the budget
        measured = real(dense, twin, samples, repeats=1, **kwargs)
        return measured if kwargs else {**measured, "speedup": 0.5}  # (kwargs: the latency table's calibration)

    monkeypatch.setattr(acceleration, "scoring_speedup", below)
    cfg = compose_search(tiny + ["search.init_policy=null", "search.latency.min_speedup=1.0",
                                 "search.latency.margin=0.02", "search.latency.verify=2",
                                 "search.latency.measure_front=0"])
    summary = loop.run_search(cfg, tmp_path)
    speed = summary["speedup"]
    assert speed["margin"] == 0.02  # the search aimed 2% past the budget, predicted
    assert speed["max_predicted_seconds"] == pytest.approx(speed["latency_table"]["dense_seconds"] / 1.02)
    check = summary["speedup"]["budget_check"]
    assert check["met"] is False and 1 <= len(check["checked"]) <= 2
    assert all(c["measured_speedup"] == 0.5 and not c["meets_budget"] for c in check["checked"])
    assert summary["best_candidate"]["id"] == check["checked"][0]["id"]  # none met it: the best by fitness stays
    assert json.loads((tmp_path / "summary.json").read_text())["speedup"]["budget_check"] == check
    assert "budget check: " in loop.report(summary) and "none met it" in loop.report(summary)


@pytest.mark.parametrize("latency, match", [
    ({"verify": -1}, r"search.latency.verify is -1; expected an integer >= 0"),
    ({"verify": 2.5}, r"search.latency.verify is 2.5; expected an integer >= 0"),
    ({"confirm": -1}, r"search.latency.confirm is -1; expected an integer >= 0"),
    ({"confirm": True}, r"search.latency.confirm is True; expected an integer >= 0"),
    ({"margin": -0.1}, r"search.latency.margin is -0.1; expected a number in \[0, 1\)"),
    ({"margin": "3%"}, r"search.latency.margin is '3%'; expected a number in \[0, 1\)"),
])
def test_bad_verify_and_margin_are_refused(latency, match):
    from omegaconf import OmegaConf

    from efficientllava.search.acceleration import read_acceleration

    with pytest.raises(SettingsError, match=match):
        read_acceleration(OmegaConf.create({"structure": {"enabled": False}, "tokens": {"enabled": True,
                                            "layers": [1], "keep": [0.5]}, "latency": latency}))


def test_the_budget_check_may_try_every_candidate_of_the_current_projector():
    """The final ranking first, then the other candidates scored with the current projector, by fitness; candidates
    scored with an earlier projector are not comparable and stay out."""
    from types import SimpleNamespace

    final = [{"id": 7, "fitness": 0.8, "projector_round": 2}, {"id": 5, "fitness": 0.7, "projector_round": 2}]
    seen = {r["id"]: r for r in final + [{"id": 1, "fitness": 0.9, "projector_round": 0},
                                         {"id": 3, "fitness": 0.6, "projector_round": 2},
                                         {"id": 4, "fitness": 0.75, "projector_round": 2},
                                         {"id": 2, "fitness": 0.6, "projector_round": 2}]}
    run = SimpleNamespace(final_candidates=final, seen=seen, current_round=2)
    assert [r["id"] for r in loop.SearchRun.budget_pool(run)] == [7, 5, 4, 2, 3]
