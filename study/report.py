"""`python -m study.report`: the paper's table (test Avg / Worst per method) from an experiment's studies."""
from __future__ import annotations

import argparse
import sys

import pandas as pd
from optuna.trial import TrialState

from .experiment import SELECTION, load_experiment
from .storage import retried_numbers

LABELS = {"erm": "ERM", "groupdro": "DRO", "fim": "Ours"}  # the paper's naming and row order
AVG = {"train_weighted": ("avg_train_weighted", "group accuracies weighted by training-set group proportions"),
       "plain": ("avg_plain", "plain test accuracy")}


def best_trial(trials):
    """Best by val WGA; ties broken by val average, then fewer epochs (the same rule for every method)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and "val" in t.user_attrs]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, t.user_attrs["val"]["avg_plain"], -t.user_attrs.get("epochs_run", 0)))


def report_table(storage, experiment: str, avg: str = "train_weighted") -> tuple[pd.DataFrame, str]:
    key, avg_text = AVG[avg]
    exp, studies = load_experiment(storage, experiment)
    rows = []
    order = list(LABELS)
    for s in sorted(studies, key=lambda s: (s.user_attrs["dataset"], order.index(s.user_attrs["method"])
                                            if s.user_attrs["method"] in order else len(order))):
        trials = s.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        trials = [t for t in trials if t.number not in retried]  # a retry lineage counts once
        n = {st: sum(t.state == st for t in trials) for st in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        best = best_trial(trials)
        method = s.user_attrs["method"]
        row = {"dataset": s.user_attrs["dataset"], "method": LABELS.get(method, method)}
        if best is None:
            row.update({"Avg": "no finished trial", "Worst": "", "val WGA": ""})
        else:
            test = best.user_attrs["test"]
            row.update({"Avg": f"{100 * test[key]:.1f}", "Worst": f"{100 * test['wga']:.1f}",
                        "val WGA": f"{100 * best.value:.1f}"})
        row.update({"group labels": "yes" if s.user_attrs.get("uses_group_labels") else "no",
                    "trials (complete/pruned/failed)": f"{n[TrialState.COMPLETE]}/{n[TrialState.PRUNED]}/{n[TrialState.FAIL]}",
                    "compute (s)": round(sum(t.user_attrs.get("train_seconds", 0) for t in trials))})
        rows.append(row)
    caption = (f"Experiment {experiment!r} on {', '.join(exp.datasets)}: test accuracy (%) of each method's best "
               f"trial. Avg = {avg_text}; Worst = worst-group accuracy. Selection: {SELECTION}.")
    return pd.DataFrame(rows), caption


def report_markdown(storage, experiment: str, avg: str = "train_weighted") -> str:
    table, caption = report_table(storage, experiment, avg)
    return f"{caption}\n\n{table.to_markdown(index=False)}\n"


def main(argv=None) -> int:
    from .storage import StorageError, make_storage
    p = argparse.ArgumentParser(prog="python -m study.report", description=__doc__)
    p.add_argument("--experiment", required=True)
    p.add_argument("--storage", help="storage URL (default: $OPTUNA_STORAGE or sqlite:///studies.db)")
    p.add_argument("--avg", choices=list(AVG), default="train_weighted", help="definition of Avg")
    args = p.parse_args(argv)
    try:
        print(report_markdown(make_storage(args.storage), args.experiment, args.avg))
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
