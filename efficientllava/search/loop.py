"""One search run from start to finish; `search.py` calls `run_search(cfg, run_dir)`.

1. Check the settings, load the model and the data, build the search space, open the trial store: every input that
   cannot work raises here, before any pruning or evaluation.
2. Dense reference: accuracy on the search samples and the held-out split, forward time, FLOP profile.
3. The bank: every searched layer pruned once at every choice (Wanda, one-shot, on the N search samples).
4. The strategy: evolution (with projector rounds), or a baseline (uniform, OWL, ECoFLaP, random). Each candidate is
   assembled from the bank and scored with one forward over the N samples; each is an Optuna trial in the store.
5. The best candidate's ratios are pruned for real (SparseGPT, sequential, with the final projector), evaluated on the
   held-out split and timed against the dense weights; the outputs are written atomically.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from efficientllava.data.collate import Collator
from efficientllava.data.prompts import LETTER, OPEN, SHORT
from efficientllava.data.schema import CHOICE, record_metric
from efficientllava.host_memory import steady_heap
from efficientllava.logging_setup import build_loggers
from efficientllava.models import load_from_config
from efficientllava.outputs import atomic_directory, write_json
from efficientllava.policy import ModelIdentity, Policy, PolicyMismatchError, SearchSpace
from efficientllava.projector import (CHECKS, check_loss, load_projector, load_projector_state, mean_over_policies,
                                      projector_state, round_accepted, save_projector, train_projector, with_teacher)
from efficientllava.pruning import PruningBank, get_linear, prune_model, pruner_options, select_from_config, sparsity
from efficientllava.search import baselines
from efficientllava.search.acceleration import Acceleration, budget_summary
from efficientllava.search.evolution import distinct_best, rank, run_evolution
from efficientllava.search.fitness import (FitnessEvaluator, SearchSamples, fitness, forward_seconds,
                                           generalization_of, sample_metric, task_scores)
from efficientllava.search.pareto import mark_front, plot_front
from efficientllava.search.settings import SearchSettings, SettingsError, read_settings
from efficientllava.search.tracking import SearchTracker
from efficientllava.search.trials import TrialStore, sqlite_url
from efficientllava.speed import (ESTIMATE_HOW, ESTIMATED, estimated_speedup, flop_profile, measure_speedup,
                                  parameter_count, scoring_speedup)

log = logging.getLogger("search")
AUTO_RERANK = 8  # final_rerank: null, weight-sparsity plans (README, Search)


# ---- inputs -------------------------------------------------------------------------------------------------------
def load_records(cfg, settings: SearchSettings, processor):
    """(search records, held-out records): the first N of the search split, the first n_heldout of the other."""
    datamodule = instantiate(cfg.data, processor=processor)
    search_split = datamodule.split(settings.search_split)
    if settings.n_search > len(search_split):
        raise SettingsError(f"n_search is {settings.n_search}; expected at most the size of the search split "
                            f"'{settings.search_split}' ({len(search_split)} records)")
    heldout_split = datamodule.split(settings.heldout_split)
    n_heldout = len(heldout_split) if settings.n_heldout is None else min(settings.n_heldout, len(heldout_split))
    search = [search_split[i] for i in range(settings.n_search)]
    heldout = [heldout_split[i] for i in range(n_heldout)]
    return search, heldout


def answer_batches(records, processor, batch_size: int, scoring: str = "letter") -> list[dict]:
    """Prompt + gold answer + EOS batches, labels on the answer: calibration, projector and ECoFLaP losses. The
    answer is the letter (multiple choice scored by letter), the option's text after the short-answer prompt
    (scored by likelihood), or the most frequent reference answer (open-ended)."""
    collator = Collator(processor)
    if records and record_metric(records[0]) != CHOICE:
        fmt = OPEN
    else:
        fmt = SHORT if scoring == "likelihood" else LETTER
    return [collator.answers(records[i : i + batch_size], [fmt] * len(records[i : i + batch_size]))
            for i in range(0, len(records), batch_size)]


def accuracy_by_category(model, samples: SearchSamples) -> dict:
    hits = task_scores(model, samples).tolist()
    per = defaultdict(list)
    for category, hit in zip(samples.categories, hits):
        per[category].append(hit)
    return {"acc": 100.0 * sum(hits) / max(len(hits), 1),
            "per_category": {c: round(100.0 * sum(v) / len(v), 2) for c, v in sorted(per.items())}}


# ---- the run ------------------------------------------------------------------------------------------------------
def held_back_count(settings: SearchSettings, n_search: int) -> int:
    """How many of the N search samples (the last ones) judge each projector round; 0 without rounds."""
    return round(settings.projector.holdout * n_search) if settings.projector.enabled else 0


class SearchRun:
    def __init__(self, cfg, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.settings = read_settings(cfg)  # config-only checks first: nothing is loaded yet
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    # 1. everything that can be wrong, before any work
    def prepare(self) -> None:
        s, cfg = self.settings, self.cfg
        self.heap = steady_heap(s.steady_heap_mib)  # before anything is allocated: every timing in one regime
        self.model, self.processor = load_from_config(cfg.model)
        self.model_path = str(cfg.model.path)
        self.identity = ModelIdentity.of(self.model, self.model_path)
        self.search_records, self.heldout_records = load_records(cfg, s, self.processor)
        try:  # one benchmark, scored on the spot (letters or VQA accuracy), not by a judge model
            sample_metric(self.search_records + self.heldout_records)
        except ValueError as err:
            raise SettingsError(f"data: {err}") from None
        self.n_check = held_back_count(s, len(self.search_records))
        if s.projector.enabled and s.projector.holdout > 0 and not 1 <= self.n_check < len(self.search_records):
            raise SettingsError(f"search.projector.holdout is {s.projector.holdout}: {self.n_check} of the "
                                f"{len(self.search_records)} search samples; expected a share that keeps at least "
                                "one sample for the check and one for the loss")
        self.layers = select_from_config(self.model, cfg.bank.get("layers"))
        if not self.layers:
            raise SettingsError(f"bank.layers selects no layer of '{self.model_path}'; expected at least one "
                                "prunable linear layer (see efficientllava/pruning/layers.py)")
        self.names = list(self.layers)
        projector_layers = [n for n, i in self.layers.items() if i.component == "projector"]
        if projector_layers and s.projector.enabled:
            raise SettingsError(
                f"bank.layers selects projector layer {projector_layers[0]!r} while search.projector.enabled is "
                "true; expected one or the other (the bank would overwrite the trained projector): drop "
                "'projector' from bank.layers.components or set search.projector.enabled=false")
        self.space = SearchSpace(self.layers, s.choices, s.granularity, s.target, s.tolerance)
        # structured shrinking, visual tokens and the latency budget join the space (search/acceleration.py)
        self.accel = Acceleration.setup(cfg.search, self.model, self.space)
        if self.accel is not None:
            self.space = self.accel.space
            if s.final_rerank is not None and s.final_rerank > 1:
                raise SettingsError(f"final_rerank is {s.final_rerank} with structured shrinking, visual-token pruning "
                                    "or a latency budget enabled; expected 1 or null there (the rerank prunes "
                                    "weight-sparsity plans in place; those plans are shrunk and timed)")
        self.rerank = s.final_rerank if s.final_rerank is not None else (1 if self.accel is not None else AUTO_RERANK)
        if s.strategy in ("owl", "ecoflap"):
            block = baselines.block_space(self.weight_space(self.space))
            self.strategy_space = self.accel.strategy_space(block) if self.accel is not None else block
        else:
            self.strategy_space = self.space
        self.seeds = []
        if s.init_policy:
            policy = Policy.load(s.init_policy, self.model, self.model_path)
            missing = [n for n in self.names if n not in policy.ratios]
            if missing:
                raise PolicyMismatchError(f"policy file '{s.init_policy}' has no ratio for searched layer "
                                          f"{missing[0]!r}; expected a policy over the same layers (bank.layers)")
            self.seeds = [self.space.from_policy(policy) if self.accel is not None
                          else self.space.from_ratios(policy.ratios)]
        self.bank_options = pruner_options(cfg.bank)
        self.final_options = pruner_options(cfg.final)
        fingerprint = s.fingerprint({
            "model": self.identity.hash, "layers": len(self.names), "bank": self.bank_options["method"],
            "data_seed": OmegaConf.select(cfg, "data.build.seed", default=None),
            **({"acceleration": self.accel.settings.fingerprint()} if self.accel is not None else {}),
        })
        url = s.storage or sqlite_url(self.run_dir)
        study = self.cfg.search.get("study_name") or s.strategy
        self.store = TrialStore(url, study, self.strategy_space.gene_names, self.strategy_space.gene_sizes,
                                fingerprint, s.shared, s.claim_timeout_s)
        self.tracker = SearchTracker(build_loggers(cfg.get("logger")),
                                     OmegaConf.to_container(cfg.search, resolve=True))

    # 2. dense reference and 3. the bank
    def reference(self) -> None:
        s, model = self.settings, self.model
        max_new_tokens = int(self.cfg.get("max_new_tokens", 16))  # open-ended (VQA) samples: greedy answer length
        scoring = str(self.cfg.get("scoring", "letter"))  # multiple choice: option letter or option likelihood
        self.samples = SearchSamples.build(self.search_records, self.processor, s.eval_batch_size, max_new_tokens,
                                           scoring)
        self.heldout = SearchSamples.build(self.heldout_records, self.processor, s.eval_batch_size, max_new_tokens,
                                           scoring)
        self.calib_batches = answer_batches(self.search_records, self.processor, int(self.cfg.bank.batch_size),
                                            scoring)
        fit = len(self.search_records) - self.n_check  # the last n_check samples judge each projector round
        self.loss_batches = answer_batches(self.search_records[:fit], self.processor, s.projector.batch_size, scoring)
        self.check_batches = (answer_batches(self.search_records[fit:], self.processor, s.projector.batch_size, scoring)
                              if self.n_check else [])
        self.check_samples = (SearchSamples.build(self.search_records[fit:], self.processor, s.eval_batch_size,
                                                  max_new_tokens, scoring) if self.n_check else None)
        # what the rounds train on: the gold answers, or the dense model's own answer distributions (taken here,
        # before any round changes the projector)
        self.round_batches = (with_teacher(model, self.loss_batches)
                              if s.projector.enabled and s.projector.loss == "distill" else self.loss_batches)
        self.dense_search = accuracy_by_category(model, self.samples)
        self.dense_heldout = accuracy_by_category(model, self.heldout)
        self.dense_seconds = forward_seconds(model, self.samples, repeats=3)
        self.profile = flop_profile(model, self.samples, self.names)
        if self.accel is not None:  # importance, latency table (measured or loaded and checked), latency budget
            self.accel.reference(self.samples, self.calib_batches, self.identity.hash, self.run_dir)
        start = time.perf_counter()
        o = self.bank_options
        self.bank = PruningBank.build(model, self.names, s.choices, o["method"], self.calib_batches,
                                      mode=self.cfg.bank.get("mode", "weights"),
                                      directory=self.cfg.bank.get("directory"), device=self.cfg.bank.get("device"),
                                      blocksize=o["blocksize"],
                                      damp=o["damp"], offload=o["offload"])
        self.evaluator = FitnessEvaluator(model, self.bank, self.samples, s.eta, s.task_score)
        # the dense model's answers on the held-back samples, taken before any round moves the projector
        self.check_reference = self.evaluator.reference_on(self.check_samples) if self.n_check else None
        if self.accel is not None:
            self.accel.attach(self.bank, self.evaluator.table)
        self.bank_seconds = time.perf_counter() - start
        log.info("dense: %.2f%% on %d search samples, %.2f%% held-out; bank built in %.1fs",
                 self.dense_search["acc"], len(self.samples), self.dense_heldout["acc"], self.bank_seconds)

    # 4. the strategy
    def evaluate_generation(self, generation: int, genomes: list, projector_round: int = 0) -> list[dict]:
        space, s = self.strategy_space, self.settings
        items = [(f"{s.strategy}/r{projector_round}/{space.key(g)}", g,
                  {"generation": generation, "slot": i, "projector_round": projector_round, "strategy": s.strategy})
                 for i, g in enumerate(genomes)]

        def evaluate(genome):
            if self.accel is not None:
                self.accel.apply(genome, space)
            result = self.evaluator(space.ratios(genome))
            result["sparsity"] = space.sparsity(genome)
            if self.accel is not None:
                result.update(self.accel.score(space, genome, result, s.eta))
            return result

        records = self.store.evaluate_all(items, evaluate)
        out = []
        for i, record in enumerate(records):  # the position in this generation, not where it was first seen
            out.append({**record, "slot": i, "generation": generation})
            self.seen[record["id"]] = record
        return out

    def track(self, generation: int, records: list[dict]) -> None:
        rows = self.rows()
        best = rank(records)[0]
        self.tracker.generation(generation, rows, {**best, "search_acc": best["acc"]})

    def weight_space(self, space):
        """The unstructured part of a (joint) search space: what the baselines allocate."""
        return space.unstructured if self.accel is not None else space

    def run_strategy(self) -> None:
        s = self.settings
        self.seen: dict[int, dict] = {}
        self.heldout_acc: dict[int, float] = {}
        self.rounds: list[dict] = []
        self.current_round = 0
        start = time.perf_counter()
        if s.strategy == "evolution":
            history = run_evolution(self.space, s.evolution,
                                    lambda g, genomes: self.evaluate_generation(g, genomes, self.current_round),
                                    before_generation=self.projector_round, on_generation=self.track,
                                    seeds=self.seeds)
            self.final_candidates = rank(history[-1])
            self.allocation = {}
        else:
            if s.strategy == "uniform":
                genomes, self.allocation = baselines.uniform_genomes(self.space), {}
            elif s.strategy == "random":
                genomes = baselines.random_genomes(self.space, s.options["n_candidates"], s.seed)
                self.allocation = {}
            elif s.strategy == "owl":
                genomes, self.allocation = baselines.owl_genomes(self.model, self.weight_space(self.strategy_space),
                                                                 self.calib_batches, s.options["M"],
                                                                 s.options["lam"])
            else:
                genomes, self.allocation = baselines.ecoflap_genomes(
                    self.model, self.weight_space(self.strategy_space), self.loss_batches, s.options["eps"],
                    s.options["directions"], s.options["s_max_offset"], s.seed)
            if self.accel is not None and s.strategy in ("owl", "ecoflap"):  # no structure/tokens, then repaired
                genomes = [self.strategy_space.extend(g) for g in genomes]
            if self.strategy_space is self.space:
                genomes = [*genomes, *self.seeds]
            records = []
            chunk = max(s.evolution.population, 1)
            for g, start_i in enumerate(range(0, len(genomes), chunk)):
                records += self.evaluate_generation(g, genomes[start_i : start_i + chunk])
                self.track(g, records)
            self.final_candidates = sorted(rank(records), key=lambda r: (-r["fitness"], r["id"]))
        self.search_seconds = time.perf_counter() - start

    def projector_round(self, generation: int, ranked: list[dict]) -> None:
        """Before generation g (g = R, 2R, ...): train the projector over the top-k of generation g - 1."""
        p = self.settings.projector
        if not p.enabled or generation == 0 or generation % p.every:
            return
        r = generation // p.every
        path = self.run_dir / "projector" / f"round_{r}.safetensors"
        info_path = path.with_suffix(".json")
        if path.is_file():
            load_projector(path, self.model)
            info = _read_json(info_path) or {"round": r, "resumed": True}
            log.info("projector round %d: loaded from %s", r, path)
        else:
            top = ranked[: p.top_k]
            start = time.perf_counter()
            bank, policies = self.bank, [self.space.ratios(t["genome"]) for t in top]
            if self.accel is not None:  # each policy with its structure and visual tokens
                bank = self.accel.bank_view(self.bank)
                policies = [self.accel.policy_ratios(self.space, t["genome"]) for t in top]
            check = {}
            if self.n_check:  # the round is kept only if the held-back samples do not get worse
                previous = {k: v.detach().clone() for k, v in projector_state(self.model).items()}
                check = self.held_back(bank, policies, "before")
            losses = train_projector(self.model, bank, policies, self.round_batches, p.steps, p.lr, p.weight_decay)
            if self.n_check:
                check.update(self.held_back(bank, policies, "after"))
                check["accepted"] = round_accepted(p.check, check["check_score_before"], check["check_score_after"],
                                                   check["check_loss_before"], check["check_loss_after"])
                if not check["accepted"]:
                    load_projector_state(self.model, previous)
                log.info("projector round %d on the %d held-back samples: %s %.2f -> %.2f, answer loss %.4f -> %.4f; "
                         "judged by the %s: %s", r, self.n_check, self.evaluator.task_score,
                         check["check_score_before"], check["check_score_after"], check["check_loss_before"],
                         check["check_loss_after"], CHECKS[p.check],
                         "kept" if check["accepted"] else "rejected (the previous projector stays)")
            save_projector(path, self.model)
            info = {"round": r, "before_generation": generation, "policies": [t["id"] for t in top],
                    "losses": losses, **check, "seconds": time.perf_counter() - start}
            write_json(info_path, info)
            log.info("projector round %d: loss %.4f -> %.4f over %d steps (%.1fs)", r,
                     losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), len(losses),
                     info["seconds"])
        self.rounds.append(info)
        self.current_round = r

    def held_back(self, bank, policies: list[dict], when: str) -> dict:
        """The held-back samples under each policy, averaged: the search's task score (%) and the answer loss."""
        score = mean_over_policies(self.model, bank, policies,
                                   lambda model: self.evaluator.score(self.check_samples, self.check_reference)[1])
        return {f"check_score_{when}": score,
                f"check_loss_{when}": check_loss(self.model, bank, policies, self.check_batches)}

    def projector_label(self) -> str:
        """Which projector the result carries: the last round whose training was kept (a rejected round leaves the
        previous projector in place), and the rounds that were rejected."""
        kept = [i["round"] for i in self.rounds if i.get("accepted", True)]
        rejected = [str(i["round"]) for i in self.rounds if not i.get("accepted", True)]
        label = f"searched (round {kept[-1]})" if kept else "original"
        return label + (f"; round(s) {', '.join(rejected)} rejected" if rejected else "")

    # rows of pareto.json
    def rows(self) -> list[dict]:
        space = self.strategy_space
        rows = []
        for record in sorted(self.seen.values(), key=lambda r: r["id"]):
            ratios = space.ratios(record["genome"])
            row = {
                "id": record["id"],
                "strategy": record.get("strategy", self.settings.strategy),
                "generation": record.get("generation"),
                "projector_round": record.get("projector_round", 0),
                "policy": space.summary(record["genome"]),
                "search_acc": record["acc"],
                "heldout_acc": self.heldout_acc.get(record["id"]),
                "sparsity": record["sparsity"],
                "speedup": estimated_speedup(self.profile, ratios),
                "speedup_kind": ESTIMATED,
                "G": record["G"],
                "fitness": record["fitness"],
                "seconds": record.get("seconds"),
            }
            if self.accel is not None:  # measured where measured, else predicted by the latency table
                row.update(self.accel.speed_columns(space, record["genome"], self.profile))
            rows.append(row)
        return mark_front(rows)

    # 5. the final pruned model
    def finish(self) -> dict:
        s, model, space = self.settings, self.model, self.strategy_space
        accel = self.accel
        for record in self.final_candidates[: s.heldout_top]:
            self.bank.assemble(model, space.ratios(record["genome"]))
            if accel is not None:
                accel.apply(record["genome"], space)
            self.heldout_acc[record["id"]] = accuracy_by_category(model, self.heldout)["acc"]
        self.bank.restore(model)
        front_measured = 0
        if accel is not None:  # real copies of the predicted front, timed against the dense model
            front_measured = accel.measure_front(space, self.rows, self.samples)
        best = self.final_candidates[0]
        rerank = None
        if self.rerank > 1:  # the best plans pruned for real and scored again (weight sparsity only)
            best, rerank = self.rerank_final(self.final_candidates)
        budget_check = None
        if accel is not None:  # the plan to prune must meet the budget measured, not only predicted
            budget_check = accel.verify_budget(space, self.budget_pool(), self.samples, s.speed_repeats)
            if budget_check is not None:
                best = budget_check.pop("candidate")
        ratios = space.ratios(best["genome"])

        o = self.final_options
        start = time.perf_counter()

        def prune_weights():
            self.final_prune(ratios)

        dense_model = accel.finalize(space, best["genome"], prune_weights) if accel is not None else prune_weights()
        prune_seconds = time.perf_counter() - start
        pruned_search = accuracy_by_category(model, self.samples)
        pruned_heldout = accuracy_by_category(model, self.heldout)
        if accel is not None:  # the shrunk model against a dense copy, both real
            measured = scoring_speedup(dense_model, model, self.samples, repeats=s.speed_repeats)
            columns = accel.speed_columns(space, best["genome"], self.profile)
            estimated, predicted = columns["estimated_speedup"], columns["predicted_speedup"]
            parameters = {"dense": parameter_count(dense_model), "pruned": parameter_count(model)}
            del dense_model
        else:
            dense = {n: self.bank.weight(n, 0.0) for n in self.names}
            pruned = {n: get_linear(model, n).weight.detach().clone() for n in self.names}
            measured = measure_speedup(model, self.samples, dense, pruned, repeats=s.speed_repeats)
            estimated = estimated_speedup(self.profile, ratios)

        policy = space.policy(best["genome"], self.identity,
                              {"method": o["method"], "sequential": o["sequential"]},
                              strategy=s.strategy, candidate=best["id"], fitness=best["fitness"],
                              search_acc=best["acc"], G=best["G"], eta=s.eta,
                              projector_round=self.current_round)
        rows = self.rows()
        candidates_seconds = [r["seconds"] for r in self.seen.values() if r.get("seconds") is not None]
        per_candidate = sum(candidates_seconds) / max(len(candidates_seconds), 1)
        final_row = {"label": f"{o['method']} {'sequential' if o['sequential'] else 'one-shot'}",
                     "search_acc": pruned_search["acc"], "heldout_acc": pruned_heldout["acc"],
                     "speedup": estimated, "measured_speedup": measured["speedup"],
                     "sparsity": sparsity(model, self.names), "candidate": best["id"]}
        if accel is not None:  # the final point sits at its measured speed
            final_row.update({"speedup": measured["speedup"], "speedup_kind": "measured",
                              "predicted_speedup": predicted, "estimated_speedup": estimated})
        summary = {
            "strategy": s.strategy,
            "model": self.model_path,
            "run_dir": str(self.run_dir.resolve()),
            "target_sparsity": s.target,
            "n_search": len(self.samples),
            "search_split": s.search_split,
            "heldout_split": s.heldout_split,
            "n_heldout": len(self.heldout),
            "eta": s.eta,
            "dense": {"search_acc": self.dense_search["acc"], "heldout_acc": self.dense_heldout["acc"],
                      "heldout_per_category": self.dense_heldout["per_category"]},
            "pruned": {"search_acc": pruned_search["acc"], "heldout_acc": pruned_heldout["acc"],
                       "heldout_per_category": pruned_heldout["per_category"],
                       "sparsity": final_row["sparsity"], "policy_sparsity": policy.sparsity(),
                       "pruner": final_row["label"],
                       "projector": self.projector_label(),
                       "prune_seconds": prune_seconds},
            "final_rerank": rerank,
            "best_candidate": {"id": best["id"], "search_acc": best["acc"], "G": best["G"],
                               "fitness": best["fitness"], "sparsity": best["sparsity"],
                               "heldout_acc": self.heldout_acc.get(best["id"]),
                               "assembled_with": f"{self.bank_options['method']} bank (one-shot)"},
            "speedup": {"measured": measured["speedup"], "measured_how": measured["how"],
                        "measured_quartiles": measured.get("quartiles"),
                        "dense_seconds": measured["dense_seconds"], "pruned_seconds": measured["pruned_seconds"],
                        "estimated": estimated, "estimated_how": ESTIMATE_HOW, "host_heap": self.heap},
            "search_seconds": self.search_seconds,
            "bank_seconds": self.bank_seconds,
            "candidates_evaluated": len(self.seen),
            "candidates_evaluated_this_run": self.store.evaluated,
            "candidates_reused": self.store.reused,
            "seconds_per_candidate": per_candidate,
            "wall_seconds_per_candidate": self.search_seconds / max(self.store.evaluated, 1),
            "dense_forward_seconds": self.dense_seconds,
            "candidate_to_dense_forward": per_candidate / max(self.dense_seconds, 1e-12),
            "projector_rounds": self.rounds,
            "allocation": self.allocation,
        }
        if accel is not None:
            summary["speedup"].update({"predicted": predicted, "predicted_how": "latency table measured on this "
                                       "machine (latency_table.json), calibrated end to end",
                                       "estimated_how": "FLOPs (torch.utils.flop_counter) with the linear layers' "
                                       "kept share: shrinking, dropped tokens, unstructured ratio (ideal sparse "
                                       "engine)", "front_measured": front_measured, **budget_summary(accel),
                                       "budget_check": budget_check})
            summary["pruned"].update({"structure": policy.structure, "tokens": policy.tokens,
                                      "parameters": parameters})
        self.write_outputs(summary, rows, policy, final_row)
        summary["total_seconds"] = time.perf_counter() - self.t0
        write_json(self.run_dir / "summary.json", summary)
        self.tracker.generation(len(self.seen), rows, {**best, "search_acc": best["acc"]})
        self.tracker.finish(summary, step=len(self.seen))
        return summary

    def budget_pool(self) -> list[dict]:
        """The plans the budget check may try, best first: the final ranking, then every other candidate scored
        with the current projector, by fitness (an evolution's last generation often holds one or two speed
        plans)."""
        first = list(self.final_candidates)
        ids = {r["id"] for r in first}
        rest = [r for r in self.seen.values()
                if r["id"] not in ids and r.get("projector_round", 0) == self.current_round]
        return first + sorted(rest, key=lambda r: (-r["fitness"], r["id"]))

    def final_prune(self, ratios: dict) -> None:
        """The final pruner (`final` config) on the model in place, calibrated on the N search samples."""
        o = self.final_options
        prune_model(self.model, ratios, o["method"], self.calib_batches, sequential=o["sequential"],
                    blocksize=o["blocksize"], damp=o["damp"], offload=o["offload"])

    def rerank_final(self, candidates: list[dict]) -> tuple[dict, dict]:
        """The bank's weights rank the candidates; the final pruner (SparseGPT's weight updates, sequential
        calibration) changes them. The best `final_rerank` distinct plans (fitness order) are each pruned by the final
        pruner and scored again on the N search samples with the search's own fitness (task score - eta * G, G of the
        pruned weights); the best of them is the one pruned for the result. The held-out split is not looked at for
        the choice: the first `heldout_top` tries are evaluated on it afterwards, for the record."""
        s, model, space = self.settings, self.model, self.strategy_space
        tried = []
        for record in distinct_best(candidates, space.key, self.rerank):
            self.bank.restore(model)
            start = time.perf_counter()
            self.final_prune(space.ratios(record["genome"]))
            acc, score = self.evaluator.score(self.samples)
            g = generalization_of(model, self.bank, self.names)
            entry = {"id": record["id"], "bank_fitness": record["fitness"], "bank_search_acc": record["acc"],
                     "fitness": fitness(score / 100.0, g, s.eta), "search_acc": acc, "score": score, "G": g,
                     "seconds": time.perf_counter() - start, "record": record}
            if len(tried) < s.heldout_top:
                entry["heldout_acc"] = accuracy_by_category(model, self.heldout)["acc"]
            tried.append(entry)
            log.info("final rerank: candidate %d (bank fitness %.4f) pruned by %s: fitness %.4f, %.2f%% on the search "
                     "samples%s", record["id"], record["fitness"], self.final_options["method"], entry["fitness"], acc,
                     f", {entry['heldout_acc']:.2f}% held-out (not used)" if "heldout_acc" in entry else "")
        self.bank.restore(model)
        chosen = max(tried, key=lambda e: e["fitness"])  # ties: the earlier (better by the bank)
        best = chosen["record"]
        return best, {"tried": [{k: v for k, v in e.items() if k != "record"} for e in tried],
                      "chosen": best["id"], "changed": best["id"] != candidates[0]["id"]}

    def write_outputs(self, summary: dict, rows: list[dict], policy: Policy, final_row: dict) -> None:
        d = self.run_dir
        outputs = {"pareto_json": str(d / "pareto.json"), "pareto_png": str(d / "pareto.png"),
                   "best_policy": str(d / "best_policy.json"), "summary": str(d / "summary.json")}
        if self.cfg.get("save_pruned_model", True):
            with atomic_directory(d / "pruned_model") as tmp:
                self.model.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
                policy.save(tmp / "policy.json")
            outputs["pruned_model"] = str(d / "pruned_model")
        summary["outputs"] = outputs
        policy.save(d / "best_policy.json")
        dense_point = {"search_acc": summary["dense"]["search_acc"], "speedup": 1.0}
        speed_axis = f"{ESTIMATED}: {ESTIMATE_HOW}"
        if self.accel is not None:
            speed_axis = ("measured (end to end on this machine, dense vs a real copy of the candidate) where "
                          "speedup_kind is 'measured', else predicted by the latency table measured on this machine "
                          "('latency_table'); estimated_speedup: FLOPs of the linear layers kept (ideal sparse "
                          "engine for the unstructured part)")
        scored_by = "VQA accuracy" if self.samples.references is not None else f"{self.samples.scoring} scoring"
        write_json(d / "pareto.json", {
            "strategy": self.settings.strategy,
            "axes": {"accuracy": f"search_acc (% on the N search samples, {scored_by}, bank-assembled candidate)",
                     "speedup": speed_axis},
            "dense": {**dense_point, "heldout_acc": summary["dense"]["heldout_acc"]},
            "final": final_row,
            "candidates": rows,
        })
        xlabel = ("speedup (measured on this machine; latency-table prediction where not measured)"
                  if self.accel is not None else "speedup (estimated, ideal sparse engine)")
        plot_front(d / "pareto.png", {self.settings.strategy: rows},
                   title=f"{self.settings.strategy}: target sparsity {self.settings.target}, N={len(self.samples)}",
                   dense=dense_point, finals={self.settings.strategy: final_row}, xlabel=xlabel)


def _read_json(path: Path):
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def run_search(cfg, run_dir) -> dict:
    run = SearchRun(cfg, run_dir)
    run.prepare()
    run.reference()
    run.run_strategy()
    return run.finish()


def report(summary: dict) -> str:
    d, p, sp = summary["dense"], summary["pruned"], summary["speedup"]
    return "\n".join([
        f"{summary['strategy']} search on {summary['model']} (target sparsity {summary['target_sparsity']}, "
        f"N={summary['n_search']}): {summary['candidates_evaluated']} candidates in {summary['search_seconds']:.1f}s "
        f"({summary['seconds_per_candidate']:.3f}s each = {summary['candidate_to_dense_forward']:.2f}x one dense "
        "forward)",
        f"  held-out accuracy ({summary['heldout_split']}, {summary['n_heldout']} records): dense "
        f"{d['heldout_acc']:.2f}% -> pruned {p['heldout_acc']:.2f}%  (search samples: {d['search_acc']:.2f}% -> "
        f"{p['search_acc']:.2f}%)",
        f"  sparsity {p['sparsity']:.4f} ({p['pruner']}, projector {p['projector']})",
        *([f"  structure: {len(p['structure'])} block(s) shrunk, parameters {p['parameters']['dense']:,} -> "
           f"{p['parameters']['pruned']:,}; visual tokens: "
           + (f"keep {p['tokens']['keep']} after layer {p['tokens']['layer']}" if p["tokens"] else "all kept")]
          if "structure" in p else []),
        *([_budget_line(sp["budget_check"])] if sp.get("budget_check") else []),
        *([_rerank_line(summary["final_rerank"])] if summary.get("final_rerank") else []),
        f"  speedup: measured {sp['measured']:.2f}x ({sp['measured_how']}); "
        + (f"predicted {sp['predicted']:.2f}x (latency table); " if "predicted" in sp else "")
        + f"estimated {sp['estimated']:.2f}x (FLOPs, ideal sparse engine)",
        f"  outputs: {summary['run_dir']}",
    ])


def _budget_line(check: dict) -> str:
    tried = ", ".join("/".join(f"{m:.2f}x" for m in c.get("measurements", [c["measured_speedup"]]))
                      for c in check["checked"])
    last = check["checked"][-1]
    verdict = (f"candidate {last['id']} met it" if check["met"]
               else "none met it; the best by fitness was kept")
    return f"  budget check: {len(check['checked'])} plan(s) measured in fitness order ({tried}); {verdict}"


def _rerank_line(rerank: dict) -> str:
    tried = rerank["tried"]
    position = [t["id"] for t in tried].index(rerank["chosen"]) + 1
    verdict = ("the search's best kept" if not rerank["changed"]
               else f"candidate {rerank['chosen']} (the search's #{position}) chosen")
    return (f"  final rerank: {len(tried)} plan(s) pruned by the final pruner and scored on the search samples "
            f"(fitness {min(t['fitness'] for t in tried):.4f}-{max(t['fitness'] for t in tried):.4f}); {verdict}")
