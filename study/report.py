"""`python -m study.report`: the paper's table (test Avg / Worst per method) from an experiment's studies.

Selection, the same rule for every method: by the experiment's selection metric (ties: val average, then fewer
epochs). After `python -m study replicate`, the top-k searched configurations are re-run with more seeds and the
one with the best mean over its seeds is the row: mean ± std over its seeds, and paired Student-t intervals of
the worst-group differences between methods.
"""
from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import TrialState

from scipy import stats

from trainer.config import PATIENCE_RULE
from trainer.files import write_atomically
from trainer.methods import get_method
from trainer.metrics import get_selection
from trainer.settings import Parser

from .anchors import ANCHORS
from .figures import benchmark_figure, figures
from .results import AVG, StudyResult, collect

FORMATS = ("markdown", "csv", "latex", "html")
CONFIDENCE = 0.95
FEW_SEEDS = 5  # under this many paired seeds the caption warns that the interval is rough
COLUMNS = ["dataset", "method", "Avg", "Avg std", "Worst", "Worst std", "val", "val std", "seeds finished",
           "seeds asked", "train group labels", "selection group labels", "trials complete", "trials pruned",
           "trials failed", "compute (s)"]
CONTRAST_COLUMNS = ["dataset", "comparison", "paired seeds", "Worst diff (pp)", "95% CI low", "95% CI high"]


def untrained(r: StudyResult) -> str | None:
    """Why a row's model is no trained baseline, or None: in every seed it predicts a single class (test worst-class
    accuracy 0), or its selected epoch is the method's first own epoch (training never improved on it). Such a
    row flatters every method compared with it. Not flagged: a model of the spurious attribute — val worst-group 0
    with a train-weighted val average of at least 90% (texdigits' ERM from its first epoch on): it is trained, and
    the comparisons against it are real."""
    runs = r.runs()
    if not runs:
        return None
    if all(t.user_attrs.get("test", {}).get("worst_class") == 0 for t in runs):
        return "predicts a single class"
    if all(t.user_attrs["val"]["wga"] == 0 and t.user_attrs["val"].get("avg_train_weighted", 0) >= 0.9 for t in runs):
        return None
    if all(t.user_attrs.get("best_epoch") == t.user_attrs.get("first_own_epoch", 1) for t in runs):
        return "its best epoch is its first"
    return None


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
            row["Avg"], row["Avg std"] = _pct([t.user_attrs["test"][key] for t in runs])
            row["Worst"], row["Worst std"] = _pct([t.user_attrs["test"]["wga"] for t in runs])
            row["val"], row["val std"] = _pct([t.value for t in runs])
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS).round(1)


def t_interval(diffs, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t confidence interval (n - 1 degrees of freedom)."""
    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return mean, mean - half, mean + half


def comparisons(results: list[StudyResult]) -> list[tuple[StudyResult, StudyResult]]:
    """(a, b) pairs for a − b: the proposed method minus every other, then every other method minus the control."""
    pairs = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        rows = [r for r in results if r.dataset == dataset]
        pairs += [(p, o) for p in rows if p.cls.card.proposed for o in rows if o is not p]
        pairs += [(o, c) for c in rows if c.cls.card.control for o in rows
                  if o is not c and not o.cls.card.proposed and not o.cls.card.control]
    return pairs


def _r(v: float) -> float:
    return round(v, 1) + 0.0  # + 0.0: no "-0.0" in a table


def paired_diffs(a: StudyResult, b: StudyResult) -> list[float]:
    """Test worst-group differences a − b (pp), paired by training seed over the seeds both rows finished."""
    mine = {t.user_attrs["seed"]: t.user_attrs["test"]["wga"] for t in a.runs()}
    theirs = {t.user_attrs["seed"]: t.user_attrs["test"]["wga"] for t in b.runs()}
    return [100 * (mine[s] - theirs[s]) for s in sorted(set(mine) & set(theirs))]


def contrasts(results: list[StudyResult]) -> pd.DataFrame:
    """Test worst-group differences (pp), paired by training seed over the seeds both rows finished."""
    rows = []
    for a, b in comparisons(results):
        diffs = paired_diffs(a, b)
        if len(diffs) < 2:
            continue
        mean, lo, hi = t_interval(diffs)
        rows.append({"dataset": a.dataset, "comparison": f"{a.label} − {b.label}", "paired seeds": len(diffs),
                     "Worst diff (pp)": _r(mean), "95% CI low": _r(lo), "95% CI high": _r(hi)})
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def decided(lo: float, hi: float) -> str:
    """What a confidence interval of a difference says: 'better' (above 0), 'worse' (below 0) or 'undecided'."""
    return "better" if lo > 0 else "worse" if hi < 0 else "undecided"


def verdict(a: StudyResult, b: StudyResult) -> str:
    """'better (+12.3)', 'worse (−4.0)' or 'undecided (+1.2)': where the 95% interval of the paired worst-group
    difference a − b lies; 'n/a' under 2 paired seeds."""
    diffs = paired_diffs(a, b)
    if len(diffs) < 2:
        return "n/a"
    mean, lo, hi = t_interval(diffs)
    return f"{decided(lo, hi)} ({_r(mean):+.1f})".replace("-", "−")


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
    worst = {(r.dataset, r.method): _pct([t.user_attrs["test"]["wga"] for t in r.runs()])[0]
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
                        "method": [m + (" †" if untrained(r) else "") for m, r in zip(table["method"], results)]})
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
    notes += "".join(f" † {r.dataset}/{r.label}: {why} in every seed — not a trained baseline (check its learning "
                     "rate and epochs); differences against it overstate the other methods."
                     for r in results if (why := untrained(r)))
    return (f"Experiment {exp.name!r} on {', '.join(exp.datasets)}: test accuracy (%). {protocol} "
            f"Avg = {AVG[avg][1]}; Worst = worst-group accuracy. Selection: {exp.selection_text()}; ties: higher "
            f"val average, then fewer epochs; early-stopping patience {patience} epochs. Trials: a retried trial "
            "counts once; failed trials never enter the table. Compute: train seconds of every trial of the "
            f"search and the seed phase.{notes}")


def contrast_caption(diffs: pd.DataFrame) -> str:
    few = (f" Fewer than {FEW_SEEDS} paired seeds in some rows: the interval rests on very few differences."
           if len(diffs) and diffs["paired seeds"].min() < FEW_SEEDS else "")
    return ("Mean test worst-group difference of each comparison (first method − second, percentage points) over the "
            f"seeds both finished, paired by training seed, with its {CONFIDENCE:.0%} Student-t interval.{few}")


def _shown(exp, results, avg: str) -> pd.DataFrame:
    return display(exp, summary(exp, results, avg), results)


def sections(results) -> list[tuple[str, list[StudyResult]]]:
    """[(dataset, its rows)]: one table per dataset."""
    return [(d, [r for r in results if r.dataset == d]) for d in datasets_of(results)]


def render_markdown(exp, results, avg: str) -> str:
    out, several = f"{caption(exp, results, avg)}\n", len(datasets_of(results)) > 1
    for dataset, rows in sections(results):
        if several:
            out += f"\n#### {dataset}\n"
        out += f"\n{_shown(exp, rows, avg).to_markdown(index=False, disable_numparse=True)}\n"  # "58.0", not "58"
        diffs = contrasts(rows)
        if len(diffs):
            out += f"\n{contrast_caption(diffs)}\n\n{diffs.to_markdown(index=False, floatfmt='.1f')}\n"
        anchors = anchor_table(dataset, rows)
        if anchors is not None:
            out += f"\n{anchor_caption(dataset)}\n\n{anchors.to_markdown(index=False, disable_numparse=True)}\n"
    bench = benchmark_summary(results)
    if len(bench):
        table = bench.to_markdown(index=False, disable_numparse=True)
        out += f"\n#### across benchmarks\n\n{BENCHMARK_CAPTION}\n\n{table}\n"
    return out


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


_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell that starts with one as a formula


def _inert(value):
    """A text cell a spreadsheet shows as text (OWASP's CSV injection rule: a leading quote); numbers unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA) else value


def _csv(table: pd.DataFrame) -> str:
    """CSV that pandas.read_csv reads as numbers, not text, and in which no text cell is a formula."""
    return table.map(_inert).to_csv(index=False)


def render_csv(exp, results, avg: str) -> str:
    """The tidy table as CSV."""
    return _csv(tidy(exp, results, avg))


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_UNICODE = {"±": r"$\pm$", "−": "$-$", "†": r"\dag{}", "×": r"$\times$", "—": "---", "–": "--", "…": r"\dots{}",
                "≥": r"$\geq$", "≤": r"$\leq$", "λ": r"$\lambda$", "ε": r"$\varepsilon$", "ρ": r"$\rho$",
                "η": r"$\eta$", "·": r"$\cdot$"}


def tex_escape(text: str) -> str:
    """Text as LaTeX typesets it: its special characters escaped, the Unicode the report uses as math."""
    return "".join(_TEX_SPECIAL.get(c) or _TEX_UNICODE.get(c, c) for c in str(text))


def _latex_table(df: pd.DataFrame, text: str, label: str) -> str:
    """A booktabs table scaled to the text width (\\usepackage{booktabs,graphicx}), every cell escaped."""
    body = df.map(tex_escape).rename(columns=tex_escape).to_latex(index=False, escape=False)
    label = re.sub(r"[^A-Za-z0-9:._-]", "-", label)
    return (f"\\begin{{table}}\n\\centering\n\\caption{{{tex_escape(text)}}}\n\\label{{{label}}}\n"
            f"\\resizebox{{\\linewidth}}{{!}}{{%\n{body}}}\n\\end{{table}}\n")


def render_latex(exp, results, avg: str) -> str:
    out, several = "", len(datasets_of(results)) > 1
    for dataset, rows in sections(results):
        shown = _shown(exp, rows, avg).rename(columns={"trials (complete/pruned/failed)": "trials (c/p/f)"})
        text = caption(exp, results, avg) + (f" Dataset {dataset}." if several else "")
        out += ("\n" if out else "") + _latex_table(shown, text, f"tab:{exp.name}-{dataset}" if several
                                                     else f"tab:{exp.name}")
        diffs = contrasts(rows)
        if len(diffs):
            cells = diffs.astype(object).map(lambda v: f"{v:.1f}" if isinstance(v, float) else v)
            out += "\n" + _latex_table(cells, contrast_caption(diffs), f"tab:{exp.name}-{dataset}-ci" if several
                                       else f"tab:{exp.name}-ci")
        anchors = anchor_table(dataset, rows)
        if anchors is not None:
            out += "\n" + _latex_table(anchors, anchor_caption(dataset), f"tab:{exp.name}-{dataset}-published")
    bench = benchmark_summary(results)
    if len(bench):
        out += "\n" + _latex_table(bench, BENCHMARK_CAPTION, f"tab:{exp.name}-benchmarks")
    return out


def _html_parts(exp, results, avg: str, with_js: bool) -> list[str]:
    parts, several = [f"<h1>Experiment {html.escape(exp.name)}</h1>",
                      f"<p>{html.escape(caption(exp, results, avg))}</p>"], len(datasets_of(results)) > 1
    for dataset, rows in sections(results):
        if several:
            parts.append(f"<h2>{html.escape(dataset)}</h2>")
        parts.append(_shown(exp, rows, avg).to_html(index=False, border=0, classes="table"))
        diffs = contrasts(rows)
        if len(diffs):
            parts += [f"<p>{html.escape(contrast_caption(diffs))}</p>", diffs.to_html(index=False, border=0)]
        anchors = anchor_table(dataset, rows)
        if anchors is not None:
            parts += [f"<p>{html.escape(anchor_caption(dataset))}</p>", anchors.to_html(index=False, border=0)]
    figs = list(figures(results, avg, exp.selection).values())
    bench = benchmark_summary(results)
    if len(bench):
        parts += ["<h2>across benchmarks</h2>", f"<p>{html.escape(BENCHMARK_CAPTION)}</p>",
                  bench.to_html(index=False, border=0)]
        figs.insert(0, benchmark_figure(results))
    for i, fig in enumerate(figs):  # plotly.js inlined once: the file works offline
        parts.append(fig.to_html(full_html=False, include_plotlyjs=with_js and i == 0, default_width="100%"))
    return parts


def _page(title: str, parts: list[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{padding:2px 10px;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)} report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def render_html(exp, results, avg: str) -> str:
    return _page(exp.name, _html_parts(exp, results, avg, with_js=True))


def render(fmt: str, reports: list[tuple], avg: str) -> str:
    """The report of one or several experiments [(exp, results)], side by side: one after another (CSV: one tidy
    table, its `experiment` column telling them apart; HTML: one page)."""
    if fmt == "csv":
        return _csv(pd.concat([tidy(exp, results, avg) for exp, results in reports]))
    if fmt == "html":
        return _page(", ".join(exp.name for exp, _ in reports),
                     [part for i, (exp, results) in enumerate(reports)
                      for part in _html_parts(exp, results, avg, with_js=i == 0)])
    return "\n".join(RENDER[fmt](exp, results, avg) for exp, results in reports)


SUFFIXES = {".md": "markdown", ".csv": "csv", ".tex": "latex", ".html": "html", ".htm": "html"}
RENDER = {"markdown": render_markdown, "csv": render_csv, "latex": render_latex, "html": render_html}


REPORT_MARK: dict[str, str | tuple[str, ...]] = {
    "markdown": "Experiment ", "csv": ("experiment,table,", "dataset,method,"),  # this layout, the last
    "latex": "\\begin{table}", "html": "<!DOCTYPE html>"}


def check_outputs(paths: list[str], fmt: str | None, storage) -> list[tuple[Path, str]]:
    """(path, format) for every --out, refusing before anything is written: an unknown suffix, the storage file
    itself, a folder, or an existing file that is not a report of this format (never overwritten)."""
    db = storage.engine.url.database if storage.engine.dialect.name == "sqlite" else None
    out = []
    for path in map(Path, paths):
        f = fmt or SUFFIXES.get(path.suffix.lower())
        if f is None:
            raise ValueError(f"--out {path}: cannot tell the format from {path.suffix!r}; give --format")
        if db and path.resolve() == Path(db).resolve():
            raise ValueError(f"--out {path}: that is the storage itself; not overwritten")
        if path.is_dir():
            raise ValueError(f"--out {path}: is a folder")
        if not path.parent.is_dir():  # checked for every --out before the first is written
            raise ValueError(f"--out {path}: no folder {str(path.parent)!r}")
        if path.exists():
            try:
                head = path.read_text(errors="strict")[:200]
            except (UnicodeDecodeError, OSError):
                head = ""
            if not head.startswith(REPORT_MARK[f]):
                raise ValueError(f"--out {path}: exists and is not a {f} report; not overwritten")
        out.append((path, f))
    return out


def to_dashboard(storage, experiment: str, avg: str) -> int:
    """Saves each study's figures into the study for optuna-dashboard (same ids: a rerun replaces them)."""
    import optuna
    from optuna_dashboard import save_plotly_graph_object

    exp, results = collect(storage, experiment)
    n = 0
    for r in results:
        study = optuna.load_study(study_name=r.name, storage=storage)
        for key, fig in figures([x for x in results if x.dataset == r.dataset], avg, exp.selection).items():
            save_plotly_graph_object(study, fig, graph_object_id=f"report-{key}")
            n += 1
    return n


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True,
                   help="the experiment, or several comma-separated (their reports side by side)")
    p.add_argument("--storage", help="storage URL (default: $OPTUNA_STORAGE or sqlite:///studies.db)")
    p.add_argument("--storage-file", help="a file holding the storage URL, readable only by you (chmod 600); "
                                          "also $OPTUNA_STORAGE_FILE")
    p.add_argument("--format", choices=FORMATS,
                   help="output format (default: from each --out suffix .md/.csv/.tex/.html, else markdown)")
    p.add_argument("--out", action="append", default=[],
                   help="write to this file instead of standard output (repeatable: --out r.html --out r.md)")
    p.add_argument("--avg", choices=list(AVG), default="train_weighted",
                   help="Avg definition: train_weighted (Waterbirds convention) or plain test accuracy")
    p.add_argument("--to-dashboard", action="store_true",
                   help="also save the figures into each study for optuna-dashboard")
    return p


def main(argv=None) -> int:
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from .storage import INTERACTIVE_TIMEOUT, StorageError, from_flags, make_storage
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    args = get_args_parser().parse_args(argv)
    try:
        url, _ = from_flags(args.storage, args.storage_file)
        storage = make_storage(url, default_timeout=INTERACTIVE_TIMEOUT, read_only=True)
        outs = check_outputs(args.out, args.format, storage)  # every --out is checked before any is written
        names = list(dict.fromkeys(args.experiment.split(",")))
        reports = [collect(storage, name) for name in names]
        if not args.out:
            sys.stdout.write(render(args.format or "markdown", reports, args.avg))
        for out, fmt in outs:
            write_atomically(out, render(fmt, reports, args.avg))
            print(f"wrote the {fmt} report of {', '.join(map(repr, names))} to {out}", file=sys.stderr)
        if args.to_dashboard:
            n = sum(to_dashboard(storage, name, args.avg) for name in names)
            print(f"saved {n} figures into the studies for optuna-dashboard", file=sys.stderr)
    except (ValueError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
