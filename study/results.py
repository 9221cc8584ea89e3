"""What the studies hold, read once: the ranking rule, trial counts and the StudyResults of an experiment.

Below both the report (tables, figures) and the worker side (worker, replicate, status, demo): every command ranks
and counts trials the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from trainer.methods import get_method

from .experiment import load_experiment
from .records import Run, TrialRecord, best, read, read_all
from .storage import retried_numbers

# The Avg definitions: Waterbirds papers weight group accuracies by training-set group proportions, others report
# plain test accuracy. {name: (metric key, how the caption says it)}
AVG = {"train_weighted": ("avg_train_weighted", "group accuracies weighted by training-set group proportions"),
       "plain": ("avg_plain", "plain test accuracy")}


@dataclass
class Config:
    """One configuration of the seed phase: the searched trial (one seed) and its re-runs with other seeds."""
    rank: int                                 # 1 = best searched trial
    searched: TrialRecord
    reruns: list[TrialRecord] = field(default_factory=list)  # one per seed, a retried lineage as its last attempt

    def runs(self) -> list[Run]:
        """Finished runs, by seed."""
        return sorted([t.run for t in (self.searched, *self.reruns) if t.run], key=lambda r: r.seed)

    @property
    def asked(self) -> int:
        return 1 + len(self.reruns)

    @property
    def failed(self) -> int:
        return sum(t.state == TrialState.FAIL for t in self.reruns)

    @property
    def pending(self) -> int:
        return sum(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in self.reruns)

    def score(self) -> tuple:
        """The trials' ranking rule over the finished seeds: mean selection metric, ties broken by the mean val
        average, then the better search rank."""
        keys = [t.rank_key for t in self.runs()]
        return float(np.mean([k[0] for k in keys])), float(np.mean([k[1] for k in keys])), -self.rank


@dataclass
class StudyResult:
    """One (dataset, method) study and its seed phase, read once: what every table and figure is drawn from."""
    name: str
    dataset: str
    method: str
    search: list[TrialRecord]               # searched trials, a retry lineage counted once
    configs: list[Config] = field(default_factory=list)  # the seed phase's top-k configurations, by search rank
    compute_s: float = 0.0                  # train seconds of every trial, retried and seed-phase ones included
    study: Any = None                       # the search study and its seed-phase sibling (None before this
    seeds_study: Any = None                 # version's init), as loaded: for the seed phase to enqueue into

    @property
    def cls(self):
        return get_method(self.method)

    @property
    def label(self) -> str:
        return self.cls.card.label

    @property
    def search_best(self) -> TrialRecord | None:
        """The best searched trial (one seed)."""
        return best(self.search)

    @property
    def best(self) -> TrialRecord | None:
        """The searched trial of the selected configuration (the best searched trial without a seed phase)."""
        return self.selected.searched if self.selected else best(self.search)

    @property
    def selected(self) -> Config | None:
        """The configuration with the best mean val metric over its seeds, once the seed phase has run."""
        return max(self.configs, key=Config.score) if self.configs else None

    def count(self, state: TrialState) -> int:
        return sum(t.state == state for t in self.search)

    def runs(self) -> list[Run]:
        """The runs the table averages: the selected configuration's finished seeds, else the best trial alone."""
        if self.selected:
            return self.selected.runs()
        return [self.best.run] if self.best and self.best.run else []

    @property
    def asked(self) -> int:
        return self.selected.asked if self.selected else int(self.best is not None)


def _kept(trials: list[FrozenTrial]) -> list[TrialRecord]:
    """The records of the trials no later trial retries."""
    retried = retried_numbers(trials)
    return read_all(t for t in trials if t.number not in retried)


def collect(storage, experiment: str):
    """(experiment, [StudyResult]) in the methods' row order per dataset (ERM, DRO, Ours, then others)."""
    exp, studies, seeds = load_experiment(storage, experiment, seeds=True)
    results = []
    for s in studies:
        trials = s.get_trials(deepcopy=False)
        r = StudyResult(name=s.study_name, dataset=s.user_attrs["dataset"], method=s.user_attrs["method"],
                        search=_kept(trials), study=s, seeds_study=seeds.get(s.study_name))
        seed_trials = seeds[s.study_name].get_trials(deepcopy=False) if s.study_name in seeds else []
        by_number = {t.number: t for t in r.search}
        for t in _kept(seed_trials):
            if t.config is None or t.rank is None:
                continue  # not a seed run of the protocol (enqueued by hand or from the dashboard)
            config = next((c for c in r.configs if c.searched.number == t.config), None)
            if config is None and t.config in by_number:
                config = Config(rank=t.rank, searched=by_number[t.config])
                r.configs.append(config)
            if config:
                config.reruns.append(t)
        r.configs.sort(key=lambda c: c.rank)
        r.compute_s = sum(read(t).train_seconds for t in (*trials, *seed_trials))
        results.append(r)
    rank = {d: i for i, d in enumerate(exp.datasets)}
    results.sort(key=lambda r: (rank.get(r.dataset, len(rank)), r.cls.card.order, r.method))
    return exp, results


MAX_CONSECUTIVE_FAILURES = 3  # a study whose last trials all failed is halted, not run into the ground


def trial_counts(study: optuna.Study) -> dict:
    """Trial states of one study. `used`: trials that count toward the search budget — a retried lineage once, a
    failed trial not at all (a failure is not a result). `halted`: the reason the study takes no more trials (its
    last MAX_CONSECUTIVE_FAILURES finished trials all failed), or None."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    counts: dict[str, Any] = {s.name.lower(): 0 for s in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    counts["retried"] = sum(1 for t in trials if t.number in retried)
    counts["used"] = sum(t.state != TrialState.FAIL for t in trials)
    done = sorted((t for t in trials if t.state.is_finished() and t.number not in retried), key=lambda t: t.number)
    last = done[-MAX_CONSECUTIVE_FAILURES:]
    counts["halted"] = (f"{len(last)} consecutive failed trials, the last: "
                        f"{read(last[-1]).fail_reason or 'no reason recorded'}"
                        if len(last) == MAX_CONSECUTIVE_FAILURES and all(t.state == TrialState.FAIL for t in last)
                        else None)
    return counts
