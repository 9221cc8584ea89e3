"""`python -m study worker`: identical workers that load an experiment's studies and run trials until done."""
from __future__ import annotations

import contextlib
from typing import Any
import dataclasses
import os
import signal
import subprocess
import threading
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from trainer import TrainConfig, fit
from trainer.data import DataError
from trainer.loop import resolve_device
from trainer.resume import ResumeError
from trainer.cli import command_for
from trainer.methods import get_method

from .experiment import SEARCHED_RUN, Experiment, load_experiment, make_pruner, search_space
from .artifacts import check_store, keep_epoch, keep_model, open_store
from .records import Writer, planned_seed, read
from .resume import StateKeeper
from .results import trial_counts
from .storage import StorageUnavailable, cause_chain, database_error, ride_out, study_lock


# The worker records heartbeats itself (see `heartbeat`): Optuna's reminder that study.optimize would do it is moot.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


POLL_ENV, DEFAULT_POLL_SECONDS = "STUDY_POLL_SECONDS", 5.0  # idle look-again interval (a database round per study)


class EnvironmentFault(RuntimeError):
    """This host cannot train (data missing, device gone): the worker stops and its trial is re-queued."""


class StudiesHalted(RuntimeError):
    """Some studies stopped taking trials after consecutive failures: the worker exits non-zero and says why."""


class StorageFault(RuntimeError):
    """A storage call failed mid-trial (a database hiccup, not the trial's doing): the trial is re-queued."""


class WorkerStopped(KeyboardInterrupt):
    """SIGTERM/SIGINT: Optuna fails the running trial (it catches KeyboardInterrupt) and we re-queue it."""


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version('debias-study')}{'+' + sha if sha else ''}"


RECIPE_KEYS = ("model", "pretrained", "image_size", "epochs", "augment", "freeze_bn", "grad_clip", "deterministic")


class Objective:
    def __init__(self, exp: Experiment, dataset: str, method: str, device: str, splits_cache: dict, store=None,
                 log=print):
        self.exp, self.dataset, self.method, self.device, self.log = exp, dataset, method, device, log
        self.store = store  # the experiment's artifact store: kept models and resumable states (None: neither)
        self.keep = store if exp.keep != "none" else None  # where COMPLETE trials keep their tested model
        self.space = search_space(exp, dataset, method)
        self.splits_cache = splits_cache

    def splits(self):
        if self.dataset not in self.splits_cache:
            self.splits_cache[self.dataset] = self.exp.load_splits(self.dataset)
        return self.splits_cache[self.dataset]

    def same_data(self, trial: optuna.Trial) -> str:
        """This host's data checksum, once it is the one of the study's first trial that recorded one; a host whose
        data differs (a damaged file, another copy of the dataset) cannot train the study's trials: DataError."""
        checksum = self.splits().checksum
        first = next((r for r in map(read, trial.study.get_trials(deepcopy=False))
                      if r.number != trial.number and r.data_checksum is not None), None)
        if first is not None and first.data_checksum != checksum:
            raise DataError(f"data checksum {checksum} on this host differs from {first.data_checksum} "
                            f"of the study's first trial (#{first.number}): the {self.dataset} data here is not "
                            "what the study trains on")
        return checksum

    def config(self, trial: optuna.Trial) -> TrainConfig:
        params = {name: spec.suggest(trial, name) for name, spec in self.space.items()}
        recipe = self.exp.recipe(self.dataset, self.method)
        return dataclasses.replace(
            recipe, seed=planned_seed(trial, recipe.seed), device=self.device,
            threads=torch.get_num_threads(),  # recorded: a CPU rerun needs the same count
            **{n: params.pop(n) for n in SEARCHED_RUN if n in params},
            method_params={**recipe.method_params, **params})

    def __call__(self, trial: optuna.Trial, prune: bool) -> float:
        """Trains one trial; returns its selection metric at the best epoch. Seed-phase runs are never pruned."""
        writer, history, logged = Writer(trial), [], get_method(self.method).LOGGED
        states = StateKeeper(trial, self.store, writer, self.exp.resume_budget, self.exp.resume_interval,
                             guard=lambda: STOP.interruptible(False))
        retried = False  # the trial ends in a re-queue: its state stays for the retry
        try:
            cfg = self.config(trial).resolved()
            # the recipe the trial ran with, readable in the dashboard beside its command
            writer.start(cfg.seed, command_for(cfg), {k: getattr(cfg, k) for k in RECIPE_KEYS}, code_version())
            checksum = self.same_data(trial)
            writer.checksum(checksum)
            resume, source, refused = states.find(cfg.to_dict(), checksum, resolve_device(cfg.device).type)
            name = f"{trial.study.study_name} trial {trial.number}"

            def refuse(why: str) -> None:
                with STOP.interruptible(False):
                    writer.resume_refused(why)
                self.log(f"worker {os.getpid()}: {name} starts from epoch 0: {why}")
            if refused:
                refuse(refused)
            pending = [resume]  # announced once fit has restored it (a state of another code version may not load)

            def announce() -> None:
                state = pending.pop() if pending else None
                if state is None or source is None:
                    return
                writer.resumed(source, state.epoch)
                self.log(f"worker {os.getpid()}: {name} resumes trial {source} after epoch {state.epoch}")
                for record in state.history:  # the pruner sees the whole curve: the epochs run are reported again
                    trial.report(record["val_selection"], record["epoch"])
                history.extend(state.history)

            def on_state(epoch: int, take) -> None:
                if self.exp.keep == "all-epochs":  # every epoch's weights, whole or not at all
                    with STOP.interruptible(False):
                        keep_epoch(trial, self.keep, take().model, cfg.to_dict(), checksum, history[-1],
                                   study=trial.study.study_name, number=trial.number, command=command_for(cfg),
                                   code_version=code_version())
                states.offer(epoch, take)

            def report(epoch: int, record: dict) -> None:
                with STOP.interruptible(False):  # storage writes are never cut in the middle
                    announce()
                    history.append(record)
                    # the seconds first: an epoch seen in the storage has its compute counted, even if the worker
                    # is killed right after (a killed trial's compute counts)
                    writer.seconds()
                    trial.report(record["val_selection"], epoch)
                    pruned = prune and trial.should_prune()
                if pruned:
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.exp.selection} "
                                             f"{record['val_selection']:.4f})")

            def train(state):
                return fit(cfg, callback=report, splits=self.splits(), log=None, keep_state=self.keep is not None,
                           resume=state, on_state=on_state)
            with STOP.interruptible():  # a stop signal ends training at once
                try:
                    result = train(resume)
                except ResumeError as e:  # the state does not load into this code: from epoch 0, saying why
                    if resume is None:
                        raise
                    refuse(f"trial {source}'s state after epoch {resume.epoch}: {e}")
                    pending.clear()
                    result = train(None)
            with STOP.interruptible(False):
                announce()  # a state of the last epoch: no epoch was reported
            if self.keep is not None:
                with STOP.interruptible(False):  # an artifact is written whole, and its id recorded, or not at all
                    writer.model(*keep_model(trial, self.keep, result, study=trial.study.study_name,
                                             number=trial.number, command=command_for(cfg),
                                             code_version=code_version()))
        except optuna.TrialPruned:
            writer.finish(logged, history)
            raise
        except (Exception, KeyboardInterrupt) as e:
            if isinstance(e, WorkerStopped):
                STOP.handled()  # the fail reason and the re-queue below must not be cut short
                retried = True
                with contextlib.suppress(Exception):  # the last finished epoch's state, for the retry
                    states.flush()
            retried |= isinstance(e, (DataError, FileNotFoundError)) or database_error(e)
            reason = ("worker stopped by signal" if isinstance(e, WorkerStopped) else
                      f"storage error: {cause_chain(e)}" if database_error(e) else f"{type(e).__name__}: {e}")
            writer.failed(reason)
            writer.finish(logged, history)
            if isinstance(e, (DataError, FileNotFoundError)):
                raise EnvironmentFault(reason) from e
            if database_error(e):
                raise StorageFault(reason) from e
            raise
        finally:
            if not retried:  # the trial ends here: its state (and its ancestors') are no longer needed
                with STOP.interruptible(False), contextlib.suppress(Exception):
                    states.discard()
        writer.finish(logged, history, result)
        return result.objective


class StopSignals:
    """SIGTERM/SIGINT stop the process cleanly. The handler raises `exc` only inside `interruptible()` regions
    (training, sleeps): raised in the middle of a storage call it could leave a transaction open, a SQLite lock
    held by a pooled connection that the same process then waits on for minutes. Elsewhere the stop waits for the
    next region or `check()`. A raise inside a finalizer is lost ("Exception ignored in ..."), so until `handled()`
    the signal is delivered again every second: a stop is never lost, only delayed."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, exc: type[BaseException]):
        self.exc, self.signum, self.open, self.done = exc, None, False, threading.Event()
        self.old: dict[int, Any] = {}

    def _on_signal(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            threading.Thread(target=self._redeliver, args=(signum,), daemon=True, name="stop-signal").start()
        if self.open:
            raise self.exc(f"signal {signum}")

    def _redeliver(self, signum):
        while not self.done.wait(1.0):
            os.kill(os.getpid(), signum)

    def install(self, interruptible: bool = False) -> None:
        self.signum, self.open = None, interruptible
        self.done.clear()
        self.old = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def check(self) -> None:
        """Raise the stop that arrived outside an interruptible region, if any."""
        if self.signum is not None and not self.done.is_set():
            raise self.exc(f"signal {self.signum}")

    @contextlib.contextmanager
    def interruptible(self, on: bool = True):
        before, self.open = self.open, on
        try:
            if on:
                self.check()
            yield
        finally:
            self.open = before
        if before:
            self.check()

    def handled(self) -> None:
        """The stop is being acted on: no redelivery, and more signals of an impatient burst change nothing."""
        self.open = False
        self.done.set()
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """The handlers from before `install`, unless a stop was handled (then signals stay ignored)."""
        if not self.done.is_set():
            self.done.set()
            for sig, handler in self.old.items():
                signal.signal(sig, handler)


STOP = StopSignals(WorkerStopped)


@contextlib.contextmanager
def heartbeat(storage, trial_id: int):
    """Records the trial's heartbeat every interval while it trains (what study.optimize does for its trials)."""
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat():
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except KeyError:  # the trial was deleted (`study delete`): the worker's own next call says so
                return
            if stop.wait(interval):
                return
    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial_id}")
    if interval:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if interval:
            thread.join(timeout=5)


class Phase:
    """One study a worker draws trials from: a search study (sampled trials up to the budget, re-queued ones) or
    a seed-phase study (only enqueued trials; it never samples)."""

    def __init__(self, study: optuna.Study, search: bool, objective: Objective, budget: int):
        self.study, self.search, self.objective, self.budget = study, search, objective, budget

    def has_work(self, c: dict) -> bool:
        return not c["halted"] and (bool(c["waiting"]) or (self.search and c["used"] < self.budget))

    def claim(self, storage) -> optuna.Trial | None | bool:
        """Under the study's lock: a waiting trial if there is one, else a newly sampled one while the search budget
        allows, else None; False when another worker holds the lock (the caller tries another study). No other
        worker counts or creates at the same time, so the budget is exact (unless a holder froze for longer than
        the idle-transaction timeout between its count and its trial: then it may overshoot by one)."""
        with study_lock(storage, self.study.study_name) as held:
            if not held:
                return False
            if self.has_work(trial_counts(self.study)):
                return self.study.ask()
        return None


def run_trial(phase: Phase, trial: optuna.Trial, storage) -> optuna.trial.FrozenTrial:
    """Runs one claimed trial with heartbeats and records its end (COMPLETE, PRUNED or FAIL with its reason)."""
    study = phase.study
    try:
        with heartbeat(storage, trial._trial_id):
            value = phase.objective(trial, prune=phase.search)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except StorageFault:  # not the trial's fault either: the same parameters again; this worker goes on
        frozen = study.tell(trial, state=TrialState.FAIL)
        storage.get_heartbeat_stale_trial_callback()(study, frozen)
        return frozen
    except EnvironmentFault:  # this host cannot train it: not the trial's fault, so it runs again elsewhere
        frozen = study.tell(trial, state=TrialState.FAIL)
        storage.get_heartbeat_stale_trial_callback()(study, frozen)
        raise
    except WorkerStopped:
        STOP.handled()  # a burst of Ctrl-C must not cut the re-queue short
        frozen = study.tell(trial, state=TrialState.FAIL)
        storage.get_heartbeat_stale_trial_callback()(study, frozen)  # nothing lost: the same parameters again
        raise
    except Exception:
        return study.tell(trial, state=TrialState.FAIL)  # fail_reason was recorded by the objective
    return study.tell(trial, value)


def run_worker(storage, experiment: str, device: str = "auto", sampler_seed: int | None = None,
               poll_seconds: float = DEFAULT_POLL_SECONDS, log=print, between_trials=None) -> int:
    """Run trials until every study of the experiment has met its budget, no seed-phase run waits and none is
    running. Returns 0."""
    exp, studies, seeds = load_experiment(storage, experiment, seeds=True)
    # An environment fault (no such device, data missing on this host) stops this worker before it takes a trial:
    # it is not a result, and must not fail the experiment's trials one after another.
    resolve_device(device)
    splits_cache: dict = {d: exp.load_splits(d) for d in exp.datasets}
    store = None
    if (exp.keep != "none" or exp.resume_budget > 0) and exp.artifacts:  # a store this worker cannot write is
        #                                                                   refused before any trial
        check_store(exp.artifacts)
        store = open_store(exp.artifacts)
    seed = sampler_seed if sampler_seed is not None else (os.getpid() * 7919 + time.time_ns()) % 2**31
    phases = []
    for i, s in enumerate(studies):  # pruners are not stored: every worker builds the same one
        dataset, method = s.user_attrs["dataset"], s.user_attrs["method"]
        s.sampler = optuna.samplers.TPESampler(seed=seed + i)
        s.pruner = make_pruner(exp, dataset, method)
        objective = Objective(exp, dataset, method, device, splits_cache, store, log)
        phases.append(Phase(s, True, objective, exp.trials))
        if s.study_name in seeds:  # every parameter of a seed run is fixed: nothing is sampled or pruned
            seeds[s.study_name].sampler = optuna.samplers.RandomSampler(seed=seed + i)
            phases.append(Phase(seeds[s.study_name], False, objective, 0))
    STOP.install()
    url, timeout = getattr(storage, "_url", ""), getattr(storage, "_timeout", 600.0)
    log(f"worker {os.getpid()}: experiment {experiment!r}, {len(studies)} studies, sampler seed {seed}")
    try:
        while True:
            STOP.check()
            if between_trials:
                between_trials()
            counts = {}
            for p in phases:
                optuna.storages.fail_stale_trials(p.study)  # dead workers' trials: failed and re-queued
                counts[p.study.study_name] = trial_counts(p.study)
            todo = [p for p in phases if p.has_work(counts[p.study.study_name])]
            if not todo:
                if any(c["running"] for c in counts.values()):
                    with STOP.interruptible():
                        time.sleep(poll_seconds)  # a running trial may still fail and need a retry
                    continue
                halted = [f"{name} ({c['halted']})" for name, c in counts.items() if c["halted"]]
                if halted:
                    raise StudiesHalted(f"halted (the other studies keep their results; fix the cause, then run "
                                        f"the halted dataset and method in a new experiment, `python -m study init "
                                        f"--experiment NEW ...`, and report both: `python -m study.report "
                                        f"--experiment {experiment},NEW`): {'; '.join(halted)}")
                log(f"worker {os.getpid()}: all budgets met")
                return 0
            # waiting (re-queued or seed-phase) trials first, then the study with the fewest used trials
            todo.sort(key=lambda p: (not counts[p.study.study_name]["waiting"], counts[p.study.study_name]["used"]))
            busy = False
            for phase in todo:
                trial = ride_out(lambda _: phase.claim(storage), url, timeout, " (claiming a trial)")
                busy |= trial is False
                if trial:
                    break
            else:
                if busy:  # another worker is inside a claim (or frozen there): look again shortly
                    with STOP.interruptible():
                        time.sleep(min(1.0, poll_seconds))
                continue  # other workers took them first: count again
            try:
                t = run_trial(phase, trial, storage)
            except EnvironmentFault as e:
                raise EnvironmentFault(f"this worker cannot train (its trial {trial.number} was re-queued): "
                                       f"{e}") from None
            except Exception:
                if getattr(storage, "_gave_up", None):  # the database stayed down: say that, not what broke on it
                    raise StorageUnavailable(storage._gave_up) from None
                raise
            value = f"{t.value:.4f}" if t.value is not None else "-"  # the objective by name, a fraction as stored
            log(f"worker {os.getpid()}: {phase.study.study_name} trial {t.number} {t.state.name} "
                f"{exp.selection} {value} {read(t).fail_reason or ''}")
    except WorkerStopped:
        STOP.handled()
        log(f"worker {os.getpid()}: stopped by signal (a running trial was failed and re-queued)")
        return 0
    except KeyError:  # Optuna's "Record does not exist": a study or trial went away under the worker
        names = set(optuna.get_all_study_names(storage))
        if all(p.study.study_name in names for p in phases):
            raise
        log(f"worker {os.getpid()}: experiment {experiment!r} was deleted while this worker ran: nothing left to do")
        return 0  # not a failure: a restart policy must not start it again
    finally:
        STOP.restore()
