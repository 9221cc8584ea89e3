"""`python -m study.report`: the paper's table (test Avg / Worst per method) from an experiment's studies.

Selection: the best trial of each study by val WGA (ties: val average, then fewer epochs), the same rule for
every method. Where `python -m study replicate` re-ran that configuration with new seeds, the table shows
mean ± std over those seeds and a paired bootstrap CI of Ours' worst-group gain over each baseline.
"""
from __future__ import annotations

import argparse
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from .experiment import SELECTION, load_experiment
from .storage import is_replicate, retried_numbers

LABELS = {"erm": "ERM", "groupdro": "DRO", "fim": "Ours"}  # the paper's naming and row order
OURS = "fim"
AVG = {"train_weighted": ("avg_train_weighted", "group accuracies weighted by training-set group proportions"),
       "plain": ("avg_plain", "plain test accuracy")}
FORMATS = ("markdown", "csv", "latex", "html")
BOOTSTRAP_SAMPLES = 10_000


@dataclass
class StudyResult:
    """One (dataset, method) study, read once: what every table and figure is drawn from."""
    name: str
    dataset: str
    method: str
    uses_group_labels: bool
    search: list[FrozenTrial]               # searched trials, a retry lineage counted once
    best: FrozenTrial | None
    replicates: list[FrozenTrial] = field(default_factory=list)  # COMPLETE re-runs of `best` with new seeds
    compute_s: float = 0.0                  # train seconds of every trial, retried and replicates included

    @property
    def label(self) -> str:
        return LABELS.get(self.method, self.method)

    def count(self, state: TrialState) -> int:
        return sum(t.state == state for t in self.search)

    def runs(self) -> list[FrozenTrial]:
        """The runs the table averages: the replicates if any, else the best trial alone."""
        return self.replicates or ([self.best] if self.best else [])


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """Best by val WGA; ties broken by val average, then fewer epochs (the same rule for every method)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and "val" in t.user_attrs and not is_replicate(t)]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, t.user_attrs["val"]["avg_plain"], -t.user_attrs.get("epochs_run", 0)))


def collect(storage, experiment: str):
    """(experiment, [StudyResult]) in the paper's row order: per dataset ERM, DRO, Ours, then others."""
    exp, studies = load_experiment(storage, experiment)
    order = list(LABELS)
    results = []
    for s in studies:
        trials = s.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        kept = [t for t in trials if t.number not in retried]
        search = [t for t in kept if not is_replicate(t)]
        best = best_trial(search)
        reps = [t for t in kept if best and is_replicate(t) and t.user_attrs["replicate_of"] == best.number
                and t.state == TrialState.COMPLETE and "test" in t.user_attrs]
        results.append(StudyResult(
            name=s.study_name, dataset=s.user_attrs["dataset"], method=s.user_attrs["method"],
            uses_group_labels=bool(s.user_attrs.get("uses_group_labels")), search=search, best=best,
            replicates=sorted(reps, key=lambda t: t.user_attrs["seed"]),
            compute_s=sum(t.user_attrs.get("train_seconds", 0.0) for t in trials)))
    rank = {d: i for i, d in enumerate(exp.datasets)}
    results.sort(key=lambda r: (rank.get(r.dataset, len(rank)),
                                order.index(r.method) if r.method in order else len(order), r.method))
    return exp, results


def _pct(values) -> tuple[float, float]:
    """Mean and sample std (NaN for one value) in percent."""
    v = 100 * np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summary(results: list[StudyResult], avg: str = "train_weighted") -> pd.DataFrame:
    """The table's numbers (percent, 1 decimal): every output format is rendered from this frame."""
    key = AVG[avg][0]
    rows = []
    for r in results:
        runs = r.runs()
        row = {"dataset": r.dataset, "method": r.label, "Avg": np.nan, "Avg std": np.nan, "Worst": np.nan,
               "Worst std": np.nan, "val WGA": np.nan, "val WGA std": np.nan, "seeds": len(runs),
               "group labels": "yes" if r.uses_group_labels else "no", "complete": r.count(TrialState.COMPLETE),
               "pruned": r.count(TrialState.PRUNED), "failed": r.count(TrialState.FAIL),
               "compute (s)": round(r.compute_s)}
        if runs:
            row["Avg"], row["Avg std"] = _pct([t.user_attrs["test"][key] for t in runs])
            row["Worst"], row["Worst std"] = _pct([t.user_attrs["test"]["wga"] for t in runs])
            row["val WGA"], row["val WGA std"] = _pct([t.value for t in runs])
        rows.append(row)
    return pd.DataFrame(rows).round(1)


def paired_bootstrap(diffs, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and the 95% percentile-bootstrap interval of that mean (seeds resampled)."""
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def contrasts(results: list[StudyResult]) -> pd.DataFrame:
    """Ours − baseline test worst-group accuracy (pp) over seeds both replicated (paired by seed)."""
    rows = []
    for ours in (r for r in results if r.method == OURS and len(r.replicates) >= 2):
        mine = {t.user_attrs["seed"]: t.user_attrs["test"]["wga"] for t in ours.replicates}
        for base in (r for r in results if r.dataset == ours.dataset and r.method != OURS):
            theirs = {t.user_attrs["seed"]: t.user_attrs["test"]["wga"] for t in base.replicates}
            seeds = sorted(set(mine) & set(theirs))
            if len(seeds) < 2:
                continue
            mean, lo, hi = paired_bootstrap([100 * (mine[s] - theirs[s]) for s in seeds])
            rows.append({"dataset": ours.dataset, "comparison": f"{ours.label} − {base.label}",
                         "paired seeds": len(seeds), "Worst diff (pp)": round(mean, 1),
                         "95% CI low": round(lo, 1), "95% CI high": round(hi, 1)})
    return pd.DataFrame(rows)


def _pm(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "no finished trial"
    return f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The numbers as the paper prints them: '97.3' or '97.3 ± 0.4'; counts as complete/pruned/failed."""
    out = pd.DataFrame({"dataset": table["dataset"], "method": table["method"]})
    for col in ("Avg", "Worst", "val WGA"):
        out[col] = [_pm(m, s) if not np.isnan(m) or col == "Avg" else "" for m, s in
                    zip(table[col], table[f"{col} std"])]
    out["seeds"] = table["seeds"]
    out["group labels"] = table["group labels"]
    out["trials (complete/pruned/failed)"] = [f"{c}/{p}/{f}" for c, p, f in
                                              zip(table["complete"], table["pruned"], table["failed"])]
    out["compute (s)"] = table["compute (s)"]
    return out


def caption(exp, results: list[StudyResult], avg: str) -> str:
    replicated = any(r.replicates for r in results)
    seeds = ("mean ± std over the seeds of `python -m study replicate` (new training seeds of the best "
             "configuration; seeds = 1: the best trial alone)" if replicated else "one run (seed "
             f"{exp.seed}); `python -m study replicate` adds seeds")
    return (f"Experiment {exp.name!r} on {', '.join(exp.datasets)}: test accuracy (%) of each method's best "
            f"trial, {seeds}. Avg = {AVG[avg][1]}; Worst = worst-group accuracy. Selection: {SELECTION}; "
            "ties: higher val average, then fewer epochs. Trials: a retried trial counts once; failed trials "
            "never enter the table. Compute: train seconds of every trial of the study.")


def contrast_caption() -> str:
    return (f"Paired bootstrap ({BOOTSTRAP_SAMPLES:,} resamples of seeds) 95% confidence interval of the mean "
            "test worst-group difference of Ours against each baseline, paired by training seed.")


def render_markdown(exp, results, avg: str) -> str:
    table = display(summary(results, avg)).to_markdown(index=False, disable_numparse=True)  # "58.0", not "58"
    out = f"{caption(exp, results, avg)}\n\n{table}\n"
    diffs = contrasts(results)
    if len(diffs):
        out += f"\n{contrast_caption()}\n\n{diffs.to_markdown(index=False, floatfmt='.1f')}\n"
    return out


def render_csv(exp, results, avg: str) -> str:
    return summary(results, avg).to_csv(index=False)


def render_latex(exp, results, avg: str) -> str:
    shown = display(summary(results, avg)).rename(columns={"trials (complete/pruned/failed)": "trials (c/p/f)"})
    out = shown.to_latex(index=False, caption=caption(exp, results, avg), label=f"tab:{exp.name}")
    diffs = contrasts(results)
    if len(diffs):
        out += "\n" + diffs.to_latex(index=False, caption=contrast_caption(), label=f"tab:{exp.name}-ci",
                                     float_format="%.1f")
    return out.replace("±", r"$\pm$").replace("−", "$-$")


def render_html(exp, results, avg: str) -> str:
    from .figures import figures
    figs = figures(results, avg)
    parts = [f"<h1>Experiment {html.escape(exp.name)}</h1>", f"<p>{html.escape(caption(exp, results, avg))}</p>",
             display(summary(results, avg)).to_html(index=False, border=0, classes="table")]
    diffs = contrasts(results)
    if len(diffs):
        parts += [f"<p>{html.escape(contrast_caption())}</p>", diffs.to_html(index=False, border=0)]
    for i, fig in enumerate(figs.values()):  # plotly.js inlined once: the file works offline
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0, default_width="100%"))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{padding:2px 10px;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(exp.name)} report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


SUFFIXES = {".md": "markdown", ".csv": "csv", ".tex": "latex", ".html": "html", ".htm": "html"}
RENDER = {"markdown": render_markdown, "csv": render_csv, "latex": render_latex, "html": render_html}


def to_dashboard(storage, experiment: str, avg: str) -> int:
    """Saves each study's figures into the study for optuna-dashboard (same ids: a rerun replaces them)."""
    import optuna
    from optuna_dashboard import save_plotly_graph_object

    from .figures import figures
    _, results = collect(storage, experiment)
    n = 0
    for r in results:
        study = optuna.load_study(study_name=r.name, storage=storage)
        for key, fig in figures([x for x in results if x.dataset == r.dataset], avg).items():
            save_plotly_graph_object(study, fig, graph_object_id=f"report-{key}")
            n += 1
    return n


def main(argv=None) -> int:
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from .storage import StorageError, make_storage
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    p = argparse.ArgumentParser(prog="python -m study.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True)
    p.add_argument("--storage", help="storage URL (default: $OPTUNA_STORAGE or sqlite:///studies.db)")
    p.add_argument("--format", choices=FORMATS,
                   help="output format (default: from each --out suffix .md/.csv/.tex/.html, else markdown)")
    p.add_argument("--out", action="append", default=[],
                   help="write to this file instead of standard output (repeatable: --out r.html --out r.md)")
    p.add_argument("--avg", choices=list(AVG), default="train_weighted",
                   help="Avg definition: train_weighted (Waterbirds convention) or plain test accuracy")
    p.add_argument("--to-dashboard", action="store_true",
                   help="also save the figures into each study for optuna-dashboard")
    args = p.parse_args(argv)
    try:
        storage = make_storage(args.storage)
        exp, results = collect(storage, args.experiment)
        if not args.out:
            sys.stdout.write(RENDER[args.format or "markdown"](exp, results, args.avg))
        for out in map(Path, args.out):
            fmt = args.format or SUFFIXES.get(out.suffix.lower())
            if fmt is None:
                raise ValueError(f"--out {out}: cannot tell the format from {out.suffix!r}; give --format")
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(RENDER[fmt](exp, results, args.avg))
            tmp.replace(out)  # never a half-written report
            print(f"wrote the {fmt} report of {args.experiment!r} to {out}", file=sys.stderr)
        if args.to_dashboard:
            n = to_dashboard(storage, args.experiment, args.avg)
            print(f"saved {n} figures into the studies for optuna-dashboard", file=sys.stderr)
    except (ValueError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
