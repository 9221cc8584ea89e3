"""The comparison protocol against the real PostgreSQL: phases that cannot mix, the label-free selection regime,
a method's own epochs, and the recipe every method shares."""
import warnings

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import start_worker, study_main, worker_here
from study.experiment import Experiment, make_pruner
from test_study import init, storage_for, studies_of
from trainer import TrainConfig, fit
from trainer.data import load_splits


def test_waiting_seed_runs_never_become_new_searched_trials(pg_url):
    """More workers than waiting seed-phase runs: the idle ones must exit, not sample past the budget."""
    init(pg_url, "--experiment", "mix", "--datasets", "synthetic", "--methods", "erm,groupdro", "--trials", "2",
         "--epochs", "2", "--pruner", "none")
    assert worker_here(pg_url, "mix") == 0
    p = study_main("replicate", "--storage", pg_url, "--experiment", "mix", "--seeds", "2", "--top-k", "1")
    assert p.returncode == 0, p.stderr  # one waiting seed run per method, two in all
    workers = [start_worker(pg_url, "mix") for _ in range(4)]
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, outs
    studies = studies_of(pg_url, "mix")
    for m in ("erm", "groupdro"):
        assert len(studies[f"mix/synthetic/{m}"].trials) == 2  # the search budget, not one trial more
        (seed_run,) = studies[f"mix/synthetic/{m}/seeds"].trials
        assert seed_run.state == TrialState.COMPLETE and seed_run.user_attrs["seed"] == 1
        assert seed_run.params == studies[f"mix/synthetic/{m}"].best_trial.params or seed_run.user_attrs["rank"] == 1


def _shuffle_attributes(splits, seed=0):
    """The same data with the attribute (hence every group label) of train and val scrambled; test untouched."""
    gen = torch.Generator().manual_seed(seed)
    for ds in (splits.train, splits.val):
        ds.a = ds.a[torch.randperm(len(ds.a), generator=gen)]
    return splits


@pytest.mark.parametrize("method", ["erm", "fim"])
def test_label_free_selection_reads_no_group_label(method):
    """Under val_worst_class, scrambling every train/val group label changes nothing the run decides: not the
    training, not the selected epoch, not the test result. (Under val_wga it does change the selection metric.)"""
    cfg = TrainConfig(dataset="cmnist", method=method, epochs=3, patience=0, selection="val_worst_class",
                      method_params={"warmup_epochs": 1} if method == "fim" else {})
    a = fit(cfg, splits=load_splits("cmnist"), log=None)
    b = fit(cfg, splits=_shuffle_attributes(load_splits("cmnist")), log=None)
    assert [h["val_selection"] for h in a.history] == [h["val_selection"] for h in b.history]
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.best_epoch == b.best_epoch
    # the test split is untouched, so the selected model's test metrics agree (the train-weighted average alone
    # reads training-set group proportions: a reporting convention, not a decision)
    same = ("wga", "avg_plain", "worst_class", "groups")
    assert {k: a.test[k] for k in same} == {k: b.test[k] for k in same}
    assert [h["val_wga"] for h in a.history] != [h["val_wga"] for h in b.history]  # the scramble is real


def test_label_free_regime_from_init_to_report(pg_url):
    init(pg_url, "--experiment", "free", "--datasets", "synthetic", "--methods", "erm,fim", "--trials", "2",
         "--epochs", "3", "--selection", "val_worst_class")
    assert worker_here(pg_url, "free") == 0
    for name, study in studies_of(pg_url, "free").items():
        assert study.metric_names == ["val_worst_class"]
        for t in study.trials:
            if t.state == TrialState.COMPLETE:
                assert t.value == pytest.approx(t.user_attrs["val"]["worst_class"], abs=1e-6)
                assert t.user_attrs["selection"] == "val_worst_class"
                assert "--selection val_worst_class" in t.user_attrs["command"]
    p = study_main("replicate", "--storage", pg_url, "--experiment", "free", "--seeds", "2", "--top-k", "1")
    assert p.returncode == 0, p.stderr
    assert worker_here(pg_url, "free") == 0
    r = study_main("report", "--storage", pg_url, "--experiment", "free", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = [line.split(",") for line in r.stdout.strip().splitlines()]
    header = rows[0]
    for row in rows[1:]:
        cells = dict(zip(header, row))
        if cells["table"] != "results":
            continue
        assert cells["selection group labels"] == "no" and cells["train group labels"] == "no"
        assert (cells["seeds finished"], cells["seeds asked"]) == ("2", "2")
    md = study_main("report", "--storage", pg_url, "--experiment", "free").stdout
    assert "val worst-class accuracy (no group labels)" in md


def test_a_warm_up_epoch_is_never_the_selected_model():
    r = fit(TrainConfig(dataset="synthetic", method="fim", epochs=4, patience=0,
                        method_params={"warmup_epochs": 2}), log=None)
    assert r.first_own_epoch == 3 and r.best_epoch >= 3
    assert [h["own"] for h in r.history] == [False, False, True, True]
    own = [h for h in r.history if h["own"]]
    assert r.val["wga"] == max(h["val_wga"] for h in own)


def test_warm_up_longer_than_the_budget_is_refused_and_the_space_adapts():
    with pytest.raises(ValueError, match="from epoch 3 .* but epochs is 2"):
        fit(TrainConfig(dataset="synthetic", method="fim", epochs=2, method_params={"warmup_epochs": 2}), log=None)
    exp = Experiment.of(name="w", datasets=["synthetic"], methods=["fim"], epochs=2)
    from study.experiment import search_space
    assert search_space(exp, "synthetic", "fim")["warmup_epochs"].high == 1  # one constrained epoch left
    # the median pruner never judges a trial before the latest first own epoch the search can draw (3 + 1)
    exp = Experiment.of(name="w", datasets=["synthetic"], methods=["fim", "erm"], epochs=8)
    assert make_pruner(exp, "synthetic", "fim")._n_warmup_steps == 4
    assert make_pruner(exp, "synthetic", "erm")._n_warmup_steps == 2


def test_gradient_clipping_applies_to_every_method():
    from trainer.methods import METHODS
    for name, cls in METHODS.items():
        assert "grad_clip" not in {f.name for f in cls.param_fields()}, name  # a training setting, not a method's
    # a tiny clip slows ERM's first epoch: the setting reaches a method that does not clip by itself
    a = fit(TrainConfig(dataset="synthetic", method="erm", epochs=1, grad_clip=1e-6, lr=0.05), log=None)
    b = fit(TrainConfig(dataset="synthetic", method="erm", epochs=1, grad_clip=0.0, lr=0.05), log=None)
    assert a.hparams["grad_clip"] == 1e-6 and b.hparams["grad_clip"] == 0.0
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]


def test_patience_scales_with_the_budget_and_storage_timeouts_are_short_for_people(pg_url):
    from trainer.config import default_patience
    assert default_patience(20) == 10 and default_patience(300) == 75
    assert TrainConfig(dataset="waterbirds").resolved().patience == 75
    import time
    t0 = time.time()
    p = study_main("status", "--storage", "postgresql://postgres@127.0.0.1:1/none", "--experiment", "x")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr
    assert last.startswith("error: storage postgresql+psycopg2://postgres@127.0.0.1:1/none"), p.stderr
    assert time.time() - t0 < 40  # 15 s of retries, not the worker's 600 s


def test_the_manual_methods_table_is_the_registry():
    from pathlib import Path

    from trainer.methods import METHODS, methods_table
    manual = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert methods_table() in manual  # regenerate it with trainer.methods.methods_table() when a method changes
    assert all(c.card.family and c.card.cites for c in METHODS.values())  # every method says what it is and where from


def test_method_names_live_with_the_methods():
    from pathlib import Path

    from trainer.methods import METHODS
    root = Path(__file__).parents[1]
    source = "".join(p.read_text() for p in [*(root / "study").glob("*.py"), root / "trainer" / "loop.py"])
    for name in METHODS:  # no special case for any method outside trainer/methods/
        assert f'"{name}"' not in source, name
    cards = {n: c.card for n, c in METHODS.items()}
    assert [c.label for c in sorted(cards.values(), key=lambda c: c.order)][:3] == ["ERM", "DRO", "Ours"]
    assert [n for n, c in cards.items() if c.proposed] == ["fim"]
    assert [n for n, c in cards.items() if c.control] == ["erm"]
    assert [n for n, c in cards.items() if c.reference] == ["erm", "groupdro"]


def test_a_running_trial_that_never_had_a_heartbeat_is_failed_and_retried(pg_url):
    init(pg_url, "--experiment", "orphan", "--datasets", "synthetic", "--methods", "erm", "--trials", "1",
         "--epochs", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = storage_for(pg_url, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="orphan/synthetic/erm", storage=s)
    orphan = study.ask()  # popped, RUNNING, and its worker vanished before the first heartbeat
    import time
    time.sleep(3)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert next(t for t in trials if t.number == orphan.number).state == TrialState.FAIL
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.system_attrs["failed_trial"] == orphan.number and retry.user_attrs == {"schema": 2, "reference": True}
