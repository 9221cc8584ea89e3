"""`python -m study replicate`: re-run each study's best configuration with new training seeds.

The re-runs are enqueued trials (same parameters, user attrs seed and replicate_of) that any worker picks up;
they are never pruned and do not count toward the search budget. Seeds are exp.seed + 1 ... exp.seed + N, the
same for every method, so runs pair by seed across methods. Running it again adds only missing seeds.
"""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from .report import collect
from .worker import trial_counts


def replicate(storage, experiment: str, seeds: int) -> dict[str, list[int]]:
    """Enqueue the missing seeds of every study's best trial. Returns {study: seeds enqueued}."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    exp, results = collect(storage, experiment)
    studies = {r.name: optuna.load_study(study_name=r.name, storage=storage) for r in results}
    unfinished = []
    for r in results:  # the best trial must be final before it is replicated
        c = trial_counts(studies[r.name])
        if c["used"] < exp.trials or c["running"] or c["waiting"] - c["replicate_waiting"]:
            unfinished.append(f"{r.name} ({c['used']}/{exp.trials} trials, {c['running']} running)")
        elif r.best is None:
            unfinished.append(f"{r.name} (no finished trial)")
    if unfinished:
        raise ValueError(f"search not finished, nothing enqueued: {'; '.join(unfinished)}")
    wanted = range(exp.seed + 1, exp.seed + 1 + seeds)
    out = {}
    for r in results:
        study = studies[r.name]
        have = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("replicate_of") == r.best.number and t.state != TrialState.FAIL}
        new = [s for s in wanted if s not in have]
        for s in new:
            study.enqueue_trial(r.best.params, user_attrs={"seed": s, "replicate_of": r.best.number})
        out[r.name] = new
    return out
