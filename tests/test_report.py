"""The report: a study filled with known trials gives exactly the committed table, in every format."""
import csv
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from study.experiment import Experiment, init_experiment
from study.statistics import t_interval
from study.results import collect
from study.storage import make_storage

GOLDEN = Path(__file__).parent / "golden"
DIST = {"lr": FloatDistribution(1e-3, 1e-1, log=True)}


def _groups(wga, best=0.99):
    return [{"group": 0, "acc": best, "count": 50}, {"group": 1, "acc": wga, "count": 10},
            {"group": 2, "acc": wga + 0.05, "count": 10}, {"group": 3, "acc": best, "count": 50}]


SCHEMA = {"written": None}  # the record schema `_trial` writes: None, as versions before it was stored wrote them


def _trial(state, value=None, *, val_avg=0.9, test=None, epochs=4, seed=0, lr=0.01, attrs=None,
           system_attrs=None, share=False):
    """A finished trial as a worker records it; `test` = (wga, avg_plain, avg_train_weighted)."""
    attrs = {"epochs_run": epochs, "train_seconds": 10.0 * epochs, "seed": seed, **(attrs or {})}
    if SCHEMA["written"] is not None:
        attrs["schema"] = SCHEMA["written"]
    if state == TrialState.COMPLETE:
        wga, plain, tw = test
        attrs.update(val={"wga": value, "avg_plain": val_avg, "avg_train_weighted": val_avg},
                     test={"wga": wga, "avg_plain": plain, "avg_train_weighted": tw, "groups": _groups(wga)},
                     best_epoch=epochs)
    if state == TrialState.FAIL:
        attrs["fail_reason"] = "NonFiniteLossError: training loss became non-finite in epoch 2"
    if share:
        attrs["lambda_share"] = [None] + [[0.45, 0.05, 0.05, 0.45]] * (epochs - 1)
        attrs.update(lambda_enrichment=[None] + [4.5] * (epochs - 1), at_cap_frac=[None] + [0.25] * (epochs - 1),
                     at_zero_frac=[None] + [0.1] * (epochs - 1))
    curve = {e: (value or 0.3) * e / epochs for e in range(1, epochs + 1)}
    return create_trial(state=state, value=value, params={"lr": lr}, distributions=DIST, user_attrs=attrs,
                        system_attrs=system_attrs or {}, intermediate_values=curve)


C, P, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL


def fill(storage, name="gold", methods=("erm", "groupdro", "fim"), seed_phase=True):
    """Search — ERM: a val tie broken by val average, a pruned and a failed trial. DRO: a failed trial retried to
    completion (counted once). Ours: one complete and one pruned trial.
    Seed phase (top 2, 3 seeds, the searched run = seed 0) — ERM: rank 2 has the better mean val (0.60 vs 0.54) and
    is selected. DRO: rank 1 (mean val 0.845 over 2 finished seeds) beats rank 2 (0.74); its seed 2 failed.
    Ours: one configuration."""
    exp = Experiment.of(name=name, datasets=["synthetic"], methods=list(methods), trials=4, epochs=4)
    init_experiment(storage, exp, check_data=False)
    S = {m: optuna.load_study(study_name=f"{name}/synthetic/{m}", storage=storage) for m in methods}
    X = {m: optuna.load_study(study_name=f"{name}/synthetic/{m}/seeds", storage=storage) for m in methods}
    def add(m, t):
        S[m].add_trial(t)
        return S[m].trials[-1].number

    erm2 = add("erm", _trial(C, 0.60, val_avg=0.95, test=(0.55, 0.97, 0.96), lr=0.01))
    erm1 = add("erm", _trial(C, 0.60, val_avg=0.96, test=(0.58, 0.975, 0.965), lr=0.02))  # wins the tie
    add("erm", _trial(P, 0.20, epochs=2))
    add("erm", _trial(F, epochs=1))
    dro2 = add("groupdro", _trial(C, 0.80, test=(0.82, 0.92, 0.93)))
    failed = add("groupdro", _trial(F, epochs=2))
    dro1 = add("groupdro", _trial(C, 0.85, test=(0.86, 0.91, 0.92),
                                  system_attrs={"failed_trial": failed, "retry_history": [failed]}))
    ours1 = add("fim", _trial(C, 0.78, test=(0.79, 0.96, 0.955), share=True))
    add("fim", _trial(P, 0.1, epochs=1))
    if seed_phase:
        runs = {  # method: [(config trial, rank, seed, state, val, test wga, test avg_train_weighted)]
            "erm": [(erm1, 1, 1, C, 0.50, 0.52, 0.95), (erm1, 1, 2, C, 0.52, 0.50, 0.95),
                    (erm2, 2, 1, C, 0.62, 0.61, 0.94), (erm2, 2, 2, C, 0.58, 0.57, 0.95)],
            "groupdro": [(dro1, 1, 1, C, 0.84, 0.84, 0.93), (dro1, 1, 2, F, None, None, None),
                         (dro2, 2, 1, C, 0.70, 0.70, 0.90), (dro2, 2, 2, C, 0.72, 0.72, 0.90)],
            "fim": [(ours1, 1, 1, C, 0.80, 0.80, 0.95), (ours1, 1, 2, C, 0.75, 0.74, 0.96)],
        }
        for m in methods:
            for config, rank, seed, state, val, wga, tw in runs[m]:
                X[m].add_trial(_trial(state, val, test=(wga, 0.95, tw), seed=seed, epochs=4 if state == C else 2,
                                      attrs={"config": config, "rank": rank}))
    return exp


@pytest.fixture
def storage(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = make_storage(f"sqlite:///{tmp_path / 'r.db'}")
    return s, f"sqlite:///{tmp_path / 'r.db'}"


def report(url, *args):
    from conftest import study_main
    return study_main("report", "--storage", url, *args)


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row (header and separator lines left out)."""
    rows = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|:")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    return [c for c in cells if c[0] != "dataset"]


# Written by hand from the trial values in `fill` (see its docstring), not from the report's output.
SEARCH_ROWS = [
    ["synthetic", "ERM", "96.5", "58.0", "60.0", "1/1", "no", "yes", "2/1/1", "110"],
    ["synthetic", "DRO", "92.0", "86.0", "85.0", "1/1", "yes", "yes", "2/0/0", "100"],
    ["synthetic", "Ours", "95.5", "79.0", "78.0", "1/1", "no", "yes", "1/1/0", "50"],
]
SEEDED_ROWS = [  # ERM: rank 2's seeds 0/1/2 = worst 55/61/57, avg 96/94/95, val 60/62/58
    ["synthetic", "ERM", "95.0 ± 1.0", "57.7 ± 3.1", "60.0 ± 2.0", "3/3", "no", "yes", "2/1/1", "270"],
    ["synthetic", "DRO", "92.5 ± 0.7", "85.0 ± 1.4", "84.5 ± 0.7", "2/3 (1 failed)", "yes", "yes", "2/0/0", "240"],
    ["synthetic", "Ours", "95.5 ± 0.5", "77.7 ± 3.2", "77.7 ± 2.5", "3/3", "no", "yes", "1/1/0", "130"],
    # paired seeds: Ours − ERM 24/19/17 (t(0.975, 2) = 4.3027); Ours − DRO −7/−4; DRO − ERM 31/23 (t(0.975, 1) = 12.706)
    ["synthetic", "Ours − ERM", "3", "20.0", "11.0", "29.0"],
    ["synthetic", "Ours − DRO", "2", "-5.5", "-24.6", "13.6"],
    ["synthetic", "DRO − ERM", "2", "27.0", "-23.8", "77.8"],
]


@pytest.mark.parametrize("seed_phase", [False, True], ids=["search", "seed-phase"])
def test_golden_markdown(storage, seed_phase):
    s, url = storage
    fill(s, seed_phase=seed_phase)
    p = report(url, "--experiment", "gold")
    assert p.returncode == 0, p.stderr
    assert markdown_rows(p.stdout) == (SEEDED_ROWS if seed_phase else SEARCH_ROWS)
    header = next(line for line in p.stdout.splitlines() if line.startswith("| dataset"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "dataset", "method", "Avg", "Worst", "val_wga", "seeds", "train group labels", "selection group labels",
        "trials (complete/pruned/failed)", "compute (s)"]
    if seed_phase:
        assert "top 2 configurations by val_wga re-run with 3 training seeds" in p.stdout
        assert "Fewer than 5 paired seeds" in p.stdout
    else:
        assert "1 seed (seed 0)" in p.stdout


@pytest.mark.parametrize("schema", [None, 2], ids=["records-before-the-schema", "schema-2"])
def test_golden_csv(storage, schema, monkeypatch):
    """The same report from the records of earlier versions (read through the migration) as from this one's."""
    s, url = storage
    monkeypatch.setitem(SCHEMA, "written", schema)
    fill(s)
    p = report(url, "--experiment", "gold", "--format", "csv")
    assert p.returncode == 0, p.stderr
    assert p.stdout == (GOLDEN / "report_seed_phase.csv").read_text()


def test_seed_phase_selects_the_best_mean_among_the_top_k(storage):
    s, _ = storage
    fill(s)
    _, results = collect(s, "gold")
    erm, dro, ours = results
    assert [r.label for r in results] == ["ERM", "DRO", "Ours"]
    assert erm.search_best.params["lr"] == 0.02  # the search's best, by the val-average tie-break
    assert erm.selected.rank == 2 and erm.best.params["lr"] == 0.01  # but rank 2 has the better mean over seeds
    assert [t.seed for t in erm.runs()] == [0, 1, 2]
    assert dro.selected.rank == 1 and (dro.selected.asked, len(dro.runs()), dro.selected.failed) == (3, 2, 1)
    assert (erm.count(C), erm.count(P), erm.count(F)) == (2, 1, 1)
    assert dro.count(F) == 0 and dro.search_best.value == 0.85  # the retried failure counts once
    assert dro.compute_s == pytest.approx(10 * (4 + 2 + 4) + 10 * (4 + 2 + 4 + 4))  # failed attempts included


def test_t_interval_against_hand_computed_values():
    # d = 24, 19, 17: mean 20, sd sqrt(13), se sqrt(13/3) = 2.0817; t(0.975, 2) = 4.302653 -> half width 8.9567
    mean, lo, hi = t_interval([24.0, 19.0, 17.0])
    assert mean == pytest.approx(20.0)
    assert lo == pytest.approx(11.0433, abs=1e-3) and hi == pytest.approx(28.9567, abs=1e-3)
    # two differences: t(0.975, 1) = 12.7062, sd of (-7, -4) = 2.1213, se 1.5 -> half 19.059
    assert t_interval([-7.0, -4.0]) == pytest.approx((-5.5, -24.559, 13.559), abs=1e-3)
    # at 3 seeds a percentile bootstrap would claim (17.0, 24.0) at most; the t interval is honest and wider
    assert hi - lo > 24.0 - 17.0


def test_avg_plain_switches_the_definition(storage):
    s, url = storage
    fill(s, seed_phase=False)
    tw, plain = report(url, "--experiment", "gold"), report(url, "--experiment", "gold", "--avg", "plain")
    assert "| ERM      | 96.5 " in tw.stdout and "| ERM      | 97.5 " in plain.stdout
    assert "weighted by training-set group proportions" in tw.stdout and "plain test accuracy" in plain.stdout


def test_csv_and_latex_carry_the_same_numbers(storage, tmp_path):
    s, url = storage
    fill(s)
    p = report(url, "--experiment", "gold", "--format", "csv", "--out", str(tmp_path / "t.csv"))
    assert p.returncode == 0 and p.stdout == "", p.stderr
    tidy = pd.read_csv(tmp_path / "t.csv")  # one table: pandas reads numbers, not text
    for col in ("Avg", "Worst std", "val", "Worst diff (pp)", "95% CI low", "95% CI high"):
        assert tidy[col].dtype == np.float64, col
    for col in ("seeds finished", "trials complete", "compute (s)", "paired seeds"):
        assert pd.api.types.is_numeric_dtype(tidy[col]), col
    assert tidy.loc[tidy["table"] == "comparisons", "comparison"].tolist() == ["Ours − ERM", "Ours − DRO", "DRO − ERM"]
    assert tidy.loc[tidy["table"] == "comparisons", "paired seeds"].tolist() == [3, 2, 2]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))[:3]
    md = report(url, "--experiment", "gold").stdout
    latex = report(url, "--experiment", "gold", "--format", "latex").stdout
    assert [r["method"] for r in rows] == ["ERM", "DRO", "Ours"]
    for r in rows:
        cell = f"{float(r['Worst']):.1f} ± {float(r['Worst std']):.1f}"
        assert cell in md and cell.replace("±", r"$\pm$") in latex
        assert r["compute (s)"] in md and r["compute (s)"] in latex
    assert r"\begin{tabular}" in latex and r"\caption{" in latex and "Ours $-$ ERM" in latex


def test_html_is_self_contained_with_all_figures(storage, tmp_path):
    s, url = storage
    fill(s)
    out = tmp_path / "r.html"
    p = report(url, "--experiment", "gold", "--format", "html", "--out", str(out))
    assert p.returncode == 0, p.stderr
    page = out.read_text()
    assert page.count('class="plotly-graph-div"') == 5  # history, avg-vs-worst, groups, curves, lambda share
    assert "<script src=" not in page and "Plotly.newPlot" in page  # plotly.js inlined: works offline
    for title in ("Optimization history", "Pareto front", "Per-group test accuracy", "pruned trials dotted",
                  "Lambda share"):
        assert title in page
    assert "<table" in page and "Ours − ERM" in page
    for trace in ("group 0", "enrichment on bias-conflicting", "share at 0", "multipliers (%)"):  # the λ figure
        assert trace in page


def test_figures_into_the_dashboard(storage):
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects  # what the dashboard reads
    s, url = storage
    fill(s)
    for _ in range(2):  # a rerun replaces the figures instead of adding copies
        p = report(url, "--experiment", "gold", "--to-dashboard")
        assert p.returncode == 0, p.stderr
    study = optuna.load_study(study_name="gold/synthetic/fim", storage=s)
    saved = get_plotly_graph_objects(s.get_study_system_attrs(study._study_id))
    assert sorted(saved) == ["report-avg-vs-worst", "report-groups", "report-history", "report-lambda-share",
                             "report-val-curves"]
    fig = json.loads(saved["report-history"])
    assert fig["layout"]["title"]["text"].startswith("Optimization history: val_wga per trial")
    assert fig["layout"]["yaxis"]["title"]["text"] == "val_wga"  # the objective's name and unit, as the dashboard's
    assert fig["layout"]["xaxis"]["tickformat"] == "d" and fig["layout"]["xaxis"]["dtick"] >= 1  # whole trials
    pruned = {t["name"]: t["x"] for t in fig["data"] if t["name"].endswith(" pruned")}
    expected = {f"{r.label} pruned": [t.number for t in r.search if t.state == TrialState.PRUNED]
                for r in collect(s, "gold")[1]}
    assert pruned == expected and sum(map(len, pruned.values())) >= 2  # ERM's and Ours' pruned trials are shown


def test_study_without_finished_trials_and_empty_experiment(storage):
    s, url = storage
    init_experiment(s, Experiment.of(name="empty", datasets=["synthetic"], methods=["erm", "fim"]), check_data=False)
    p = report(url, "--experiment", "empty")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("no finished trial") == 2 and "| 0/0/0 " in p.stdout
    html = report(url, "--experiment", "empty", "--format", "html")
    assert html.returncode == 0 and "no finished trial" in html.stdout


def test_every_method_gets_a_row_with_its_group_label_use(storage):
    from trainer.methods import METHODS
    s, url = storage
    exp = Experiment.of(name="all", datasets=["synthetic"], methods=["all"], trials=2, epochs=4)
    assert exp.methods == list(METHODS)  # --methods all: every registered method
    init_experiment(s, exp, check_data=False)
    for m in ("erm", "dfr", "jtt", "resample", "resample_class"):
        optuna.load_study(study_name=f"all/synthetic/{m}", storage=s).add_trial(
            _trial(C, 0.6, test=(0.5, 0.9, 0.9)))
    p = report(url, "--experiment", "all")
    assert p.returncode == 0, p.stderr
    rows = {r[1]: r for r in markdown_rows(p.stdout) if len(r) == 10}
    assert set(rows) == {c.card.label for c in METHODS.values()}  # every method has its row, finished or not
    assert [rows[label][6] for label in ("ERM", "DFR", "JTT", "ReSample", "ReSample (class)")] == [
        "no", "val split", "no", "yes", "no"]  # train group labels: none, the val split, training
    assert "DFR: its val is the worst-group accuracy on a held-out half of val" in p.stdout


def test_an_untrained_baseline_is_flagged(storage):
    s, url = storage
    init_experiment(s, Experiment.of(name="flat", datasets=["synthetic"], methods=["erm", "fim", "groupdro"], trials=2,
                                     epochs=4), check_data=False)
    study = {m: optuna.load_study(study_name=f"flat/synthetic/{m}", storage=s) for m in ("erm", "fim", "groupdro")}
    # ERM: selected at its first epoch and never better, near chance on val; Ours: trained (best epoch 4 after a
    # 1-epoch warm-up); DRO: a single predicted class (worst-class accuracy 0) at a later epoch
    study["erm"].add_trial(_trial(C, 0.0, val_avg=0.55, test=(0.0, 0.55, 0.9), epochs=1,
                                  attrs={"first_own_epoch": 1}))
    study["fim"].add_trial(_trial(C, 0.7, test=(0.7, 0.9, 0.9), attrs={"first_own_epoch": 2}))
    collapsed = _trial(C, 0.0, test=(0.0, 0.5, 0.5))
    collapsed.user_attrs["test"]["worst_class"] = 0.0
    study["groupdro"].add_trial(collapsed)
    p = report(url, "--experiment", "flat")
    assert p.returncode == 0, p.stderr
    assert [r[1] for r in markdown_rows(p.stdout) if len(r) == 10] == ["ERM †", "DRO †", "Ours"]
    assert "† synthetic/ERM: its best epoch is its first in every seed — not a trained baseline" in p.stdout
    assert "† synthetic/DRO: predicts a single class in every seed" in p.stdout and "† synthetic/Ours" not in p.stdout
    # the caption names the trace scope Ours' selected configuration used: a proxy here, not the paper's quantity
    assert "synthetic/Ours: the selected configuration's scope is logits (the paper's quantity is the full scope" \
        in p.stdout


@pytest.mark.parametrize("pretrained", [True, False])
def test_a_first_epoch_model_is_untrained_only_from_scratch(storage, pretrained):
    """One epoch of fine-tuning leaves a pretrained model trained (DFR's and ERM's best epoch is often the first
    there); from random weights it is untrained."""
    s, url = storage
    init_experiment(s, Experiment.of(name="f", datasets=["synthetic"], methods=["erm"], trials=2, epochs=4),
                    check_data=False)
    optuna.load_study(study_name="f/synthetic/erm", storage=s).add_trial(_trial(
        C, 0.4, test=(0.4, 0.7, 0.9), epochs=1, attrs={"first_own_epoch": 1, "recipe": {"pretrained": pretrained}}))
    p = report(url, "--experiment", "f")
    assert p.returncode == 0, p.stderr
    assert [r[1] for r in markdown_rows(p.stdout) if len(r) == 10] == ["ERM" if pretrained else "ERM †"]


def test_a_model_of_the_spurious_attribute_is_a_trained_baseline(storage):
    s, url = storage
    init_experiment(s, Experiment.of(name="shortcut", datasets=["synthetic"], methods=["erm"], trials=1, epochs=4),
                    check_data=False)
    # val worst-group 0 at its first epoch, 95% train-weighted: it learned the attribute, not nothing
    optuna.load_study(study_name="shortcut/synthetic/erm", storage=s).add_trial(
        _trial(C, 0.0, val_avg=0.95, test=(0.0, 0.5, 0.95), epochs=1, attrs={"first_own_epoch": 1}))
    p = report(url, "--experiment", "shortcut")
    assert [r[1] for r in markdown_rows(p.stdout) if len(r) == 10] == ["ERM"] and "†" not in p.stdout


def test_unknown_experiment_is_one_line_error(storage, tmp_path):
    s, url = storage
    fill(s, seed_phase=False)
    out = tmp_path / "nope.md"
    p = report(url, "--experiment", "nope", "--out", str(out))
    assert p.returncode == 2 and p.stdout == "" and not out.exists()
    assert p.stderr.strip().count("\n") == 0 and "'nope'" in p.stderr


def test_seed_phase_end_to_end_with_real_workers(pg_url):
    from conftest import start_worker, study_main
    p = study_main("init", "--storage", pg_url, "--experiment", "seeds", "--datasets", "synthetic", "--methods",
                  "erm,fim", "--trials", "2", "--epochs", "2", "--pruner", "none")
    assert p.returncode == 0, p.stderr
    early = study_main("replicate", "--storage", pg_url, "--experiment", "seeds", "--seeds", "3")
    assert early.returncode == 2 and "search not finished" in early.stderr  # nothing enqueued before the end
    assert start_worker(pg_url, "seeds").wait(timeout=300) == 0
    p = study_main("replicate", "--storage", pg_url, "--experiment", "seeds", "--seeds", "3", "--top-k", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("enqueued 4 seed-phase runs: #1 seed 1, #1 seed 2, #2 seed 1, #2 seed 2") == 2, p.stdout
    again = study_main("replicate", "--storage", pg_url, "--experiment", "seeds", "--seeds", "3", "--top-k", "2")
    assert again.stdout.count("enqueued 0 seed-phase runs (all present)") == 2  # idempotent
    w = start_worker(pg_url, "seeds")
    assert w.wait(timeout=300) == 0, w.stdout.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = make_storage(pg_url)
        _, results = collect(s, "seeds")
    for r in results:
        assert [c.rank for c in r.configs] == [1, 2]
        for c in r.configs:
            assert [t.seed for t in c.runs()] == [0, 1, 2]
            assert all(t.params == c.searched.params and len(t.intermediate_values) == 2 for t in c.reruns)
        assert len(r.search) == 2  # seed-phase runs stay outside the search budget and its study
        seeds_study = optuna.load_study(study_name=f"{r.name}/seeds", storage=s)
        assert len(seeds_study.trials) == 4 and seeds_study.metric_names == ["val_wga"]
    md = report(pg_url, "--experiment", "seeds").stdout
    assert "Ours − ERM" in md and " ± " in md and "| 3/3 " in md


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no LaTeX engine (Debian: texlive-latex-recommended)")
def test_latex_compiles_and_fits_the_page(storage, tmp_path):
    s, url = storage
    fill(s)
    fill_benchmarks(s)  # one table per dataset, the summary across them
    latex = report(url, "--experiment", "gold,cross", "--format", "latex").stdout
    assert r"val\_wga" in latex and r"\%" in latex and r"\resizebox{\linewidth}" in latex
    assert r"\label{tab:cross-benchmarks}" in latex and "worse ($-$31.0)" in latex
    doc = tmp_path / "r.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs,graphicx}\n"
                   f"\\begin{{document}}\n{latex}\\end{{document}}\n")
    p = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and (tmp_path / "r.pdf").stat().st_size > 0, p.stdout[-2000:]
    assert "Overfull \\hbox" not in p.stdout, p.stdout[-2000:]


def test_several_experiments_side_by_side(storage, tmp_path):
    s, url = storage
    fill(s)
    fill(s, name="other", seed_phase=False)
    one = report(url, "--experiment", "gold").stdout
    both = report(url, "--experiment", "gold,other")
    assert both.returncode == 0, both.stderr
    assert both.stdout.startswith(one) and "Experiment 'other'" in both.stdout  # gold's report unchanged, then other's
    p = report(url, "--experiment", "gold,other", "--out", str(tmp_path / "b.csv"),
               "--out", str(tmp_path / "b.html"))
    assert p.returncode == 0, p.stderr
    tidy = pd.read_csv(tmp_path / "b.csv")
    assert tidy.groupby("experiment")["table"].apply(list).to_dict() == {
        "gold": ["results"] * 3 + ["comparisons"] * 3, "other": ["results"] * 3}  # one seed: no interval
    page = (tmp_path / "b.html").read_text()
    assert page.count("<h1>Experiment") == 2 and page.count("<!DOCTYPE html>") == 1
    missing = report(url, "--experiment", "gold,nope")
    assert missing.stderr.strip() == "error: no experiment named 'nope' in this storage"


# Two benchmarks, one configuration per method, seeds 0 (searched), 1 and 2; test worst-group per seed:
CROSS = {"synthetic": {"erm": (0.50, 0.54, 0.52), "groupdro": (0.80, 0.86, 0.83), "fim": (0.60, 0.70, 0.65)},
         "cmnist": {"erm": (0.60, 0.62, 0.70), "groupdro": (0.70, 0.60, 0.68), "fim": (0.64, 0.58, 0.70)}}
# Written by hand from CROSS. Means: synthetic ERM 52, DRO 83, Ours 65 (ranks 3, 1, 2); cmnist ERM 64, DRO 66,
# Ours 64 (ranks 2.5, 1, 2.5: a tie shares its mean rank). Paired differences (pp) with t(0.975, 2) = 4.3027:
# synthetic Ours − ERM 10/16/13: sd 3, half 7.45 -> [5.5, 20.5] better; Ours − DRO −20/−16/−18: sd 2 -> worse;
# DRO − ERM 30/32/31 -> better; cmnist Ours − ERM 4/−4/0: sd 4, half 9.9 -> undecided; DRO − ERM 10/−2/−2: mean 2,
# sd 6.93, half 17.2 -> undecided; Ours − DRO −6/−2/2: mean −2 -> undecided.
GOLDEN_SUMMARY = GOLDEN / "summary_across_benchmarks.md"  # the expected summary, written by hand from the above


def table_cells(text: str) -> list[list[str]]:
    """The cells of every Markdown table line but the separator, header first."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|:")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def fill_benchmarks(storage, name="cross"):
    exp = Experiment.of(name=name, datasets=list(CROSS), methods=["erm", "groupdro", "fim"], trials=1, epochs=4)
    init_experiment(storage, exp, check_data=False)
    for dataset, methods in CROSS.items():
        for m, wgas in methods.items():
            study = optuna.load_study(study_name=f"{name}/{dataset}/{m}", storage=storage)
            study.add_trial(_trial(C, wgas[0], test=(wgas[0], 0.9, 0.9)))
            config = study.trials[-1].number
            seeds = optuna.load_study(study_name=f"{name}/{dataset}/{m}/seeds", storage=storage)
            for seed, wga in enumerate(wgas[1:], start=1):
                seeds.add_trial(_trial(C, wga, test=(wga, 0.9, 0.9), seed=seed, attrs={"config": config, "rank": 1}))
    return exp


def test_summary_across_benchmarks_golden(storage, tmp_path):
    s, url = storage
    fill_benchmarks(s)
    p = report(url, "--experiment", "cross")
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert text.index("#### synthetic") < text.index("#### cmnist") < text.index("#### across benchmarks")
    expected = table_cells(GOLDEN_SUMMARY.read_text())
    assert table_cells(text[text.index("#### across benchmarks"):]) == expected
    # one table per dataset, each with its own rows only
    tables = [text[text.index(f"#### {d}"):] for d in CROSS]
    for d, part in zip(CROSS, tables):
        rows = [r for r in markdown_rows(part.split("####")[1]) if r[0] in CROSS]
        assert [r[0] for r in rows[:3]] == [d] * 3
    # the CSV carries the same verdicts, the HTML the table and the figure
    csv_text = report(url, "--experiment", "cross", "--format", "csv").stdout
    bench = pd.read_csv(io.StringIO(csv_text)).query("table == 'benchmarks'")
    assert bench["vs DRO synthetic"].tolist() == [r[7] for r in expected[1:]]
    html_text = report(url, "--experiment", "cross", "--format", "html").stdout
    assert "across benchmarks" in html_text and "Worst-group accuracy across benchmarks" in html_text


def test_published_anchors_stay_apart_from_measured_rows(storage):
    s, url = storage
    exp = Experiment.of(name="wb", datasets=["texdigits"], methods=["erm", "groupdro"], trials=1, epochs=4)
    init_experiment(s, exp, check_data=False)
    for m, wga in (("erm", 0.30), ("groupdro", 0.60)):
        optuna.load_study(study_name=f"wb/texdigits/{m}", storage=s).add_trial(_trial(C, wga, test=(wga, 0.8, 0.9)))
    text = report(url, "--experiment", "wb").stdout
    measured, published = text.split("Published anchors for texdigits")
    assert [r[:4] for r in markdown_rows(measured)] == [["texdigits", "ERM", "90.0", "30.0"],
                                                         ["texdigits", "DRO", "90.0", "60.0"]]
    assert "72.6" not in measured
    rows = [r for r in markdown_rows(published) if r[0] != "published (not measured here)"]
    assert rows == [["ERM", "97.3", "60.0", "the paper's Waterbirds table"],
                    ["DRO", "93.2", "86.0", "the paper's Waterbirds table"],
                    ["ERM", "97.3", "72.6", "Liu et al. 2021 (JTT paper), early stopping on val worst-group"],
                    ["DRO", "93.5", "91.4", "Sagawa et al. 2020 (GroupDRO), strong L2"]]  # only the methods it ran
    tidy = pd.read_csv(io.StringIO(report(url, "--experiment", "wb", "--format", "csv").stdout))
    assert set(tidy.loc[tidy["table"] == "results", "Worst"]) == {30.0, 60.0}
    assert tidy.loc[tidy["table"] == "published", "source"].notna().all()


# Reliability round three, 16: odd trial records (edited by hand, enqueued from the dashboard, another tool's) are
# left out of the tables and the figures, never a crash; the report of the good ones is unchanged.
def test_odd_trial_records_are_left_out_never_a_crash(storage, tmp_path):
    from conftest import study_main
    s, url = storage
    fill(s)
    before = report(url, "--experiment", "gold")
    assert before.returncode == 0, before.stderr
    erm = optuna.load_study(study_name="gold/synthetic/erm", storage=s)
    seeds = optuna.load_study(study_name="gold/synthetic/erm/seeds", storage=s)
    odd = [_trial(C, 0.99, test=(0.9, 0.9, 0.9), attrs={"train_seconds": float("inf")}),
           _trial(C, 0.99, test=(0.9, 0.9, 0.9), attrs={"train_seconds": "ten"}),
           _trial(C, 0.99, test=(0.9, 0.9, 0.9))]
    odd[0].user_attrs["val"] = "a string"
    del odd[1].user_attrs["test"]
    odd[2].user_attrs["test"]["wga"] = "high"
    for t in odd:
        erm.add_trial(t)
    seeds.add_trial(_trial(C, 0.99, test=(0.9, 0.9, 0.9)))  # a seed-phase trial without `config`
    seeds.enqueue_trial({"lr": 0.05})  # enqueued by hand
    after = report(url, "--experiment", "gold")
    assert after.returncode == 0 and "Traceback" not in after.stderr, after.stderr
    # the same rows; the odd trials count as complete trials, their seconds where they are numbers (2 x 40 s; inf
    # and "ten" as none)
    old, new = markdown_rows(before.stdout)[:3], markdown_rows(after.stdout)[:3]
    assert new[1:] == old[1:] and new[0][:8] == old[0][:8] and new[0][8:] == ["5/1/1", str(int(old[0][9]) + 80)]
    for cmd in (["status", "--experiment", "gold"], ["list"]):
        p = study_main(*cmd, "--storage", url)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (cmd, p.stderr)
    html = report(url, "--experiment", "gold", "--out", str(tmp_path / "r.html"))
    assert html.returncode == 0, html.stderr


def test_the_collapse_figure_shows_ours_features_and_its_most_predicted_class_per_epoch(storage, tmp_path):
    """A model that collapsed: its val features vanish and it predicts one class from epoch 2 (the trial's history as
    a worker records it for Ours: the loop's val_feature_norm and val_top_class_share)."""
    s, url = storage
    fill(s, name="flat", seed_phase=False)
    collapsed = _trial(C, 0.99, test=(0.0, 0.5, 0.5), attrs={"val_feature_norm": [3.2, 0.0, 0.0, 0.0],
                                                               "val_top_class_share": [0.55, 1.0, 1.0, 1.0],
                                                               "active_accuracy": [None, 0.25, 0.5, 0.5]})
    optuna.load_study(study_name="flat/synthetic/fim", storage=s).add_trial(collapsed)  # Ours' best trial
    out = tmp_path / "r.html"
    p = report(url, "--experiment", "flat", "--format", "html", "--out", str(out))
    assert p.returncode == 0, p.stderr
    page = out.read_text()
    assert "Fitting or flattening" in page and "Ours feature norm" in page and "Ours most predicted class (%)" in page
    from study.figures import collapse
    from study.results import collect
    fig = collapse(collect(s, "flat")[1])
    series = {t.name: [round(v, 9) for v in t.y] for t in fig.data}
    assert series == {"Ours feature norm": [3.2, 0.0, 0.0, 0.0], "Ours most predicted class (%)": [55.0] + [100.0] * 3,
                      "Ours constrained samples' train accuracy (%)": [25.0, 50.0, 50.0]}  # none in the warm-up


@pytest.mark.parametrize("norm, share, why", [
    (0.0, 1.0, "its features collapsed (mean norm < 0.001 on the test split) in 1 of 1 seeds"),
    (2.5, 1.0, "it predicts one class on the test split in 1 of 1 seeds"),
    (2.5, 0.6, None)])
def test_a_selected_model_that_collapsed_in_a_seed_is_marked_with_the_reason(storage, norm, share, why):
    """The table marks (†) a row whose selected models' features vanished, or that predict one class, in any seed
    (the test metrics a worker records: feature_norm, top_class_share; here Ours' selected trial, better on val than
    its other one); a working model is not marked."""
    s, url = storage
    init_experiment(s, Experiment.of(name="c", datasets=["synthetic"], methods=["erm", "fim"], trials=2, epochs=4),
                    check_data=False)
    study = {m: optuna.load_study(study_name=f"c/synthetic/{m}", storage=s) for m in ("erm", "fim")}
    study["erm"].add_trial(_trial(C, 0.6, test=(0.6, 0.8, 0.9)))
    study["erm"].add_trial(_trial(C, 0.5, test=(0.5, 0.8, 0.9), seed=1))
    for value, (n, sh) in ((0.6, (3.0, 0.5)), (0.7, (norm, share))):
        t = _trial(C, value, test=(0.7, 0.8, 0.8))
        t.user_attrs["test"].update(feature_norm=n, top_class_share=sh)
        study["fim"].add_trial(t)
    p = report(url, "--experiment", "c")
    assert p.returncode == 0, p.stderr
    rows = [r[1] for r in markdown_rows(p.stdout) if len(r) == 10]
    assert rows == ["ERM", "Ours †" if why else "Ours"]
    assert (f"† synthetic/Ours: {why} — not a trained baseline" in p.stdout) if why else "†" not in p.stdout
