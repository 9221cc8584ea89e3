"""`python -m study worker`: identical workers that load an experiment's studies and run trials until done."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from trainer import TrainConfig, fit
from trainer.cli import command_for

from .experiment import Experiment, load_experiment, make_pruner, search_space
from .storage import MAX_RETRY, StorageUnavailable, is_replicate, retried_numbers


class WorkerStopped(KeyboardInterrupt):
    """SIGTERM/SIGINT: Optuna fails the running trial (it catches KeyboardInterrupt) and we re-queue it."""


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version('debias-study')}{'+' + sha if sha else ''}"


def _metrics(m: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()}


def _record(trial: optuna.Trial, result: dict | None, history: list[dict], t0: float) -> None:
    """Small user attrs (the dashboard re-reads them every few seconds)."""
    trial.set_user_attr("epochs_run", len(history))
    trial.set_user_attr("train_seconds", round(time.time() - t0, 2))
    if history and "lambda_share" in history[-1]:
        trial.set_user_attr("lambda_share", [h.get("lambda_share") for h in history])
    if result:
        trial.set_user_attr("best_epoch", result["best_epoch"])
        trial.set_user_attr("val", _metrics(result["val"]))
        trial.set_user_attr("test", _metrics(result["test"]))
        trial.set_user_attr("device", result["device"])
        trial.set_user_attr("data_checksum", result["data_checksum"])


class Objective:
    def __init__(self, exp: Experiment, dataset: str, method: str, device: str, splits_cache: dict):
        self.exp, self.dataset, self.method, self.device = exp, dataset, method, device
        self.space = search_space(exp, dataset, method)
        self.splits_cache = splits_cache
        self.current: int | None = None  # number of the trial in progress

    def splits(self):
        if self.dataset not in self.splits_cache:
            self.splits_cache[self.dataset] = self.exp.load_splits(self.dataset)
        return self.splits_cache[self.dataset]

    def config(self, trial: optuna.Trial) -> TrainConfig:
        params = {name: spec.suggest(trial, name) for name, spec in self.space.items()}
        e = self.exp
        return TrainConfig(dataset=self.dataset, method=self.method, data_dir=e.data_dir, model=e.model,
                           image_size=e.image_size, epochs=e.epochs, patience=e.patience,
                           seed=trial.user_attrs.get("seed", e.seed), data_seed=e.data_seed, device=self.device,
                           lr=params.pop("lr"), weight_decay=params.pop("weight_decay"),
                           batch_size=params.pop("batch_size"), method_params=params)

    def __call__(self, trial: optuna.Trial) -> float:
        t0, history = time.time(), []
        self.current = trial.number
        try:
            cfg = self.config(trial)
            trial.set_user_attr("command", command_for(cfg))
            trial.set_user_attr("seed", cfg.seed)
            trial.set_user_attr("code_version", code_version())
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

            replicate = is_replicate(trial)  # a seed re-run is never pruned

            def report(epoch: int, record: dict) -> None:
                history.append(record)
                trial.report(record["val_wga"], epoch)
                if not replicate and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} (val WGA {record['val_wga']:.4f})")

            result = fit(cfg, callback=report, splits=self.splits(), log=None)
        except optuna.TrialPruned:
            _record(trial, None, history, t0)
            raise
        except (Exception, KeyboardInterrupt) as e:
            reason = "worker stopped by signal" if isinstance(e, WorkerStopped) else f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", reason[:500])
            _record(trial, None, history, t0)
            raise
        _record(trial, result, history, t0)
        return result["val"]["wga"]


def trial_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    counts = {s.name.lower(): 0 for s in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    counts["retried"] = sum(1 for t in trials if t.number in retried)
    replicates = [t for t in trials if is_replicate(t) and t.number not in retried]
    counts["replicates"] = len(replicates)
    counts["replicate_waiting"] = sum(t.state == TrialState.WAITING for t in replicates)
    # a retried lineage counts once toward the budget; seed replicates are outside it
    counts["used"] = len(trials) - counts["retried"] - counts["replicates"]
    return counts


def _on_signal(signum, frame):
    raise WorkerStopped(f"signal {signum}")


def run_worker(storage, experiment: str, device: str = "auto", sampler_seed: int | None = None,
               poll_seconds: float = 5.0, log=print, between_trials=None) -> int:
    """Run trials until every study of the experiment has met its budget and none is running. Returns 0."""
    exp, studies = load_experiment(storage, experiment)
    seed = sampler_seed if sampler_seed is not None else (os.getpid() * 7919 + time.time_ns()) % 2**31
    for i, s in enumerate(studies):  # pruners are not stored: every worker builds the same one
        s.sampler = optuna.samplers.TPESampler(seed=seed + i)
        s.pruner = make_pruner(exp, s.user_attrs["dataset"])
    splits_cache: dict = {}
    objectives = {s.study_name: Objective(exp, s.user_attrs["dataset"], s.user_attrs["method"], device, splits_cache)
                  for s in studies}
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log(f"worker {os.getpid()}: experiment {experiment!r}, {len(studies)} studies, sampler seed {seed}")
    finished: list[optuna.trial.FrozenTrial] = []
    try:
        while True:
            if between_trials:
                between_trials()
            for s in studies:
                optuna.storages.fail_stale_trials(s)  # dead workers' trials: failed and re-queued
            counts = {s.study_name: trial_counts(s) for s in studies}
            todo = [s for s in studies
                    if counts[s.study_name]["used"] < exp.trials or counts[s.study_name]["waiting"]]
            if not todo:
                if any(c["running"] for c in counts.values()):
                    time.sleep(poll_seconds)  # a running trial may still fail and need a retry
                    continue
                log(f"worker {os.getpid()}: all budgets met")
                return 0
            # fewest used first; re-queued (waiting) trials before new ones
            study = min(todo, key=lambda s: (not counts[s.study_name]["waiting"], counts[s.study_name]["used"]))
            objective = objectives[study.study_name]
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,),
                               callbacks=[lambda _, t: finished.append(t)])
            except Exception:
                if getattr(storage, "_gave_up", None):  # the database stayed down: say that, not what broke on it
                    raise StorageUnavailable(storage._gave_up) from None
                raise
            except WorkerStopped:
                # Optuna has failed the trial with our reason; re-queue it so nothing is lost
                stopped = [t for t in study.get_trials(deepcopy=False) if t.number == objective.current]
                if stopped and stopped[0].state == TrialState.FAIL:
                    retry(study, stopped[0])
                raise
            t = finished[-1]
            log(f"worker {os.getpid()}: {study.study_name} trial {t.number} {t.state.name} "
                f"value {t.value if t.value is not None else '-'} {t.user_attrs.get('fail_reason', '')}")
    except WorkerStopped:
        log(f"worker {os.getpid()}: stopped by signal (a running trial was failed and re-queued)")
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
