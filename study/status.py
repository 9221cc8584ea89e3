"""`python -m study status`: trial states, best value (the report's ranking) and epochs trained, per study."""
from __future__ import annotations

import pandas as pd

from .experiment import load_experiment
from .report import best_trial
from .worker import trial_counts


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
            f"best {exp.selection}": round(best.value, 4) if best else None,
            "epochs trained": sum(len(t.intermediate_values) for t in trials),
            "halted": c["halted"] or "",
        })
    return pd.DataFrame(rows).set_index("study")
