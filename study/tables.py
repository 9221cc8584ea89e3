"""The report's content, format-free: the table's numbers (`summary`), as the paper prints them (`display`), its
caption, the summary across benchmarks, the published anchors and one tidy frame of everything (`tidy`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from optuna.trial import TrialState

from trainer.config import PATIENCE_RULE
from trainer.methods import get_method
from trainer.metrics import get_selection

from .anchors import ANCHORS
from .results import AVG, StudyResult
from .statistics import CONFIDENCE, CONTRAST_COLUMNS, contrasts, verdict


COLUMNS = ["dataset", "method", "Avg", "Avg std", "Worst", "Worst std", "val", "val std", "seeds finished",
           "seeds asked", "train group labels", "selection group labels", "trials complete", "trials pruned",
           "trials failed", "compute (s)"]


def untrained(r: StudyResult) -> str | None:
    """Why a row's model is no trained baseline, or None: in every seed it predicts a single class (test worst-class
    accuracy 0), or its selected epoch is the method's first own epoch (training never improved on it; not said of
    a pretrained model, which one epoch of fine-tuning leaves trained). Such a row flatters every method compared
    with it. Not flagged: a model of the spurious attribute — val worst-group 0
    with a train-weighted val average of at least 90% (texdigits' ERM from its first epoch on): it is trained, and
    the comparisons against it are real."""
    runs = r.runs()
    if not runs:
        return None
    if all(t.test.worst_class == 0 for t in runs):
        return "predicts a single class"
    if all(t.val.wga == 0 and (t.val.avg_train_weighted or 0) >= 0.9 for t in runs):
        return None
    if all(t.best_epoch == t.first_own_epoch and not t.pretrained for t in runs):
        return "its best epoch is its first"
    return None


COLLAPSED_NORM = 1e-3  # a penultimate-feature norm below this in eval mode: collapsed (a trained model's is O(1))


def collapsed(r: StudyResult) -> str | None:
    """Why a row's selected models are no working classifiers in some seeds, or None: the features collapsed (their
    mean norm on the test split below COLLAPSED_NORM: the full-scope Fisher constraint's failure), or the model
    predicts one class on the test split. Read from the test metrics (records of earlier versions: not flagged)."""
    runs = r.runs()
    flat = sum(t.test.feature_norm is not None and t.test.feature_norm < COLLAPSED_NORM for t in runs)
    one = sum(t.test.top_class_share is not None and t.test.top_class_share >= 1.0 for t in runs)
    if flat:
        return (f"its features collapsed (mean norm < {COLLAPSED_NORM:g} on the test split) in {flat} of "
                f"{len(runs)} seeds")
    if one:
        return f"it predicts one class on the test split in {one} of {len(runs)} seeds"
    return None


def no_baseline(r: StudyResult) -> str | None:
    """The reason for a row's mark (†): untrained in every seed, or collapsed in some."""
    why = untrained(r)
    return f"{why} in every seed" if why else collapsed(r)


# Which group labels a method trains on (Method.group_labels), as the table says it.
TRAIN_LABELS = {"none": "no", "train": "yes", "val": "val split"}


def _pct(values) -> tuple[float, float]:
    """Mean and sample std (NaN for one value) in percent."""
    v = 100 * np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summary(exp, results: list[StudyResult], avg: str = "train_weighted") -> pd.DataFrame:
    """The table's numbers (percent, 1 decimal), columns COLUMNS: every output format is rendered from this frame."""
    key, selection = AVG[avg][0], get_selection(exp.selection)
    rows = []
    for r in results:
        runs = r.runs()
        row = dict.fromkeys(COLUMNS, np.nan) | {
            "dataset": r.dataset, "method": r.label, "seeds finished": len(runs), "seeds asked": r.asked,
            "train group labels": TRAIN_LABELS[r.cls.group_labels],
            "selection group labels": "yes" if selection.uses_group_labels else "no",
            "trials complete": r.count(TrialState.COMPLETE), "trials pruned": r.count(TrialState.PRUNED),
            "trials failed": r.count(TrialState.FAIL), "compute (s)": round(r.compute_s)}
        if runs:
            row["Avg"], row["Avg std"] = _pct([t.test.avg(key) for t in runs])
            row["Worst"], row["Worst std"] = _pct([t.test.wga for t in runs])
            row["val"], row["val std"] = _pct([t.value for t in runs])
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS).round(1)


def datasets_of(results: list[StudyResult]) -> list[str]:
    return list(dict.fromkeys(r.dataset for r in results))


def benchmark_summary(results: list[StudyResult]) -> pd.DataFrame:
    """One row per method across the experiment's benchmarks (empty with one): its mean rank by test worst-group
    accuracy (1 = best, ties share their mean rank) over the benchmarks where it has a finished run, its test Worst
    on each, and its verdict against ERM and GroupDRO on each."""
    datasets = datasets_of(results)
    if len(datasets) < 2:
        return pd.DataFrame()
    at = {(r.dataset, r.method): r for r in results}
    worst = {(r.dataset, r.method): _pct([t.test.wga for t in r.runs()])[0]
             for r in results if r.runs()}
    ranks: dict[tuple[str, str], float] = {}
    for d in datasets:
        ranks |= {(d, m): v for m, v in pd.Series({m: w for (e, m), w in worst.items() if e == d}).rank(
            ascending=False, method="average").items()}
    refs = sorted({r.method for r in results if r.cls.card.reference}, key=lambda m: get_method(m).card.order)
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        label = next(r.label for r in results if r.method == method)
        mine = [ranks[(d, method)] for d in datasets if (d, method) in ranks]
        row = {"method": label, "mean rank": f"{np.mean(mine):.2f}" if mine else "",
               "benchmarks": f"{len(mine)}/{len(datasets)}"}
        row |= {f"Worst {d}": f"{worst[(d, method)]:.1f}" if (d, method) in worst else "" for d in datasets}
        for ref in refs:
            ref_label = next(r.label for r in results if r.method == ref)
            for d in datasets:
                a, b = at.get((d, method)), at.get((d, ref))
                row[f"vs {ref_label} {d}"] = "—" if method == ref else verdict(a, b) if a and b else ""
        rows.append(row)
    return pd.DataFrame(rows)


BENCHMARK_CAPTION = (
    "Across benchmarks: each method's mean rank by test worst-group accuracy (1 = best; ties share their mean rank) "
    "over the benchmarks where it has a finished run, its test Worst (%, mean over its seeds) on each, and its paired "
    f"comparison with ERM and DRO on each: better / worse when the {CONFIDENCE:.0%} Student-t interval of the "
    "worst-group difference (paired by training seed) lies above / below 0, undecided when it contains 0, n/a under "
    "2 paired seeds; in brackets the mean difference (pp).")


def anchor_table(dataset: str, rows: list[StudyResult]) -> pd.DataFrame | None:
    """The published numbers of the methods in `rows`, shown beside a dataset's measured rows, or None."""
    labels = {r.label for r in rows}
    shown = [a for a in ANCHORS.get(dataset, ("", ()))[1] if a.method in labels]
    if not shown:
        return None
    return pd.DataFrame([{"published (not measured here)": a.method, "Avg": a.avg, "Worst": a.worst,
                          "source": a.source} for a in shown])


def anchor_caption(dataset: str) -> str:
    return (f"Published anchors for {dataset}: {ANCHORS[dataset][0]}; test %, Avg weighted by training-group "
            "proportions. Quoted from the papers, not measured by this experiment.")


def _pm(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "no finished trial"
    return f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _seeds(r: StudyResult, finished: int) -> str:
    """'5/5', or '4/5 (1 failed)': a configuration with a failed or unfinished seed is flagged."""
    cell = f"{finished}/{r.asked}"
    c, notes = r.selected, []
    if c and c.failed:
        notes.append(f"{c.failed} failed")
    if c and c.pending:
        notes.append(f"{c.pending} pending")
    return f"{cell} ({', '.join(notes)})" if notes else cell


def display(exp, table: pd.DataFrame, results: list[StudyResult]) -> pd.DataFrame:
    """The numbers as the paper prints them: '97.3' or '97.3 ± 0.4'; counts as complete/pruned/failed."""
    out = pd.DataFrame({"dataset": table["dataset"],
                        "method": [m + (" †" if no_baseline(r) else "") for m, r in zip(table["method"], results)]})
    out["Avg"] = [_pm(m, s) for m, s in zip(table["Avg"], table["Avg std"])]
    for col, name in (("Worst", "Worst"), ("val", exp.selection)):
        out[name] = ["" if np.isnan(m) else _pm(m, s) for m, s in zip(table[col], table[f"{col} std"])]
    out["seeds"] = [_seeds(r, n) for r, n in zip(results, table["seeds finished"])]
    out["train group labels"] = table["train group labels"]
    out["selection group labels"] = table["selection group labels"]
    out["trials (complete/pruned/failed)"] = [f"{c}/{p}/{f}" for c, p, f in zip(
        table["trials complete"], table["trials pruned"], table["trials failed"])]
    out["compute (s)"] = table["compute (s)"]
    return out


def selected_setting(exp, r: StudyResult, name: str):
    """A method parameter of the row's selected configuration: searched, fixed by the experiment, or the default."""
    assert r.best is not None
    if name in r.best.params:
        return r.best.params[name]
    fixed = exp.params.get(r.method, {})
    return fixed[name] if name in fixed else next(f.default for f in r.cls.param_fields() if f.name == name)


def caption(exp, results: list[StudyResult], avg: str) -> str:
    seeded = [r for r in results if r.configs]
    if seeded:
        k = max(len(r.configs) for r in seeded)
        n = max(c.asked for r in seeded for c in r.configs)
        protocol = (f"Protocol: a search of {exp.trials} trials per method (seed {exp.run.seed}); the top {k} "
                    f"configurations by {exp.selection} re-run with {n} training seeds each (the searched run "
                    f"counting as one); the configuration with the best mean {exp.selection} over its seeds is "
                    "selected and its cells are mean ± std over its finished seeds (seeds: finished/asked). "
                    "A row without a seed phase is 1 seed.")
    else:
        protocol = (f"Protocol: a search of {exp.trials} trials per method; each row is the best searched trial, "
                    f"1 seed (seed {exp.run.seed}); `python -m study replicate` adds the seed phase.")
    patience = (f"{exp.run.patience}" if exp.run.patience is not None else
                f"{PATIENCE_RULE} = " + ", ".join(f"{exp.patience_for(d)}" for d in exp.datasets))
    notes = "".join(f" {note}" for note in dict.fromkeys(
        n for r in results for n in (r.cls.card.name_note, r.cls.card.val_note) if n))
    notes += "".join(f" {r.dataset}/{r.label}: the selected configuration's {name} is {selected_setting(exp, r, name)}"
                     f"{' ' + r.cls.card.named_note if r.cls.card.named_note else ''}."
                     for r in results for name in r.cls.card.named if r.best is not None)
    notes += "".join(f" † {r.dataset}/{r.label}: {why} — not a trained baseline (check its learning rate and "
                     "epochs); differences against it overstate the other methods."
                     for r in results if (why := no_baseline(r)))
    return (f"Experiment {exp.name!r} on {', '.join(exp.datasets)}: test accuracy (%). {protocol} "
            f"Avg = {AVG[avg][1]}; Worst = worst-group accuracy. Selection: {exp.selection_text()}; ties: higher "
            f"val average, then fewer epochs; early-stopping patience {patience} epochs. Trials: a retried trial "
            "counts once; failed trials never enter the table. Compute: train seconds of every trial of the "
            f"search and the seed phase.{notes}")


def shown(exp, results, avg: str) -> pd.DataFrame:
    return display(exp, summary(exp, results, avg), results)


def sections(results) -> list[tuple[str, list[StudyResult]]]:
    """[(dataset, its rows)]: one table per dataset."""
    return [(d, [r for r in results if r.dataset == d]) for d in datasets_of(results)]


def tidy(exp, results, avg: str) -> pd.DataFrame:
    """One tidy table: the results (table = "results"), the paired comparisons ("comparisons"), with several
    datasets the summary across them ("benchmarks"), and published numbers ("published", their own `source`
    column) as rows, each with the columns of its kind (the others empty), counts as integers."""
    published = [a.rename(columns={"published (not measured here)": "method"}).assign(dataset=d)
                 for d, rows in sections(results) if (a := anchor_table(d, rows)) is not None]
    parts = [summary(exp, results, avg).assign(table="results"), contrasts(results).assign(table="comparisons"),
             benchmark_summary(results).assign(table="benchmarks"),
             *[p.astype({"Avg": float, "Worst": float}).assign(table="published") for p in published]]
    counts = [c for c in COLUMNS if c.startswith(("seeds ", "trials ")) or c == "compute (s)"] + ["paired seeds"]
    frame = pd.concat([df.astype({c: "Int64" for c in counts if c in df}) for df in parts if len(df)])
    columns = ["experiment", "table", *dict.fromkeys(c for c in [*COLUMNS, *CONTRAST_COLUMNS, *frame.columns]
                                                     if c not in ("experiment", "table"))]
    return frame.assign(experiment=exp.name).reindex(columns=columns)
