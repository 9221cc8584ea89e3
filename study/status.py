"""`python -m study status`: trial states, best val WGA and epochs trained, per study."""
from __future__ import annotations

import pandas as pd

from .experiment import load_experiment
from .storage import is_replicate
from .worker import trial_counts


def status_table(storage, experiment: str) -> pd.DataFrame:
    exp, studies = load_experiment(storage, experiment)
    rows = []
    for s in studies:
        c = trial_counts(s)
        trials = s.get_trials(deepcopy=False)
        done = [t for t in trials if t.value is not None and not is_replicate(t)]
        rows.append({
            "study": s.study_name, "budget": exp.trials, "complete": c["complete"], "pruned": c["pruned"],
            "failed": c["fail"], "running": c["running"], "waiting": c["waiting"], "seed replicates": c["replicates"],
            "best val WGA": round(max(t.value for t in done), 4) if done else None,
            "epochs trained": sum(len(t.intermediate_values) for t in trials),
        })
    return pd.DataFrame(rows).set_index("study")
