"""What the studies hold, read once: the ranking rule, trial counts and the StudyResults of an experiment.

Below both the report (tables, figures) and the worker side (worker, replicate, status, demo): every command ranks
and counts trials the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from trainer.methods import get_method

from .experiment import load_experiment
from .storage import retried_numbers

# The Avg definitions: Waterbirds papers weight group accuracies by training-set group proportions, others report
# plain test accuracy. {name: (metric key, how the caption says it)}
AVG = {"train_weighted": ("avg_train_weighted", "group accuracies weighted by training-set group proportions"),
       "plain": ("avg_plain", "plain test accuracy")}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def has_result(t: FrozenTrial) -> bool:
    """A COMPLETE trial whose record holds what the tables and figures read, as numbers: its value, the val and test
    metrics and the seed. A trial edited by hand, enqueued from the dashboard or written by another tool may not:
    it is left out of every ranking and table, never a crash."""
    val, test = t.user_attrs.get("val"), t.user_attrs.get("test")
    return (t.state == TrialState.COMPLETE and _number(t.value) and isinstance(val, dict) and isinstance(test, dict)
            and all(_number(val.get(k)) for k in ("wga", "avg_plain"))
            and all(_number(test.get(k)) for k in ("wga", "avg_plain", "avg_train_weighted"))
            and isinstance(t.user_attrs.get("seed", 0), int))


def train_seconds(t: FrozenTrial) -> float:
    v = t.user_attrs.get("train_seconds", 0.0)
    return float(v) if _number(v) and v >= 0 else 0.0


def rank_key(t: FrozenTrial) -> tuple:
    """The one ranking rule (report, seed phase, status): the selection metric, ties broken by val average (it reads
    no group label), then fewer epochs."""
    return t.value, t.user_attrs["val"]["avg_plain"], -t.user_attrs.get("epochs_run", 0)


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials with metrics, best first."""
    done = [t for t in trials if has_result(t)]
    return sorted(done, key=lambda t: (rank_key(t), -t.number), reverse=True)


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    top = ranked(trials)
    return top[0] if top else None


@dataclass
class Config:
    """One configuration of the seed phase: the searched trial (one seed) and its re-runs with other seeds."""
    rank: int                                 # 1 = best searched trial
    searched: FrozenTrial
    reruns: list[FrozenTrial] = field(default_factory=list)  # one per seed, a retried lineage as its last attempt

    def runs(self) -> list[FrozenTrial]:
        """Finished runs, by seed."""
        return sorted([t for t in (self.searched, *self.reruns) if has_result(t)], key=lambda t: t.user_attrs["seed"])

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
        """Mean selection metric over the finished seeds; ties: mean val average, then the better search rank."""
        runs = self.runs()
        return (float(np.mean([t.value for t in runs])),
                float(np.mean([t.user_attrs["val"]["avg_plain"] for t in runs])), -self.rank)


@dataclass
class StudyResult:
    """One (dataset, method) study and its seed phase, read once: what every table and figure is drawn from."""
    name: str
    dataset: str
    method: str
    search: list[FrozenTrial]               # searched trials, a retry lineage counted once
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
    def search_best(self) -> FrozenTrial | None:
        """The best searched trial (one seed)."""
        return best_trial(self.search)

    @property
    def best(self) -> FrozenTrial | None:
        """The searched trial of the selected configuration (the best searched trial without a seed phase)."""
        return self.selected.searched if self.selected else best_trial(self.search)

    @property
    def selected(self) -> Config | None:
        """The configuration with the best mean val metric over its seeds, once the seed phase has run."""
        return max(self.configs, key=Config.score) if self.configs else None

    def count(self, state: TrialState) -> int:
        return sum(t.state == state for t in self.search)

    def runs(self) -> list[FrozenTrial]:
        """The runs the table averages: the selected configuration's finished seeds, else the best trial alone."""
        if self.selected:
            return self.selected.runs()
        return [self.best] if self.best else []

    @property
    def asked(self) -> int:
        return self.selected.asked if self.selected else int(self.best is not None)


def _kept(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried]


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
            number, rank = t.user_attrs.get("config"), t.user_attrs.get("rank")
            if not (isinstance(number, int) and isinstance(rank, int)):
                continue  # not a seed run of the protocol (enqueued by hand or from the dashboard)
            config = next((c for c in r.configs if c.searched.number == number), None)
            if config is None and number in by_number:
                config = Config(rank=rank, searched=by_number[number])
                r.configs.append(config)
            if config:
                config.reruns.append(t)
        r.configs.sort(key=lambda c: c.rank)
        r.compute_s = sum(train_seconds(t) for t in (*trials, *seed_trials))
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
                        f"{last[-1].user_attrs.get('fail_reason', 'no reason recorded')}"
                        if len(last) == MAX_CONSECUTIVE_FAILURES and all(t.state == TrialState.FAIL for t in last)
                        else None)
    return counts
