"""Bookkeeping of evaluated candidates: one Optuna trial per candidate, in a study stored in SQLite (or any URL).

Optuna samples nothing here; the search runs its own loop and uses the study as a durable, shareable record:
params = the genome ({group name: choice index}), value = fitness, user_attrs = acc, G, sparsity, fitness,
generation, slot, projector round and the candidate's key. A candidate is identified by its key (strategy, projector
round, genome); a rerun in the same run directory finds the completed trials and reuses them instead of evaluating
again. A killed run leaves at most its in-flight trial RUNNING; a single-worker rerun marks such trials FAIL.

Several workers may share one study (`shared=True`, e.g. a storage URL on a shared disk or a database server): a
worker claims a candidate by writing a RUNNING trial, others skip it; a claim older than `claim_timeout_s` is
considered dead and taken over. Duplicated work from a race is harmless: the first completed trial of a key wins.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

RESULT_FIELDS = ("acc", "G", "sparsity", "fitness", "seconds")


def sqlite_url(run_dir: str | Path, name: str = "search.db") -> str:
    return f"sqlite:///{Path(run_dir).resolve() / name}"


class StudyMismatchError(ValueError):
    """A stored study made with other settings than the ones asked for now."""


class TrialStore:
    def __init__(self, url: str, study_name: str, group_names: list[str], n_choices, fingerprint: dict,
                 shared: bool = False, claim_timeout_s: float = 600.0, poll_s: float = 1.0):
        import optuna
        from optuna.distributions import IntDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.shared = url, shared
        self.claim_timeout_s, self.poll_s = float(claim_timeout_s), float(poll_s)
        self.group_names = list(group_names)
        sizes = list(n_choices) if isinstance(n_choices, (list, tuple)) else [int(n_choices)] * len(self.group_names)
        if len(sizes) != len(self.group_names):
            raise ValueError(f"{len(sizes)} choice counts for {len(self.group_names)} genes; expected one per gene")
        self.distributions = {g: IntDistribution(0, n - 1) for g, n in zip(self.group_names, sizes)}
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.storage = optuna.storages.RDBStorage(url)
        self.study = optuna.create_study(storage=self.storage, study_name=study_name, direction="maximize",
                                         load_if_exists=True)
        self.study_id = self.study._study_id
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._check_fingerprint(fingerprint)
        if not shared:
            self._fail_orphans()
        self.done: dict[str, dict] = {}
        self.reused = 0
        self.evaluated = 0
        self.refresh()

    # ---- study-level checks ---------------------------------------------------------------------------------------
    def _check_fingerprint(self, fingerprint: dict) -> None:
        """The settings that decide candidates and their scores must match those of a study being resumed."""
        fingerprint = json.loads(json.dumps(fingerprint))
        stored = self.study.user_attrs.get("fingerprint")
        if stored is None:
            self.study.set_user_attr("fingerprint", fingerprint)
            return
        for key in sorted(set(stored) | set(fingerprint)):
            if stored.get(key) != fingerprint.get(key):
                raise StudyMismatchError(
                    f"the study '{self.study.study_name}' in {self.url} was made with {key}={stored.get(key)!r}; "
                    f"this run asks for {key}={fingerprint.get(key)!r}; expected the same settings to resume "
                    "(or a new run directory: hydra.run.dir=...)"
                )

    def _fail_orphans(self) -> None:
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            log.info("trial %d was left running by an interrupted run; marked failed", trial.number)

    # ---- reading --------------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            key = trial.user_attrs.get("key")
            if key is not None and key not in self.done:
                self.done[key] = self._record(trial)

    @staticmethod
    def _record(trial) -> dict:
        record = dict(trial.user_attrs)
        record["id"] = trial.number
        record["genome"] = [int(v) for v in trial.user_attrs["genome"]]
        return record

    def get(self, key: str) -> dict | None:
        return self.done.get(key)

    def records(self) -> list[dict]:
        """Every completed candidate, in trial order."""
        return sorted(self.done.values(), key=lambda r: r["id"])

    def live_claims(self) -> dict[str, float]:
        """{key: claimed_at} of RUNNING trials whose claim is not yet stale."""
        from optuna.trial import TrialState

        now = time.time()
        claims = {}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            at = float(trial.user_attrs.get("claimed_at", 0))
            if now - at < self.claim_timeout_s:
                claims[trial.user_attrs.get("key")] = at
        return claims

    # ---- writing --------------------------------------------------------------------------------------------------
    def _template(self, state, key, genome, attrs, result=None):
        from optuna.trial import create_trial

        user_attrs = {"key": key, "genome": [int(g) for g in genome], "worker": self.worker, **attrs}
        if result is not None:
            user_attrs.update(result)
        else:
            user_attrs["claimed_at"] = time.time()
        params = {g: int(i) for g, i in zip(self.group_names, genome)}
        return create_trial(state=state, value=None if result is None else float(result["fitness"]),
                            params=params, distributions=self.distributions, user_attrs=user_attrs)

    def _add_complete(self, key, genome, attrs, result) -> dict:
        from optuna.trial import TrialState

        trial_id = self.storage.create_new_trial(self.study_id, self._template(TrialState.COMPLETE, key, genome,
                                                                                attrs, result))
        return self._after_complete(trial_id, key)

    def _after_complete(self, trial_id, key) -> dict:
        trial = self.storage.get_trial(trial_id)
        record = self._record(trial)
        self.done.setdefault(key, record)
        self.evaluated += 1
        return self.done[key]

    def evaluate_all(self, items: list[tuple[str, list[int], dict]], evaluate) -> list[dict]:
        """Records for (key, genome, attrs) items, evaluating (evaluate(genome) -> result dict) only new keys.

        Single worker: each new candidate is written as one COMPLETE trial once evaluated. Shared: claimed first
        (RUNNING), completed after, and this call waits for candidates that other workers hold.
        """
        out: dict[str, dict] = {}
        pending = list(items)
        while pending:
            if self.shared:
                self.refresh()
                claims = self.live_claims()
            deferred = []
            for key, genome, attrs in pending:
                if key in out:
                    continue
                if key in self.done:
                    out[key] = self.done[key]
                    self.reused += 1
                    continue
                if not self.shared:
                    out[key] = self._add_complete(key, genome, attrs, _clean(evaluate(genome)))
                    continue
                if key in claims:
                    deferred.append((key, genome, attrs))
                    continue
                out[key] = self._claim_and_evaluate(key, genome, attrs, evaluate)
            pending = deferred
            if pending:
                time.sleep(self.poll_s)
        return [out[key] for key, _, _ in items]

    def _claim_and_evaluate(self, key, genome, attrs, evaluate) -> dict:
        from optuna.trial import TrialState

        trial_id = self.storage.create_new_trial(self.study_id, self._template(TrialState.RUNNING, key, genome,
                                                                                attrs))
        try:
            result = _clean(evaluate(genome))
        except BaseException:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            raise
        for name, value in result.items():
            self.storage.set_trial_user_attr(trial_id, name, value)
        self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [float(result["fitness"])])
        return self._after_complete(trial_id, key)


def _clean(result: dict) -> dict:
    """JSON-safe floats for the stored result."""
    out = {}
    for k, v in result.items():
        out[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return out
