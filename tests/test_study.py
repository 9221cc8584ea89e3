"""The study service against the real PostgreSQL: workers, budgets, crashes, retries, the dashboard."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import start_worker, study_main, worker_here
from study.storage import make_storage

FAST_HEARTBEAT = {"STUDY_HEARTBEAT_INTERVAL": "1", "STUDY_GRACE_PERIOD": "3"}


def storage_for(url, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_storage(url, **kw)


def studies_of(url, experiment):
    s = storage_for(url)
    return {n: optuna.load_study(study_name=n, storage=s)
            for n in optuna.get_all_study_names(s) if n.startswith(experiment + "/")}


def init(url, *args):
    p = study_main("init", "--storage", url, *args)
    assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_three_workers_started_together_meet_every_budget_exactly(pg_url, tmp_path, backend):
    url = pg_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'e.db'}"
    init(url, "--experiment", "e4", "--datasets", "synthetic", "--methods", "erm,groupdro,fim",
         "--trials", "4", "--epochs", "2")
    workers = [start_worker(url, "e4") for _ in range(3)]  # the same moment, right after init
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], outs
    for out in outs:
        assert "Traceback" not in out and "error" not in out.lower(), out
        assert "all budgets met" in out
    for name, study in studies_of(url, "e4").items():
        states = [t.state for t in study.trials]
        if name.endswith("/seeds"):
            assert states == [], name  # the seed phase has not been asked for
            continue
        assert TrialState.RUNNING not in states and TrialState.FAIL not in states and TrialState.WAITING not in states
        assert len(states) == 4, (name, states)  # exactly the budget: no overshoot with several workers
        assert study.metric_names == ["val_wga"]  # the dashboard names the objective
        first = min(study.trials, key=lambda t: t.number)
        assert first.user_attrs.get("reference") is True  # the published recipe runs first
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        t = done[0]
        assert {"val", "test", "best_epoch", "epochs_run", "train_seconds", "device", "code_version",
                "data_checksum", "command", "seed"} <= set(t.user_attrs)
        assert t.user_attrs["command"].startswith("python -m trainer --dataset synthetic")
        assert t.value == t.user_attrs["val"]["wga"]
        assert sorted(t.intermediate_values) == [1, 2][:len(t.intermediate_values)]
        if name.endswith("/fim"):  # the λ log per epoch, None during the warm-up
            for key in ("lambda_share", "lambda_enrichment", "at_cap_frac", "at_zero_frac", "violated_frac"):
                log = t.user_attrs[key]
                assert len(log) == t.user_attrs["epochs_run"] and log[0] is None and log[-1] is not None, (key, log)


def test_ours_over_every_parameter_completes_under_two_workers(pg_url, tmp_path):
    cfg = tmp_path / "full.toml"
    cfg.write_text('name = "full"\ndatasets = ["synthetic"]\nmethods = ["fim"]\ntrials = 3\nepochs = 2\n'
                   '[space.fim]\nscope = ["full"]\n')
    init(pg_url, "--config", str(cfg))
    workers = [start_worker(pg_url, "full") for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    trials = studies_of(pg_url, "full")["full/synthetic/fim"].trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [t.user_attrs.get("fail_reason") for t in trials]
    assert {t.params["scope"] for t in trials} == {"full"}
    for t in trials:  # warm-up epoch unconstrained, the second one constrained on the full-parameter traces
        assert t.user_attrs["violated_frac"][0] is None and 0.0 <= t.user_attrs["violated_frac"][1] <= 1.0
        assert "--scope full" in t.user_attrs["command"]


def test_command_recorded_in_trial_reproduces_it(pg_url, tmp_path):
    init(pg_url, "--experiment", "rep", "--datasets", "synthetic", "--methods", "fim", "--trials", "1",
         "--epochs", "2")
    w = start_worker(pg_url, "rep")
    assert w.wait(timeout=300) == 0
    (trial,) = studies_of(pg_url, "rep")["rep/synthetic/fim"].trials
    cmd = trial.user_attrs["command"].split()[3:]  # drop "python -m trainer"
    assert "--threads 1" in trial.user_attrs["command"]  # the worker's thread count (conftest starts it with 1)
    # rerun where torch would pick another thread count: the command's --threads makes it the same run
    p = subprocess.run([sys.executable, "-m", "trainer", *cmd, "--output", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert round(r["val"]["wga"], 6) == trial.value and r["best_epoch"] == trial.user_attrs["best_epoch"]
    for split in ("val", "test"):  # every recorded metric, exactly (the storage keeps 6 decimals)
        recorded = trial.user_attrs[split]
        assert {k: round(v, 6) for k, v in r[split].items() if isinstance(v, float)} == {
            k: v for k, v in recorded.items() if isinstance(v, float)}, split
    # the typed record read back holds the trainer's result (FitResult.to_dict) field for field
    from study.records import SCHEMA, Group, read
    assert trial.user_attrs["schema"] == SCHEMA
    run = read(trial).run
    assert run is not None and (run.seed, run.best_epoch, run.epochs_run) == (r["seed"], r["best_epoch"],
                                                                               r["epochs_run"])
    assert run.first_own_epoch == r["first_own_epoch"] and run.value == round(r["objective"], 6)
    for split in ("val", "test"):
        m, want = getattr(run, split), r[split]
        assert (m.wga, m.avg_plain, m.avg_train_weighted, m.worst_class) == tuple(
            round(want[k], 6) for k in ("wga", "avg_plain", "avg_train_weighted", "worst_class")), split
        assert m.groups == tuple(Group(**g) for g in want["groups"]), split


def _wait_for(predicate, timeout=120, every=0.1):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def _running_with_progress(url, name):
    """A predicate for `_wait_for`: the first RUNNING trial of study `name` that has reported an epoch. One storage
    and one study query per look, so that a short trial is seen while it still runs (a signal test's window)."""
    storage = storage_for(url)

    def check():
        study = optuna.load_study(study_name=name, storage=storage)
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.intermediate_values]
        return running[0] if running else None
    return check


def test_init_twice_is_harmless_and_conflicts_are_refused(pg_url):
    args = ["--experiment", "twice", "--datasets", "synthetic", "--methods", "erm,fim", "--trials", "3"]
    init(pg_url, *args)
    init(pg_url, *args)
    s = storage_for(pg_url)
    names = optuna.get_all_study_names(s)
    assert sorted(names) == ["twice/synthetic/erm", "twice/synthetic/erm/seeds", "twice/synthetic/fim",
                             "twice/synthetic/fim/seeds"]
    # the search studies hold the enqueued reference recipe; the seed-phase studies are empty until replicate
    assert [len(optuna.load_study(study_name=n, storage=s).trials) for n in sorted(names)] == [1, 0, 1, 0]
    p = study_main("init", "--storage", pg_url, *args[:-1], "5")
    assert p.returncode != 0
    assert p.stderr.strip() == ("error: experiment 'twice' already exists with different settings: trials: 3 -> 5 "
                                "(a new dataset or method is added to it; other settings need a new experiment)")


def test_init_adds_a_method_and_a_dataset_to_an_experiment_and_names_real_conflicts(pg_url):
    base = ("--experiment", "grow", "--datasets", "synthetic", "--methods", "erm", "--trials", "1", "--epochs", "2")
    init(pg_url, *base)
    assert worker_here(pg_url, "grow") == 0
    (done,) = studies_of(pg_url, "grow")["grow/synthetic/erm"].trials
    init(pg_url, *base[:5], "fim", *base[6:])  # a new method
    studies = studies_of(pg_url, "grow")
    assert sorted(studies) == ["grow/synthetic/erm", "grow/synthetic/erm/seeds", "grow/synthetic/fim",
                               "grow/synthetic/fim/seeds"]
    for study in studies.values():  # every study holds the whole experiment's settings
        assert study.user_attrs["experiment"]["methods"] == ["erm", "fim"]
    assert studies["grow/synthetic/erm"].trials == [done]  # the finished trial is kept as it was
    out = start_worker(pg_url, "grow").communicate(timeout=300)[0]
    assert "grow/synthetic/fim trial 0 COMPLETE val_wga" in out and "grow/synthetic/erm trial" not in out, out
    p = study_main("init", "--storage", pg_url, *base[:-1], "3", "--methods", "lff")
    assert p.returncode == 2 and p.stderr.strip() == (
        "error: experiment 'grow' already exists with different settings: epochs: 2 -> 3 (a new dataset or method "
        "is added to it; other settings need a new experiment)")
    assert "grow/synthetic/lff" not in optuna.get_all_study_names(storage_for(pg_url))  # nothing written
    init(pg_url, *base[:3], "cmnist", *base[4:])  # a new dataset: its studies for every method of the experiment
    assert sorted(n for n in studies_of(pg_url, "grow") if not n.endswith("/seeds")) == [
        "grow/cmnist/erm", "grow/cmnist/fim", "grow/synthetic/erm", "grow/synthetic/fim"]
    p = study_main("status", "--storage", pg_url, "--experiment", "grow")
    assert p.returncode == 0 and "grow/cmnist/fim" in p.stdout, p.stderr


def test_init_from_toml_and_bad_settings_leave_nothing(pg_url, tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('name = "toml"\ndatasets = ["synthetic"]\nmethods = ["fim"]\ntrials = 2\n'
                   '[space.fim]\nrho = [0.3, 0.05]\n')
    p = study_main("init", "--storage", pg_url, "--config", str(cfg))
    assert p.returncode != 0 and p.stderr.strip() == (
        "error: space override fim.rho: invalid bounds [0.3, 0.05] (need low < high)")
    p = study_main("init", "--storage", pg_url, "--experiment", "x", "--datasets", "synthetic",
                  "--methods", "erm,irm")
    assert p.returncode != 0 and p.stderr.strip().startswith("error: unknown method 'irm'")
    assert optuna.get_all_study_names(storage_for(pg_url)) == []
    cfg.write_text(cfg.read_text().replace("[0.3, 0.05]", "[0.05, 0.3]"))
    init(pg_url, "--config", str(cfg))
    study = studies_of(pg_url, "toml")["toml/synthetic/fim"]
    assert study.user_attrs["experiment"]["space"] == {"fim": {"rho": [0.05, 0.3]}}
    # the reference recipe lies inside the overridden space
    assert study.trials[0].system_attrs["fixed_params"]["rho"] == 0.1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_experiment(pg_url):
    init(pg_url, "--experiment", "dash", "--datasets", "synthetic", "--methods", "erm,fim", "--trials", "1",
         "--epochs", "2")
    assert worker_here(pg_url, "dash") == 0
    port = _free_port()
    dashboard = str(Path(sys.executable).parent / "optuna-dashboard")
    dash = subprocess.Popen([dashboard, pg_url.replace("postgresql://", "postgresql+psycopg2://"),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return json.loads(r.read())

        def listing():
            try:
                return get("/api/studies")
            except OSError:
                return None

        studies = _wait_for(listing, timeout=60)["study_summaries"]
        names = {s["study_name"]: s["study_id"] for s in studies}
        assert set(names) == {"dash/synthetic/erm", "dash/synthetic/fim", "dash/synthetic/erm/seeds",
                              "dash/synthetic/fim/seeds"}
        detail = get(f"/api/studies/{names['dash/synthetic/fim']}")
        values = detail["trials"][0]["intermediate_values"]
        assert [v["step"] for v in values] == [1, 2] and all(0 <= v["value"] <= 1 for v in values)
    finally:
        dash.terminate()
        dash.wait(timeout=10)
