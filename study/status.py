"""`python -m study status`: trial states, best value (the report's ranking) and epochs trained, per study;
`python -m study list`: the experiments a storage holds."""
from __future__ import annotations

import pandas as pd

from .experiment import load_experiment
from .results import best_trial, trial_counts


def status_table(storage, experiment: str) -> pd.DataFrame:
    exp, studies, seeds = load_experiment(storage, experiment, seeds=True)
    rows = []
    for s in studies:
        c = trial_counts(s)
        trials = s.get_trials(deepcopy=False)
        sc = trial_counts(seeds[s.study_name]) if s.study_name in seeds else {}
        best = best_trial(trials)  # COMPLETE only, the report's ties
        rows.append({
            "study": s.study_name, "budget": exp.trials, "used": c["used"], "complete": c["complete"],
            "pruned": c["pruned"], "failed": c["fail"], "running": c["running"], "waiting": c["waiting"],
            "seed phase (done/all)": f"{sc.get('complete', 0)}/{sc.get('used', 0)}" if sc else "-",
            f"best {exp.selection}": round(best.value, 4) if best and best.value is not None else None,
            "epochs trained": sum(len(t.intermediate_values) for t in trials),
            "halted": c["halted"] or "",
        })
    return pd.DataFrame(rows).set_index("study")


def experiments_table(storage) -> pd.DataFrame:
    """One row per experiment in the storage: its datasets, methods, budget and trials so far."""
    rows: dict[str, dict] = {}
    for s in storage.get_all_studies():
        name, _, rest = s.study_name.partition("/")
        exp = s.user_attrs.get("experiment")
        if not rest or exp is None:  # not a study of this service
            continue
        row = rows.setdefault(name, {"experiment": name, "datasets": ", ".join(exp["datasets"]),
                                     "methods": ", ".join(exp["methods"]), "trials per study": exp["trials"],
                                     "search trials": 0, "seed-phase trials": 0})
        n = len(storage.get_all_trials(s._study_id, deepcopy=False))  # a FrozenStudy has no get_trials
        row["seed-phase trials" if rest.endswith("/seeds") else "search trials"] += n
    return pd.DataFrame(list(rows.values()), columns=["experiment", "datasets", "methods", "trials per study",
                                                      "search trials", "seed-phase trials"])
