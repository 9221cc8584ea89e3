"""The report: a study filled with known trials gives exactly the committed table, in every format."""
import csv
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from study.experiment import Experiment, init_experiment
from study.report import collect, paired_bootstrap, render_markdown
from study.storage import make_storage

GOLDEN = Path(__file__).parent / "golden"
DIST = {"lr": FloatDistribution(1e-3, 1e-1, log=True)}


def _groups(wga, best=0.99):
    return [{"group": 0, "acc": best, "count": 50}, {"group": 1, "acc": wga, "count": 10},
            {"group": 2, "acc": wga + 0.05, "count": 10}, {"group": 3, "acc": best, "count": 50}]


def _trial(state, value=None, *, val_avg=0.9, test=None, epochs=4, seed=0, lr=0.01, replicate_of=None,
           system_attrs=None, share=False):
    """A finished trial as a worker records it; `test` = (wga, avg_plain, avg_train_weighted)."""
    attrs = {"epochs_run": epochs, "train_seconds": 10.0 * epochs, "seed": seed}
    if replicate_of is not None:
        attrs["replicate_of"] = replicate_of
    if state == TrialState.COMPLETE:
        wga, plain, tw = test
        attrs.update(val={"wga": value, "avg_plain": val_avg, "avg_train_weighted": val_avg},
                     test={"wga": wga, "avg_plain": plain, "avg_train_weighted": tw, "groups": _groups(wga)},
                     best_epoch=epochs)
    if state == TrialState.FAIL:
        attrs["fail_reason"] = "NonFiniteLossError: training loss became non-finite in epoch 2"
    if share:
        attrs["lambda_share"] = [None] + [[0.45, 0.05, 0.05, 0.45]] * (epochs - 1)
    curve = {e: (value or 0.3) * e / epochs for e in range(1, epochs + 1)}
    return create_trial(state=state, value=value, params={"lr": lr}, distributions=DIST, user_attrs=attrs,
                        system_attrs=system_attrs or {}, intermediate_values=curve)


def fill(storage, name="gold", methods=("erm", "groupdro", "fim"), replicates=True):
    """ERM: a val-WGA tie broken by val average, a pruned and a failed trial. DRO: a failed trial retried to
    completion (counted once). Ours: the best trial plus three seeds for everyone (the bootstrap rows)."""
    exp = Experiment(name=name, datasets=["synthetic"], methods=list(methods), trials=4, epochs=4)
    init_experiment(storage, exp, check_data=False)
    S = {m: optuna.load_study(study_name=f"{name}/synthetic/{m}", storage=storage) for m in methods}
    C, P, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
    add = lambda m, t: S[m].add_trial(t)  # noqa: E731
    add("erm", _trial(C, 0.60, val_avg=0.95, test=(0.55, 0.97, 0.96), lr=0.01))
    add("erm", _trial(C, 0.60, val_avg=0.96, test=(0.58, 0.975, 0.965), lr=0.02))  # wins the tie
    add("erm", _trial(P, 0.20, epochs=2))
    add("erm", _trial(F, epochs=1))
    add("groupdro", _trial(C, 0.80, test=(0.82, 0.92, 0.93)))
    add("groupdro", _trial(F, epochs=2))
    failed = S["groupdro"].trials[-1].number
    add("groupdro", _trial(C, 0.85, test=(0.86, 0.91, 0.925),
                           system_attrs={"failed_trial": failed, "retry_history": [failed]}))
    add("fim", _trial(C, 0.78, test=(0.79, 0.96, 0.955), share=True))
    add("fim", _trial(P, 0.1, epochs=1))
    if replicates:
        wga = {"erm": (0.57, 0.52, 0.61), "groupdro": (0.84, 0.88, 0.86), "fim": (0.80, 0.74, 0.83)}
        for m in methods:
            best = max(S[m].best_trials, key=lambda t: t.user_attrs["val"]["avg_plain"]).number
            for seed, w in enumerate(wga[m], start=1):
                add(m, _trial(C, w + 0.01, test=(w, 0.95, 0.94 + seed / 100), seed=seed, replicate_of=best))
    return exp


@pytest.fixture
def storage(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = make_storage(f"sqlite:///{tmp_path / 'r.db'}")
    return s, f"sqlite:///{tmp_path / 'r.db'}"


def report(url, *args):
    return subprocess.run([sys.executable, "-m", "study.report", "--storage", url, *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("replicates", [False, True], ids=["search", "replicated"])
def test_golden_markdown(storage, replicates):
    s, url = storage
    fill(s, replicates=replicates)
    p = report(url, "--experiment", "gold")
    assert p.returncode == 0, p.stderr
    golden = GOLDEN / f"report_{'replicated' if replicates else 'search'}.md"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(p.stdout)
    assert p.stdout == golden.read_text()


def test_selection_counts_and_seeds(storage):
    s, _ = storage
    fill(s)
    _, results = collect(s, "gold")
    erm, dro, ours = results
    assert [r.label for r in results] == ["ERM", "DRO", "Ours"]
    assert erm.best.params["lr"] == 0.02  # the tie on val WGA is broken by val average
    assert (erm.count(TrialState.COMPLETE), erm.count(TrialState.PRUNED), erm.count(TrialState.FAIL)) == (2, 1, 1)
    assert dro.count(TrialState.FAIL) == 0 and dro.best.value == 0.85  # the retried failure counts once
    assert dro.compute_s == pytest.approx(10 * (4 + 2 + 4) + 3 * 40)  # compute includes the failed attempt
    assert [t.user_attrs["seed"] for t in ours.replicates] == [1, 2, 3]


def test_markdown_replicated_numbers(storage):
    s, _ = storage
    exp = fill(s)
    _, results = collect(s, "gold")
    text = render_markdown(exp, results, "train_weighted")
    ours_worst = 100 * np.array([0.80, 0.74, 0.83])
    assert f"{ours_worst.mean():.1f} ± {ours_worst.std(ddof=1):.1f}" in text
    diff, lo, hi = paired_bootstrap(ours_worst - 100 * np.array([0.57, 0.52, 0.61]))
    assert f" {diff:.1f} |" in text and lo < diff < hi
    assert "Ours − ERM" in text and "Ours − DRO" in text


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    d = rng.normal(5.0, 2.0, size=40)
    mean, lo, hi = paired_bootstrap(d)
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.3 * se) and hi == pytest.approx(mean + 1.96 * se, abs=0.3 * se)
    assert paired_bootstrap([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)


def test_avg_plain_switches_the_definition(storage):
    s, url = storage
    fill(s, replicates=False)
    tw, plain = report(url, "--experiment", "gold"), report(url, "--experiment", "gold", "--avg", "plain")
    assert "| ERM      | 96.5 " in tw.stdout and "| ERM      | 97.5 " in plain.stdout
    assert "weighted by training-set group proportions" in tw.stdout and "plain test accuracy" in plain.stdout


def test_csv_and_latex_carry_the_same_numbers(storage, tmp_path):
    s, url = storage
    fill(s)
    p = report(url, "--experiment", "gold", "--format", "csv", "--out", str(tmp_path / "t.csv"))
    assert p.returncode == 0 and p.stdout == "", p.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
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
    assert json.loads(saved["report-history"])["layout"]["title"]["text"].startswith("Optimization history")


def test_study_without_finished_trials_and_empty_experiment(storage):
    s, url = storage
    init_experiment(s, Experiment(name="empty", datasets=["synthetic"], methods=["erm", "fim"]), check_data=False)
    p = report(url, "--experiment", "empty")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("no finished trial") == 2 and "| 0/0/0 " in p.stdout
    html = report(url, "--experiment", "empty", "--format", "html")
    assert html.returncode == 0 and "no finished trial" in html.stdout


def test_unknown_experiment_is_one_line_error(storage, tmp_path):
    s, url = storage
    fill(s, replicates=False)
    out = tmp_path / "nope.md"
    p = report(url, "--experiment", "nope", "--out", str(out))
    assert p.returncode == 2 and p.stdout == "" and not out.exists()
    assert p.stderr.strip().count("\n") == 0 and "'nope'" in p.stderr


def test_replicate_end_to_end_with_real_workers(pg_url):
    from conftest import start_worker, study_cli
    p = study_cli("init", "--storage", pg_url, "--experiment", "seeds", "--datasets", "synthetic", "--methods",
                  "erm,fim", "--trials", "2", "--epochs", "2")
    assert p.returncode == 0, p.stderr
    early = study_cli("replicate", "--storage", pg_url, "--experiment", "seeds", "--seeds", "2")
    assert early.returncode == 2 and "search not finished" in early.stderr  # nothing enqueued before the end
    assert start_worker(pg_url, "seeds").wait(timeout=300) == 0
    p = study_cli("replicate", "--storage", pg_url, "--experiment", "seeds", "--seeds", "2")
    assert p.returncode == 0 and p.stdout.count("enqueued seeds [1, 2]") == 2, p.stdout + p.stderr
    again = study_cli("replicate", "--storage", pg_url, "--experiment", "seeds", "--seeds", "2")
    assert again.stdout.count("enqueued seeds none") == 2  # idempotent
    w = start_worker(pg_url, "seeds")
    assert w.wait(timeout=300) == 0, w.stdout.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, results = collect(make_storage(pg_url), "seeds")
    for r in results:
        assert [t.user_attrs["seed"] for t in r.replicates] == [1, 2]
        assert all(t.params == r.best.params and len(t.intermediate_values) == 2 for t in r.replicates)
        assert len(r.search) == 2  # replicates stay outside the search budget
    md = report(pg_url, "--experiment", "seeds").stdout
    assert "Ours − ERM" in md and " ± " in md and "| 2       |" in md
