"""A stopped run goes on from its state as if it had never stopped (trainer/resume.py): in-process, a run resumed
from the state after epoch k ends with the uninterrupted run's metrics, best epoch and history, bit for bit."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from study.results import collect

from conftest import start_worker, study_main, trainer_main
from test_study import FAST_HEARTBEAT, _wait_for, init, storage_for, studies_of
from trainer import TrainConfig, fit
from trainer.methods import METHODS
from trainer.resume import Pacer, ResumeError, ResumeState

EPOCHS = 3

# (method, its parameters, the epoch after which the run is stopped): every registered method with its defaults (the
# warm-ups and first stages shortened to one epoch, latent_aug's generator to a small one), stopped after epoch 2
# of 3; and the states worth a case of their own — the full scope's multipliers and calibration, JTT stopped
# exactly at its stage boundary, LfF stopped after its first epoch (its second model, optimiser and EMAs)
SHORT = {"jtt": {"stage1_epochs": 1}, "fim": {"warmup_epochs": 1}, "fim_relative": {"warmup_epochs": 1},
         "latent_aug": {"n_pairs": 100, "gen_epochs": 2, "width": 8}}
CASES = [(m, SHORT.get(m, {}), 2) for m in METHODS] + [
    ("fim", {"scope": "full", "warmup_epochs": 1}, 2), ("jtt", {"stage1_epochs": 2}, 2), ("lff", {}, 1),
    ("fisher_penalty", {"every_k": 3}, 2)]


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.fixture(scope="module")
def splits():
    return TrainConfig(dataset="cmnist", method="erm").resolved().load_splits()


def config(method, params):
    return TrainConfig(dataset="cmnist", method=method, epochs=EPOCHS, patience=0, method_params=params,
                       threads=1)


@pytest.mark.parametrize("method,params,stop", CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items())}-{s}" for m, p, s in CASES])
def test_a_resumed_run_equals_the_uninterrupted_run(method, params, stop, splits):
    cfg = config(method, params)
    states: dict[int, bytes] = {}
    whole = fit(cfg, splits=splits, log=None, on_state=lambda e, take: states.setdefault(e, take().to_bytes()))
    assert sorted(states) == list(range(1, EPOCHS + 1))
    state = ResumeState.from_bytes(states[stop])
    assert state.epoch == stop and len(state.history) == stop
    resumed = fit(cfg, splits=splits, log=None, resume=state)
    assert (resumed.best_epoch, resumed.val, resumed.test) == (whole.best_epoch, whole.val, whole.test)
    assert without_seconds(resumed.history) == without_seconds(whole.history)
    assert resumed.epochs_run == whole.epochs_run == EPOCHS


def test_a_state_of_the_last_epoch_goes_straight_to_the_test(splits):
    cfg = config("erm", {})
    states: dict[int, ResumeState] = {}
    whole = fit(cfg, splits=splits, log=None, on_state=lambda e, take: states.setdefault(e, take()))
    epochs = []
    resumed = fit(cfg, splits=splits, log=None, resume=states[EPOCHS], callback=lambda e, r: epochs.append(e))
    assert epochs == [] and resumed.test == whole.test and resumed.best_epoch == whole.best_epoch


def test_a_foreign_or_damaged_state_is_refused_with_its_reason(splits):
    cfg = config("erm", {})
    states: dict[int, bytes] = {}
    fit(config("erm", {}), splits=splits, log=None, on_state=lambda e, take: states.setdefault(e, take().to_bytes()))
    data = states[1]
    with pytest.raises(ResumeError, match="damaged or truncated"):
        ResumeState.from_bytes(data[: len(data) // 2])
    with pytest.raises(ResumeError, match="not a resume state"):
        buf = io.BytesIO()
        torch.save({"state_dict": {}}, buf)
        ResumeState.from_bytes(buf.getvalue())
    state = ResumeState.from_bytes(data)
    with pytest.raises(ResumeError, match="another run"):
        fit(TrainConfig(dataset="cmnist", method="erm", epochs=EPOCHS, patience=0, lr=0.02, threads=1),
            splits=splits, log=None, resume=state)
    with pytest.raises(ResumeError, match="other data"):
        state.check(cfg.resolved().to_dict(), "0" * 16)
    # the runtime settings are not the run's identity: another thread count resumes
    state.check({**cfg.resolved().to_dict(), "threads": 7, "device": "cuda"}, state.data_checksum)
    # but a CPU run's random streams cannot go on in a GPU run (a CUDA generator's state is another kind)
    with pytest.raises(ResumeError, match="random streams are of a cpu run; this run is on cuda"):
        state.check(cfg.resolved().to_dict(), state.data_checksum, "cuda")


def test_the_pacer_keeps_writes_within_their_budget():
    now = [0.0]
    pacer = Pacer(budget=0.03, clock=lambda: now[0])
    assert not pacer.due(1000)  # before any training: a write would cost more than 3% of nothing
    now[0] = 1.0
    assert not pacer.due(1000)  # the first write is assumed to take 50 ms (a database round trip): 30 ms allowed
    now[0] = 2.0
    assert pacer.due(1000)  # 60 ms allowed
    pacer.wrote(0.3, 1000)  # it took 300 ms: the next is estimated at 300 ms
    now[0] = 20.0
    assert not pacer.due(1000)  # 600 ms > 3% of 19.7 s
    now[0] = 20.4
    assert pacer.due(1000)  # 600 ms <= 3% of 20.1 s
    # snapshots come out of the same budget: one that took 300 ms waits until the budget has room for another
    assert pacer.snapshot_due()
    pacer.snapshotted(0.3)
    now[0] = 30.0
    assert not pacer.snapshot_due()  # 900 ms > 3% of 29.4 s
    now[0] = 31.0
    assert pacer.snapshot_due()  # 900 ms <= 3% of 30.4 s
    assert not Pacer(budget=0.0, clock=lambda: 100.0).due(1)  # budget 0: never
    slow = Pacer(budget=0.03, interval=60, clock=lambda: now[0])
    now[0] += 30
    assert not slow.due(1)  # not 60 s since the start
    now[0] += 31
    assert slow.due(1)


# --- through the study: a worker killed or stopped mid-trial, its retry goes on from the trial's state ---------------

def _pause_each_mid_trial(url: str, studies: list[str]) -> dict:
    """{study: (its RUNNING trial, its worker's pid)}, each worker paused (SIGSTOP) once its trial has reported two
    epochs and is seen still running after the pause (it cannot finish between the look and the signal after)."""
    storage, paused = storage_for(url), {}

    def running(name):
        study = optuna.load_study(study_name=name, storage=storage)
        return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                     if len(t.intermediate_values) >= 2), None)

    def look():
        for name in set(studies) - set(paused):
            trial = running(name)
            if trial is None:
                continue
            pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGSTOP)
            if running(name) is not None:
                paused[name] = (trial, pid)
            else:
                os.kill(pid, signal.SIGCONT)
        return len(paused) == len(studies)
    _wait_for(look, timeout=300, every=0.02)
    return paused


def _reference(trial) -> dict:
    """The uninterrupted run of the trial's recorded command, in this process."""
    import json
    import shlex
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        p = trainer_main(*shlex.split(trial.user_attrs["command"])[3:], "--device", "cpu", "--output", str(out))
        assert p.returncode == 0, p.stderr
        return json.loads(out.read_text())


def test_a_killed_or_stopped_worker_s_trial_resumes_and_ends_as_if_never_stopped(pg_url, tmp_path):
    """SIGKILL in epoch k: the retry goes on from the last paced state (here one per epoch); SIGTERM: the worker
    writes the last finished epoch's state before it exits (here the pacing writes none: only that one). ERM and
    Ours' full scope are killed, GroupDRO and JTT stopped (every method's state resumes exactly: the in-process test
    above; what the signal changes is only which state the retry finds)."""
    killed, stopped = ("erm", "fim"), ("groupdro", "jtt")
    common = ("--datasets", "cmnist", "--epochs", "5", "--patience", "0", "--pruner", "none")
    flags = {"fim": ("--scope", "full", "--warmup-epochs", "1"), "jtt": ("--stage1-epochs", "2")}
    budgets = {"k": 1, "t": 2}  # t: the stopped trial is the first of two (its lineage counts once)
    for e, methods, pacing in (("k", killed, ("--resume-budget", "1")), ("t", stopped, ("--resume-interval", "1e5"))):
        init(pg_url, "--experiment", e, "--methods", ",".join(methods), "--artifacts", str(tmp_path / e), *pacing,
             "--trials", str(budgets[e]), *common, *(f for m in methods for f in flags.get(m, ())))
    victims = {f"{e}/{m}": start_worker(pg_url, e, env=FAST_HEARTBEAT)
               for e, methods in (("k", killed), ("t", stopped)) for m in methods}
    try:
        paused = _pause_each_mid_trial(pg_url, [f"{e}/cmnist/{m}" for e, methods in (("k", killed), ("t", stopped))
                                                for m in methods])
        for name, (_, pid) in paused.items():
            os.kill(pid, signal.SIGKILL if name.startswith("k/") else signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
        outs = {k: v.communicate(timeout=120)[0] for k, v in victims.items()}
    finally:
        for v in victims.values():
            v.kill()
    for name, v in victims.items():
        assert v.returncode == (-signal.SIGKILL if name.startswith("k/") else 0), outs[name]
        assert "Traceback" not in outs[name], outs[name]
    for m in stopped:  # a stopped trial fails with its reason and is re-queued at once ...
        study = studies_of(pg_url, "t")[f"t/cmnist/{m}"]
        (trial,) = [t for t in study.trials if t.state == TrialState.FAIL]
        assert trial.user_attrs["fail_reason"] == "worker stopped by signal"
        assert any("stopped by signal" in out for out in outs.values())
        (waiting,) = [t for t in study.trials if t.state == TrialState.WAITING]
        assert waiting.system_attrs["failed_trial"] == trial.number and waiting.params == trial.params
        # ... its retry carrying what the trial is (its seed), never what happened to the stopped attempt
        assert set(waiting.user_attrs) <= {"schema", "seed", "reference", "config", "rank"}, waiting.user_attrs
    p = study_main("status", "--experiment", "t", "--storage", pg_url)
    assert p.returncode == 0 and f"| t/cmnist/{stopped[0]} |" in p.stdout
    time.sleep(3.5)  # the killed trials' heartbeats go stale (FAST_HEARTBEAT's grace)
    for e in ("k", "t"):
        p = study_main("worker", "--storage", pg_url, "--experiment", e, "--device", "cpu", "--threads", "1",
                       "--heartbeat-interval", "1", "--grace-period", "3")
        assert p.returncode == 0, p.stdout + p.stderr
        for m in killed if e == "k" else stopped:
            study = studies_of(pg_url, e)[f"{e}/cmnist/{m}"]
            dead = next(t for t in study.trials if t.state == TrialState.FAIL)
            assert [t.state for t in study.trials].count(TrialState.COMPLETE) == budgets[e], study.trials
            assert TrialState.RUNNING not in [t.state for t in study.trials]
            (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
            state = dead.user_attrs.get("resume_state")
            assert state and 1 <= state["epoch"] <= len(dead.intermediate_values), (m, dead.user_attrs)
            assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from"] == {
                "trial": dead.number, "epoch": state["epoch"]}, (m, retry.user_attrs)
            assert f"trial {retry.number} resumes trial {dead.number} after epoch {state['epoch']}" in p.stdout
            whole = _reference(retry)
            assert retry.user_attrs["best_epoch"] == whole["best_epoch"], m
            for split in ("val", "test"):
                assert retry.user_attrs[split] == {k: round(v, 6) if isinstance(v, float) else v
                                                   for k, v in whole[split].items()}, (m, split)
            # the epochs the dead trial ran are reported again: the pruner sees the whole curve
            assert retry.intermediate_values == {r["epoch"]: r["val_selection"] for r in whole["history"]}, m
            assert retry.user_attrs["epochs_run"] == 5 and "fail_reason" not in retry.user_attrs
            assert retry.params == dead.params and dead.user_attrs["train_seconds"] > 0  # written every epoch
            assert retry.user_attrs.get("resume_state") is None  # the finished trial's state is removed ...
            # the stopped or killed attempt's compute counts, once, beside its retry's
            (r,) = [r for r in collect(storage_for(pg_url), e)[1] if r.method == m]
            assert r.compute_s == pytest.approx(sum(t.user_attrs.get("train_seconds", 0) for t in study.trials))
            assert r.compute_s > retry.user_attrs["train_seconds"]
        leftover = [f.name for f in (tmp_path / e).iterdir() if f.name.startswith("state-")]
        assert leftover == [], leftover  # ... and so are the dead trials'


def _dead_trial_with_state(url: str, experiment: str, store_dir: Path, data: bytes, recorded: bytes | None = None,
                           artifact: str = "state-planted"):
    """A trial of `experiment` that died with a recorded state (`recorded`'s size and sha256, the file holding
    `data`), re-queued as the heartbeat callback re-queues a dead trial."""
    store_dir.mkdir(parents=True, exist_ok=True)
    if data:
        (store_dir / artifact).write_bytes(data)
    recorded = data if recorded is None else recorded
    storage = storage_for(url)
    study = optuna.load_study(study_name=f"{experiment}/cmnist/erm", storage=storage)
    trial = study.ask()  # the enqueued reference trial
    trial.set_user_attr("resume_state", {"artifact": artifact, "epoch": 1, "sha256": hashlib.sha256(
        recorded).hexdigest(), "bytes": len(recorded)})
    frozen = study.tell(trial, state=TrialState.FAIL)
    storage.get_heartbeat_stale_trial_callback()(study, frozen)


def test_a_missing_damaged_or_foreign_state_restarts_the_trial_from_epoch_0_saying_why(pg_url, tmp_path, splits):
    states: dict[int, bytes] = {}
    other = TrainConfig(dataset="cmnist", method="erm", epochs=2, patience=0, lr=0.0123, threads=1)
    fit(other, splits=splits, log=None, on_state=lambda e, take: states.setdefault(e, take().to_bytes()))
    good = states[1]
    # what the store holds against what the trial recorded, read as a retry reads it
    from study.artifacts import AtomicFileStore
    from study.records import StateRef
    from study.resume import read_state
    store = AtomicFileStore(tmp_path)
    for data, recorded, why in ((good[: len(good) // 2], good, f"holds {len(good) // 2} bytes, not the recorded"),
                                (good[:-100] + bytes(100), None, "damaged or truncated"),  # damaged when written
                                (good[:-1] + bytes([good[-1] ^ 1]), good, "sha256 is not the recorded")):
        (tmp_path / "state-x").write_bytes(data)
        recorded = data if recorded is None else recorded
        ref = StateRef("state-x", 1, hashlib.sha256(recorded).hexdigest(), len(recorded))
        with pytest.raises(ResumeError, match=why):
            read_state(store, ref)
    # and through a worker: the retry of a trial whose state is gone, of other settings, or of this very run but
    # written by another version of the code (a weight this version's model does not have), starts from epoch 0
    import dataclasses

    from study.experiment import load_experiment
    init(pg_url, "--experiment", "skew", "--datasets", "cmnist", "--methods", "erm", "--trials", "1", "--epochs",
         "2", "--pruner", "none", "--artifacts", str(tmp_path / "skew"))
    exp, _ = load_experiment(storage_for(pg_url), "skew")
    skewed: dict = {}
    fit(dataclasses.replace(exp.recipe("cmnist", "erm"), seed=0, device="cpu", threads=1), splits=splits, log=None,
        on_state=lambda e, take: skewed.setdefault(e, take()))
    skewed[1].model["head.extra"] = torch.zeros(1)
    cases = {"missing": (b"", good, "cannot be read"),
             "foreign": (good, None, "another run"),  # a whole state, but of other settings (lr)
             "skew": (skewed[1].to_bytes(), None, "the state does not fit this run (Error(s) in loading")}
    for name, (data, recorded, why) in cases.items():
        store = tmp_path / name
        if name != "skew":
            init(pg_url, "--experiment", name, "--datasets", "cmnist", "--methods", "erm", "--trials", "1",
                 "--epochs", "2", "--pruner", "none", "--artifacts", str(store))
        _dead_trial_with_state(pg_url, name, store, data, recorded)
        p = study_main("worker", "--storage", pg_url, "--experiment", name, "--device", "cpu", "--threads", "1")
        assert p.returncode == 0, p.stdout + p.stderr
        study = studies_of(pg_url, name)[f"{name}/cmnist/erm"]
        retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") is not None)
        assert retry.state == TrialState.COMPLETE and "resumed_from" not in retry.user_attrs, name
        assert why in retry.user_attrs["resume_refused"], (name, retry.user_attrs["resume_refused"])
        assert retry.user_attrs["resume_refused"].startswith("trial 0's state after epoch 1: "), name
        assert f"trial {retry.number} starts from epoch 0: trial 0's state" in p.stdout, name
        assert sorted(retry.intermediate_values) == [1, 2]  # its own epochs, from the first
