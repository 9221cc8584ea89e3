"""`python -m study status`: trial states, best value (the report's ranking) and epochs trained, per study;
`python -m study list`: the experiments a storage holds."""
from __future__ import annotations

import pandas as pd

from .experiment import load_experiment
from .records import best, read_all
from .results import trial_counts


def status_table(storage, experiment: str) -> pd.DataFrame:
    exp, studies, seeds = load_experiment(storage, experiment, seeds=True)
    rows = []
    for s in studies:
        c = trial_counts(s)
        trials = s.get_trials(deepcopy=False)
        sc = trial_counts(seeds[s.study_name]) if s.study_name in seeds else {}
        top = best(read_all(trials))  # the report's ranking
        rows.append({
            "study": s.study_name, "budget": exp.trials, "used": c["used"], "complete": c["complete"],
            "pruned": c["pruned"], "failed": c["fail"], "running": c["running"], "waiting": c["waiting"],
            "seed phase (done/all)": f"{sc.get('complete', 0)}/{sc.get('used', 0)}" if sc else "-",
            f"best {exp.selection}": round(top.value, 4) if top else None,
            "epochs trained": sum(len(t.intermediate_values) for t in trials),
            "halted": c["halted"] or "",
        })
    return pd.DataFrame(rows).set_index("study")


def _experiment_of(settings):
    """The Experiment a study's stored settings describe; None where they are not this service's."""
    from .experiment import Experiment
    try:
        return Experiment.from_dict(settings) if isinstance(settings, dict) else None
    except (ValueError, TypeError):
        return None


def artifact_locations(storage) -> list[str]:
    """The artifact stores the storage's experiments name, each once."""
    found, seen = [], []
    for s in storage.get_all_studies():
        settings = s.user_attrs.get("experiment")
        if settings in seen:  # every study of an experiment holds the same settings: checked once
            continue
        seen.append(settings)
        exp = _experiment_of(settings)
        if exp is not None and exp.artifacts and exp.artifacts not in found:
            found.append(exp.artifacts)
    return found


def experiments_table(storage) -> pd.DataFrame:
    """One row per experiment in the storage: its datasets, methods, budget and trials so far, and whether all its
    studies exist with its settings (an interrupted or concurrent init can leave one short: run the init again)."""
    from .experiment import own_studies
    studies = {s.study_name: s for s in storage.get_all_studies()}
    rows = []
    for name in sorted({n.partition("/")[0] for n in studies}):
        mine = own_studies(studies, name)
        settings = [studies[n].user_attrs.get("experiment") for n in mine]
        first = next((s for s in settings if isinstance(s, dict)), None)
        exp = _experiment_of(first)
        if exp is None:
            continue  # not an experiment of this service
        expected = {n for s, d, m in exp.studies() for n in (s, exp.seeds_study_name(d, m))}
        complete = expected <= set(mine) and all(s == first for s in settings)  # one init wrote them all
        n = {n: len(storage.get_all_trials(studies[n]._study_id, deepcopy=False)) for n in mine}
        rows.append({"experiment": name, "datasets": ", ".join(exp.datasets), "methods": ", ".join(exp.methods),
                     "trials per study": exp.trials,
                     "search trials": sum(v for k, v in n.items() if not k.endswith("/seeds")),
                     "seed-phase trials": sum(v for k, v in n.items() if k.endswith("/seeds")),
                     "state": "ready" if complete else "incomplete: run its init again"})
    return pd.DataFrame(rows, columns=["experiment", "datasets", "methods", "trials per study", "search trials",
                                       "seed-phase trials", "state"])
