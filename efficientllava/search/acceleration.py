"""Real speed in a search: structured shrinking and visual-token pruning as policy dimensions (search/space.py), a
latency budget from a table measured on this device (latency.py), speed columns for every candidate, end-to-end
measurements of the front, and the final shrink. search/loop.py uses it when `search.structure.enabled` or
`search.tokens.enabled` is true (the default `search=evolution`).

Per candidate nothing is reshaped, so hundreds stay cheap: the weights come from the bank, the structure from a
`StructureMasker` (FLAP / Wanda importance on the N search samples, one-shot, computed once), the visual tokens from
one `VisualTokenPruner` whose (K, R) is switched; the accuracy is the usual scoring forward. Speed columns of every
candidate in pareto.json:
- `predicted_speedup` (kind `latency_table`): dense / the table's prediction for the candidate's widths and tokens;
- `estimated_speedup` (kind `estimated`): FLOPs with the linear layers' kept share (shrinking, dropped tokens, and the
  unstructured ratio under an ideal sparse engine);
- `measured_speedup` (kind `measured`): for the candidates on the predicted front (at most
  `search.latency.measure_front`), a copy of the model holding exactly that candidate is shrunk for real and timed
  against the dense model, interleaved, in this process.
`speedup` is the measured one where measured, else the predicted one, and the front is marked on it.

Generalization term with structure: a layer's term is log(||kept part of W_l||_F / ||W_l||_F), the kept part being
the rows / columns of the units the structure keeps, W_l the bank's weight at the layer's unstructured choice; so G
falls with structured pruning as with unstructured pruning (docs/method.md).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from efficientllava.latency import LatencyTable, LatencyTableError, Workload, attention_implementation
from efficientllava.latency import measure_latency_table
from efficientllava.policy import BudgetError, SearchSpace
from efficientllava.pruning.bank import DENSE, choice_key
from efficientllava.pruning.structured import (IMPORTANCE, StructureError, StructureMasker, compute_importance,
                                               decoder_geometry, shrink_model)
from efficientllava.search.evolution import distinct_best
from efficientllava.search.fitness import fitness
from efficientllava.search.settings import SettingsError
from efficientllava.search.space import JointSpace, StructureChoices, TokenChoices
from efficientllava.speed import MEASURED, describe_device, estimated_speedup, model_device, scoring_speedup
from efficientllava.token_pruning import TokenPruningError, VisualTokenPruner

log = logging.getLogger("search")

LATENCY_TABLE = "latency_table.json"
CALIBRATION_ROUNDS = 21  # interleaved dense / most-pruned rounds that calibrate the latency table end to end
PREDICTED = "latency_table"


# ---- settings ---------------------------------------------------------------------------------------------------
@dataclass
class AccelerationSettings:
    structure: bool = False
    mlp_choices: tuple = (0.0,)
    attn_choices: tuple = (0.0,)
    importance: str = "flap"
    compensate: bool = True
    channel_multiple: int = 1
    tokens: bool = False
    token_layers: tuple = ()
    token_keeps: tuple = (1.0,)
    min_speedup: float | None = None
    max_prefill_ms: float | None = None
    margin: float = 0.0
    table: str | None = None
    repeats: int = 5
    measure_front: int = 6
    verify: int = 8
    confirm: int = 1

    @property
    def enabled(self) -> bool:
        return self.structure or self.tokens

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("measure_front")
        d.pop("verify")
        d.pop("confirm")
        d.pop("table")
        if not d["margin"]:  # runs from before the margin existed resume
            d.pop("margin")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _number_list(node, key: str, kind=float) -> tuple:
    values = node.get(key)
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise SettingsError(f"{key} is {values!r}; expected a list")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise SettingsError(f"{key} holds {v!r}; expected {'integers' if kind is int else 'numbers'}")
        out.append(kind(v))
    return tuple(out)


def read_acceleration(search_cfg) -> AccelerationSettings:
    """The structure / tokens / latency settings of `cfg.search`; SettingsError names the key."""
    st, tk, lat = (search_cfg.get(k) or {} for k in ("structure", "tokens", "latency"))
    s = AccelerationSettings(structure=bool(st.get("enabled", False)), tokens=bool(tk.get("enabled", False)))
    if s.structure:
        s.mlp_choices = _number_list(st, "mlp_choices")
        s.attn_choices = _number_list(st, "attn_choices")
        eta = search_cfg.get("eta", 0.0)
        if 1.0 in s.mlp_choices and isinstance(eta, (int, float)) and eta > 0:
            raise SettingsError(
                f"search.structure.mlp_choices holds 1.0 (a block's whole MLP removed) with search.eta={eta}: the "
                "generalization term sums log(||W_pruned|| / ||W_dense||), which is -inf for a removed MLP and would "
                "rank such candidates first whatever they score; expected search.eta=0 or MLP ratios below 1.0")
        s.importance = st.get("importance", "flap")
        if s.importance not in IMPORTANCE:
            raise SettingsError(f"search.structure.importance is {s.importance!r}; expected one of {list(IMPORTANCE)}")
        s.compensate = bool(st.get("compensate", True))
        s.channel_multiple = st.get("channel_multiple", 1)
        if isinstance(s.channel_multiple, bool) or not isinstance(s.channel_multiple, int) or s.channel_multiple < 1:
            raise SettingsError(f"search.structure.channel_multiple is {s.channel_multiple!r}; expected a positive "
                                "integer")
    if s.tokens:
        s.token_layers = _number_list(tk, "layers", int)
        s.token_keeps = _number_list(tk, "keep")
    for key in ("min_speedup", "max_prefill_ms"):
        value = lat.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise SettingsError(f"search.latency.{key} is {value!r}; expected a positive number or null")
        setattr(s, key, None if value is None else float(value))
    margin = lat.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise SettingsError(f"search.latency.margin is {margin!r}; expected a number in [0, 1): the share by which "
                            "the search's predictions must beat the budget (e.g. 0.03)")
    s.margin = float(margin)
    if s.min_speedup is not None and s.min_speedup < 1:
        raise SettingsError(f"search.latency.min_speedup is {s.min_speedup}; expected a speedup >= 1 (or null)")
    s.table = lat.get("table")
    for key in ("repeats", "measure_front", "verify", "confirm"):
        value = lat.get(key, getattr(s, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "repeats" else 0):
            raise SettingsError(f"search.latency.{key} is {value!r}; expected an integer >= "
                                f"{1 if key == 'repeats' else 0}")
        setattr(s, key, value)
    if s.enabled and search_cfg.get("shared", False) and not s.table:
        raise SettingsError("search.shared is true but search.latency.table is null; expected a latency table "
                            "measured once (every worker must repair candidates with the same table): run once, "
                            "then pass search.latency.table=<run dir>/latency_table.json")
    if (s.min_speedup or s.max_prefill_ms) and not s.enabled:
        raise SettingsError("search.latency sets a latency budget, but search.structure.enabled and "
                            "search.tokens.enabled are both false; expected at least one (unstructured sparsity buys "
                            "no measured speed)")
    return s


# ---- the policy that carries its genome (for the projector rounds) ----------------------------------------------
class GenomeRatios(dict):
    """Per-layer ratios that remember the joint genome (and its space) they came from."""

    def __init__(self, ratios: dict, genome, space):
        super().__init__(ratios)
        self.genome, self.space = list(genome), space


class AcceleratedBank:
    """A PruningBank whose `assemble` also applies the candidate's structure and visual tokens (projector rounds
    assemble policies through it) and whose `restore` also clears them."""

    def __init__(self, bank, acceleration: "Acceleration"):
        self.bank, self.acceleration = bank, acceleration

    def assemble(self, model, policy) -> None:
        self.bank.assemble(model, policy)
        self.acceleration.apply(policy.genome, policy.space)

    def restore(self, model) -> None:
        self.bank.restore(model)
        self.acceleration.clear()

    def __getattr__(self, name):
        return getattr(self.bank, name)


# ---- the search's speed dimensions ------------------------------------------------------------------------------
class Acceleration:
    def __init__(self, settings: AccelerationSettings, model, weights: SearchSpace):
        self.settings, self.model = settings, model
        self.geometry = decoder_geometry(model)
        try:
            structure = (StructureChoices(self.geometry, list(settings.mlp_choices), list(settings.attn_choices),
                                          settings.channel_multiple) if settings.structure else None)
        except StructureError as err:
            raise SettingsError(f"search.structure: {err}") from None
        try:
            tokens = (TokenChoices(len(self.geometry), list(settings.token_layers), list(settings.token_keeps))
                      if settings.tokens else None)
        except TokenPruningError as err:
            raise SettingsError(f"search.tokens: {err}") from None
        self.dense_widths = [(g.kv_heads, g.intermediate) for g in self.geometry.values()]
        self.space = JointSpace(weights, structure, tokens, dense_widths=self.dense_widths)
        self.spaces = [self.space]
        self.scores = None
        self.masker: StructureMasker | None = None
        self.pruner: VisualTokenPruner | None = None
        self.table: LatencyTable | None = None
        self.max_seconds: float | None = None
        self.measured: dict[str, dict] = {}
        self.unit_norms: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def setup(cls, search_cfg, model, weights: SearchSpace) -> "Acceleration | None":
        settings = read_acceleration(search_cfg)
        return cls(settings, model, weights) if settings.enabled else None

    def strategy_space(self, weights: SearchSpace) -> JointSpace:
        """The joint space over another weight space (OWL / ECoFLaP allocate per block)."""
        if weights is self.space.unstructured:
            return self.space
        space = self.space.with_unstructured(weights)
        self.spaces.append(space)
        return space

    # ---- reference: importance, latency table, budget -----------------------------------------------------------
    def reference(self, samples, calib_batches, model_hash: str, run_dir: Path) -> None:
        """Importance (structure), then the latency table: `search.latency.table`, or the run directory's own
        (a resumed run must repair genomes exactly as before), each checked against this device, model and
        workload; else measured here and calibrated end to end (dense vs the most pruned plan of the space). Then
        the latency budget is checked."""
        s, model = self.settings, self.model
        if self.space.structure is not None:
            self.scores = compute_importance(model, calib_batches, s.importance)
        image_token = int(getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", -1)))
        self.workload = Workload.of_batches(samples.batches, image_token)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        table_path = s.table or (Path(run_dir) / LATENCY_TABLE if (Path(run_dir) / LATENCY_TABLE).is_file() else None)
        if table_path:
            self.table = LatencyTable.load(table_path)
            self.table.check(describe_device(model_device(model)), model_hash, dtype, attention_implementation(model),
                             self.workload, source=f"latency table '{table_path}'")
            log.info("latency table loaded from %s", table_path)
        else:
            self.table = self.measure_table(samples, model_hash)
        self.table.save(Path(run_dir) / LATENCY_TABLE)
        limits = []
        if s.min_speedup is not None:  # the search aims `margin` past the budget; the result must meet it measured
            limits.append(self.table.dense / (s.min_speedup * (1 + s.margin)))
        if s.max_prefill_ms is not None:
            limits.append(s.max_prefill_ms / 1000.0 / (1 + s.margin))
        self.max_seconds = min(limits) if limits else None
        for space in self.spaces:
            try:
                space.set_latency(self.table, self.max_seconds)
            except BudgetError as err:
                if not s.margin:
                    raise
                raise BudgetError(f"{err}; that aim includes search.latency.margin={s.margin:g} (the search aims "
                                  f"{100 * s.margin:g}% past the budget): a smaller margin may fit") from None

    def measure_table(self, samples, model_hash: str) -> LatencyTable:
        s, space = self.settings, self.space
        groups = space.structure.groups if space.structure else {}
        channels = space.structure.channels if space.structure else {}
        keeps = space.tokens.keeps if space.tokens else []
        table = measure_latency_table(self.model, self.workload, groups, channels, keeps, 0.0, model_hash, s.repeats)
        fastest = space._most_pruned()
        anchor = self.build(fastest, weights=False)
        # medians, as the budget check and the final model are measured: the fastest of a few runs let one lucky
        # dense run move every prediction of the table (the toy's most pruned structure-only plan: 2.23x, then 1.78x)
        timing = scoring_speedup(self.model, anchor, samples, repeats=CALIBRATION_ROUNDS, statistic="median")
        tokens = space.token_setting(fastest)
        table.calibrate(timing["dense_seconds"], self.dense_widths, timing["pruned_seconds"],
                        space.widths(fastest, self.dense_widths), tokens and tokens["layer"], tokens and tokens["keep"])
        log.info("latency table on %s: dense %.1f ms, most pruned plan %.1f ms (%.2fx, median of %d interleaved "
                 "runs each), block scale %.2f",
                 table.device, 1000 * table.dense, 1000 * timing["pruned_seconds"], timing["speedup"],
                 CALIBRATION_ROUNDS, table.scale)
        del anchor
        return table

    # ---- per candidate ------------------------------------------------------------------------------------------
    def attach(self, bank, table: dict) -> None:
        """After the bank is built: the unit norms of the generalization term, then the masker and token pruner
        hooks that candidates switch."""
        self.bank, self.log_norms = bank, table
        if self.space.structure is not None:
            self._unit_norms(bank)
            self.masker = StructureMasker(self.model, self.scores, self.settings.compensate)
        if self.space.tokens is not None:
            self.pruner = VisualTokenPruner(self.model, self.space.tokens.layers[0], 1.0).attach()

    def apply(self, genome, space: JointSpace | None = None) -> None:
        space = space or self.space
        if self.masker is not None:
            self.masker.set(space.counts(genome))
        if self.pruner is not None:
            tokens = space.token_setting(genome)
            self.pruner.set(tokens["layer"], tokens["keep"]) if tokens else self.pruner.set(self.pruner.layer, 1.0)

    def clear(self) -> None:
        if self.masker is not None:
            self.masker.clear()
        if self.pruner is not None:
            self.pruner.set(self.pruner.layer, 1.0)

    def release(self) -> None:
        """Remove every hook from the model (before copies are made and timed)."""
        if self.masker is not None:
            self.masker.remove()
            self.masker = None
        if self.pruner is not None:
            self.pruner.detach()
            self.pruner = None

    def policy_ratios(self, space: JointSpace, genome) -> GenomeRatios:
        return GenomeRatios(space.ratios(genome), genome, space)

    def bank_view(self, bank) -> AcceleratedBank:
        return AcceleratedBank(bank, self)

    # ---- generalization term with structure ---------------------------------------------------------------------
    def _owners(self) -> dict[str, tuple[str, str, str, int]]:
        """{layer name: (block path, component, axis, unit size)} of every linear the structure can shrink."""
        owners = {}
        for path, g in self.geometry.items():
            qo = g.group * g.head_dim
            for leaf, component, axis, size in (("self_attn.q_proj", "attn", "rows", qo),
                                                ("self_attn.k_proj", "attn", "rows", g.head_dim),
                                                ("self_attn.v_proj", "attn", "rows", g.head_dim),
                                                ("self_attn.o_proj", "attn", "cols", qo),
                                                ("mlp.gate_proj", "mlp", "rows", 1), ("mlp.up_proj", "mlp", "rows", 1),
                                                ("mlp.down_proj", "mlp", "cols", 1)):
                owners[f"{path}.{leaf}"] = (path, component, axis, size)
        return owners

    def _unit_norms(self, bank) -> None:
        self.owners = self._owners()
        for name, (_, _, axis, size) in self.owners.items():
            keys = [DENSE, *bank.choices] if name in bank.shapes else [DENSE]
            per = {}
            for key in keys:
                if name in bank.shapes:
                    w = bank.weight(name, 0.0 if key == DENSE else key).float()
                else:
                    w = self.model.get_submodule(name).weight.detach().float()
                sq = w.pow(2).sum(1) if axis == "rows" else w.pow(2).sum(0)
                per[key] = sq.reshape(-1, size).sum(1).cpu()
            self.unit_norms[name] = per

    def generalization(self, space: JointSpace, genome) -> float:
        ratios, counts = space.ratios(genome), space.counts(genome)
        total = 0.0
        for name in set(ratios) | set(self.unit_norms):
            key = choice_key(ratios[name]) if name in ratios else DENSE
            if name not in self.unit_norms:
                total += self.log_norms[name][key]
                continue
            path, component, _, _ = self.owners[name]
            norms = self.unit_norms[name][key if key in self.unit_norms[name] else DENSE]
            kept = self.scores[path].kept(component, counts[path][component])
            dense = float(self.unit_norms[name][DENSE].sum())
            total += 0.5 * math.log(max(float(norms[kept].sum()), 1e-30) / max(dense, 1e-30))
        return total

    def score(self, space: JointSpace, genome, result: dict, eta: float) -> dict:
        """The candidate's G and fitness with its structure, and its predicted speedup."""
        out = {}
        if self.masker is not None:
            out["G"] = self.generalization(space, genome)
            out["fitness"] = fitness(result["score"] / 100.0, out["G"], eta)
        out["predicted_speedup"] = space.predicted_speedup(genome)
        return out

    # ---- speed columns ------------------------------------------------------------------------------------------
    def kept_fractions(self, space: JointSpace, genome, names) -> dict[str, float]:
        """{linear layer: share of its dense FLOPs still computed} from the structure and dropped tokens."""
        counts = space.counts(genome) if space.structure else {}
        tokens = space.token_setting(genome)
        rows = sum(r * t for r, t in self.workload.shapes)
        pruned_rows = sum(r * self.workload.tokens_after(t, tokens["keep"] if tokens else None)
                          for r, t in self.workload.shapes)
        owners = self._owners()
        out = {}
        for name in names:
            if name not in owners:
                continue
            path, component, _, _ = owners[name]
            g = self.geometry[path]
            width = 1.0
            if path in counts:
                width = (counts[path]["attn"] / g.kv_heads if component == "attn"
                         else counts[path]["mlp"] / g.intermediate)
            token = pruned_rows / rows if tokens and g.index >= tokens["layer"] else 1.0
            out[name] = width * token
        return out

    def speed_columns(self, space: JointSpace, genome, profile: dict) -> dict:
        ratios = space.ratios(genome)
        predicted = space.predicted_speedup(genome)
        measured = self.measured.get(space.key(genome))
        return {
            "speedup": measured["speedup"] if measured else predicted,
            "speedup_kind": MEASURED if measured else PREDICTED,
            "predicted_speedup": predicted,
            "measured_speedup": measured["speedup"] if measured else None,
            "estimated_speedup": estimated_speedup(profile, ratios, self.kept_fractions(space, genome,
                                                                                        profile["layers"])),
        }

    # ---- real copies --------------------------------------------------------------------------------------------
    def build(self, genome, space: JointSpace | None = None, weights: bool = True):
        """A copy of the model holding exactly the candidate: bank weights (when `weights`), shrunk for real,
        visual tokens pruned. The model must hold no hooks (call `release()` first once candidates are done)."""
        space = space or self.space
        if weights:
            self.bank.assemble(self.model, space.ratios(genome))
        try:
            twin = copy.deepcopy(self.model)
        finally:
            if weights:
                self.bank.restore(self.model)
        structure = space.structure_ratios(genome) if space.structure else {}
        if structure:
            shrink_model(twin, structure, scores=self.scores, compensate=self.settings.compensate,
                         channel_multiple=self.settings.channel_multiple)
        tokens = space.token_setting(genome)
        if tokens:
            VisualTokenPruner(twin, tokens["layer"], tokens["keep"]).attach()
        return twin

    def measure_front(self, space: JointSpace, rows, samples) -> int:
        """Measure end to end the candidates on the front, fastest first, until every front point is measured or
        `measure_front` candidates are (a measured point can fall back and lift an unmeasured one onto the front,
        so the front is re-marked after each measurement). `rows()` gives the rows of pareto.json. Returns how many
        were measured."""
        self.release()
        done = 0
        while done < self.settings.measure_front:
            todo = sorted((r for r in rows() if r.get("on_front") and r["speedup_kind"] != MEASURED),
                          key=lambda r: (-r["predicted_speedup"], r["id"]))
            if not todo:
                break
            genome = todo[0]["policy"]["genome"]
            twin = self.build(genome, space)
            self.measured[space.key(genome)] = scoring_speedup(self.model, twin, samples,
                                                               repeats=self.settings.repeats)
            del twin
            done += 1
        return done

    def meets_budget(self, measured: dict) -> bool:
        """Whether an end-to-end measurement meets the run's latency budget (min_speedup, max_prefill_ms)."""
        s = self.settings
        return ((s.min_speedup is None or measured["speedup"] >= s.min_speedup)
                and (s.max_prefill_ms is None or 1000 * measured["pruned_seconds"] <= s.max_prefill_ms))

    def verify_budget(self, space: JointSpace, candidates: list[dict], samples, repeats: int) -> dict | None:
        """The budget holds for predictions; the result must hold it measured. Real copies of the best candidates
        are timed against the dense model end to end, in fitness order, one per speed plan (structure and visual
        tokens: candidates that differ only in unstructured sparsity run the same kernels), at most `verify` plans.
        A plan that meets the budget is timed `confirm` more times, and the first whose every measurement meets it
        is the one to prune (one lucky measurement passes no plan: among plans near the budget, the first to pass
        once is the one whose measurement came out high). If none does, the best stays and `met` is False. A
        plan's `measured_speedup` is its lowest measurement. None when there is no budget or `verify` is 0."""
        s = self.settings
        if s.verify == 0 or (s.min_speedup is None and s.max_prefill_ms is None) or not candidates:
            return None
        self.release()
        checked, chosen = [], None
        for record in distinct_best(candidates, space.speed_key, s.verify):
            twin = self.build(record["genome"], space)
            runs = [scoring_speedup(self.model, twin, samples, repeats=repeats)]
            while self.meets_budget(runs[-1]) and len(runs) <= s.confirm:
                runs.append(scoring_speedup(self.model, twin, samples, repeats=repeats))
            del twin
            ok = all(self.meets_budget(m) for m in runs)
            measured = min(runs, key=lambda m: m["speedup"])
            self.measured[space.key(record["genome"])] = measured
            checked.append({"id": record["id"], "fitness": record["fitness"],
                            "predicted_speedup": space.predicted_speedup(record["genome"]),
                            "measured_speedup": measured["speedup"], "measured_quartiles": measured["quartiles"],
                            "measurements": [m["speedup"] for m in runs],
                            "pruned_ms": 1000 * measured["pruned_seconds"], "meets_budget": ok})
            log.info("budget check: candidate %d (fitness %.4f) predicted %.2fx, measured %s (lowest: quartiles "
                     "%.2f-%.2f): %s", record["id"], record["fitness"], checked[-1]["predicted_speedup"],
                     " then ".join(f"{m['speedup']:.2f}x" for m in runs), *measured["quartiles"],
                     "meets the budget" if ok else "below the budget")
            if ok:
                chosen = record
                break
        if chosen is None:
            log.warning("budget check: none of the %d best plans met the latency budget measured; keeping the best "
                        "by fitness (candidate %d)", len(checked), candidates[0]["id"])
        return {"met": chosen is not None, "candidate": chosen if chosen is not None else candidates[0],
                "checked": checked, "repeats": repeats, "confirm": s.confirm}

    def finalize(self, space: JointSpace, genome, prune_weights) -> torch.nn.Module:
        """Shrink the model for real to the candidate's structure, run `prune_weights()` (the final unstructured
        prune, on the shrunk layers), then attach its visual-token pruning. Returns a dense copy to time against."""
        self.release()
        dense = copy.deepcopy(self.model)
        structure = space.structure_ratios(genome) if space.structure else {}
        if structure:
            shrink_model(self.model, structure, scores=self.scores, compensate=self.settings.compensate,
                         channel_multiple=self.settings.channel_multiple)
        prune_weights()
        tokens = space.token_setting(genome)
        if tokens:
            VisualTokenPruner(self.model, tokens["layer"], tokens["keep"]).attach()
        return dense


def budget_summary(acceleration: Acceleration) -> dict:
    s, t = acceleration.settings, acceleration.table
    return {"min_speedup": s.min_speedup, "max_prefill_ms": s.max_prefill_ms, "margin": s.margin,
            "max_predicted_seconds": acceleration.max_seconds,
            "latency_table": {"device": t.device, "dense_seconds": t.dense, "rest_seconds": t.rest, "scale": t.scale,
                              "anchor": t.anchor, "entries": sum(len(v) for v in t.attn.values())
                              + sum(len(v) for v in t.mlp.values())}}


__all__ = ["Acceleration", "AccelerationSettings", "LatencyTableError", "budget_summary", "read_acceleration"]
