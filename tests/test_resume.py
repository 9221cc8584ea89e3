"""A stopped run goes on from its state as if it had never stopped (trainer/resume.py): in-process, a run resumed
from the state after epoch k ends with the uninterrupted run's metrics, best epoch and history, bit for bit."""
from __future__ import annotations

import io

import pytest
import torch

from trainer import TrainConfig, fit
from trainer.resume import Pacer, ResumeError, ResumeState

EPOCHS = 4

# (method, its parameters, the epoch after which the run is stopped): each method's own state is exercised —
# GroupDRO's q, the full scope's multipliers and calibration (warm-up 1, stopped in the constrained phase), JTT's
# stage (stopped in stage 2, and exactly at the stage boundary), LfF's second model, its optimiser and EMAs
CASES = [("erm", {}, 2), ("groupdro", {}, 2), ("fim", {"scope": "full", "warmup_epochs": 1}, 2),
         ("jtt", {"stage1_epochs": 2}, 2), ("jtt", {"stage1_epochs": 1}, 3), ("lff", {}, 1),
         ("fisher_penalty", {"every_k": 3}, 2), ("subsample", {}, 2)]


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.fixture(scope="module")
def splits():
    return TrainConfig(dataset="cmnist", method="erm").resolved().load_splits()


def config(method, params):
    return TrainConfig(dataset="cmnist", method=method, epochs=EPOCHS, patience=0, method_params=params,
                       threads=1)


@pytest.mark.parametrize("method,params,stop", CASES, ids=[f"{m}-{s}" for m, _, s in CASES])
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


def test_the_pacer_keeps_writes_within_their_budget():
    now = [0.0]
    pacer = Pacer(budget=0.03, clock=lambda: now[0])
    assert not pacer.due(1e9)  # before any training: a write would cost more than 3% of nothing
    now[0] = 0.5
    assert pacer.due(1000)  # 10 microseconds at the prior speed against 15 ms allowed
    pacer.wrote(0.03, 1000)  # it took 30 ms: slower than assumed
    now[0] = 1.0
    assert not pacer.due(1000)  # 60 ms spent and due would be 1.5 s * 3% = 45 ms: not yet
    now[0] = 2.1
    assert pacer.due(1000)  # 60 ms against 62 ms allowed
    assert not Pacer(budget=0.0, clock=lambda: 100.0).due(1)  # budget 0: never
    slow = Pacer(budget=0.03, interval=60, clock=lambda: now[0])
    now[0] += 30
    assert not slow.due(1)  # not 60 s since the start
    now[0] += 31
    assert slow.due(1)
