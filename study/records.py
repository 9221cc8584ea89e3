"""A trial's record in the storage, typed: what a worker writes into a trial's user attributes and what every
reader in `study/` gets back.

The layout is flat user attributes (the dashboard shows each one), with the schema version in `schema`. A trial
goes through three writers: the plan (`plan`: what the trial is — seed, configuration, rank — written when it is
enqueued and the only part a retry inherits), the start and progress of a run (`Writer`), and its end (`Writer.
finish`: the FitResult's metrics and the method's per-epoch diagnostics). `read` turns a FrozenTrial back into a
`TrialRecord`; a record of an older version goes through `_MIGRATIONS`, one of a newer version is refused.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, TypeGuard

import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from trainer.loop import FitResult

SCHEMA = 2  # 1: every record written before the version was stored (no `schema` attribute)

# What a trial is (not what happened to it): written at enqueue, inherited by a retry.
PLAN_KEYS = ("schema", "seed", "reference", "config", "rank")


class RecordError(ValueError):
    """A record this version cannot read (written by a newer version)."""


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _files(v: Any) -> tuple[str, ...]:
    names = v.get("artifacts") if isinstance(v, dict) else None
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class Group:
    """One evaluated group: its id (y * n_attr + a), accuracy, size, and its label and attribute."""
    group: int
    acc: float
    count: int
    y: int | None = None  # None: a record from before groups named their label and attribute
    a: int | None = None

    @property
    def name(self) -> str:
        return f"y={self.y}, a={self.a}" if self.y is not None else f"group {self.group}"


@dataclass(frozen=True)
class StateRef:
    """A running trial's last resumable state in the artifact store (study/resume.py): its artifact id, the epoch
    after which it was taken, the file's sha256 and size."""
    artifact: str
    epoch: int
    sha256: str
    bytes: int

    @classmethod
    def parse(cls, d: Any) -> StateRef | None:
        if not isinstance(d, dict):
            return None
        artifact, digest = _str(d.get("artifact")), _str(d.get("sha256"))
        epoch, size = _int(d.get("epoch")), _int(d.get("bytes"))
        if artifact is None or digest is None or epoch is None or size is None:
            return None
        return cls(artifact, epoch, digest, size)


@dataclass(frozen=True)
class Metrics:
    """One split's metrics at the selected epoch, fractions in [0, 1]."""
    wga: float
    avg_plain: float
    avg_train_weighted: float | None
    worst_class: float | None
    groups: tuple[Group, ...] = ()
    feature_norm: float | None = None     # mean penultimate-feature norm (eval mode); None: not recorded
    top_class_share: float | None = None  # share of the most predicted class

    def avg(self, key: str) -> float:
        """The average by its metric key (avg_plain or avg_train_weighted)."""
        value = getattr(self, key)
        assert value is not None, key  # a Run's test metrics hold both
        return value

    @classmethod
    def parse(cls, d: Any) -> Metrics | None:
        """None where a value the tables read is not a finite number (a record edited by hand, another tool's)."""
        if not (isinstance(d, dict) and _number(d.get("wga")) and _number(d.get("avg_plain"))):
            return None
        groups = d.get("groups", [])
        try:
            parsed = tuple(Group(int(g["group"]), float(g["acc"]), int(g["count"]), _int(g.get("y")),
                                 _int(g.get("a"))) for g in groups)
        except (TypeError, KeyError, ValueError):
            parsed = ()
        def optional(key: str) -> float | None:
            return float(d[key]) if _number(d.get(key)) else None
        return cls(float(d["wga"]), float(d["avg_plain"]), optional("avg_train_weighted"), optional("worst_class"),
                   parsed, optional("feature_norm"), optional("top_class_share"))


@dataclass(frozen=True)
class TrialRecord:
    """A trial and its record; `run` is its result, None unless it has one every table can read (a trial edited
    by hand, enqueued from the dashboard or written by another tool may not: left out, never a crash)."""
    trial: FrozenTrial
    seed: int | None
    epochs_run: int
    train_seconds: float
    best_epoch: int | None
    first_own_epoch: int
    val: Metrics | None
    test: Metrics | None
    fail_reason: str | None
    config: int | None          # seed phase: the searched trial this run re-runs, and that trial's search rank
    rank: int | None
    data_checksum: str | None
    command: str | None
    model: str | None           # the kept model's artifact id, and the model file's sha256 (None: none kept)
    model_sha256: str | None
    diagnostics: dict[str, list] = field(default_factory=dict)  # the method's per-epoch values (LOGGED keys)
    resume_state: StateRef | None = None    # its last resumable state (None: none, or removed when it ended)
    resume_files: tuple[str, ...] = ()      # every state file it may have left (a worker killed mid-write)
    resumed_from: dict | None = None        # {"trial": N, "epoch": k}: it went on from trial N's state after epoch k
    resume_refused: str | None = None       # why it started from epoch 0 although a state was recorded
    pretrained: bool | None = None          # its model started from pretrained weights (None: not recorded)

    number = property(lambda self: self.trial.number)
    state = property(lambda self: self.trial.state)
    value = property(lambda self: self.trial.value)
    params = property(lambda self: self.trial.params)
    intermediate_values = property(lambda self: self.trial.intermediate_values)

    @functools.cached_property
    def run(self) -> Run | None:
        value = self.trial.value
        if (self.trial.state == TrialState.COMPLETE and _number(value) and self.seed is not None
                and self.val is not None and self.test is not None and self.test.avg_train_weighted is not None):
            return Run(self, float(value), self.seed, self.val, self.test)
        return None


@dataclass(frozen=True)
class Run:
    """A finished trial's result, as the tables, figures and rankings read it: a COMPLETE trial whose value, seed
    and val and test metrics are numbers."""
    record: TrialRecord
    value: float                # the selection metric at the selected epoch
    seed: int
    val: Metrics
    test: Metrics               # with both averages

    number = property(lambda self: self.record.number)
    pretrained = property(lambda self: self.record.pretrained)
    epochs_run = property(lambda self: self.record.epochs_run)
    best_epoch = property(lambda self: self.record.best_epoch)
    first_own_epoch = property(lambda self: self.record.first_own_epoch)

    @property
    def rank_key(self) -> tuple:
        """The one ranking rule of trials (replicate's top k, status, the report's best trial and configuration):
        the selection metric, ties broken by the val average (it reads no group label), then fewer epochs, then the
        earlier trial."""
        return self.value, self.val.avg_plain, -self.epochs_run, -self.number


def _v1(attrs: dict) -> dict:
    """Schema 1 → 2: records of earlier versions hold the same attributes, some not yet written: the first own epoch
    (1: every epoch selectable), the worst-class accuracy and each group's label and attribute (left unknown)."""
    return {"first_own_epoch": 1, **attrs, "schema": 2}


_MIGRATIONS = {1: _v1}


def read(t: FrozenTrial) -> TrialRecord:
    """The typed record of a stored trial. RecordError: written by a newer version (its schema named)."""
    attrs = dict(t.user_attrs)
    schema = attrs.get("schema", 1)
    if not isinstance(schema, int) or schema > SCHEMA or schema < 1:
        raise RecordError(f"trial {t.number} holds a record of schema {schema!r}; this version reads schemas 1 to "
                          f"{SCHEMA}: run a newer version of the study package")
    while schema < SCHEMA:
        attrs = _MIGRATIONS[schema](attrs)
        schema = attrs["schema"]
    seconds = attrs.get("train_seconds")
    return TrialRecord(
        trial=t, seed=_int(attrs.get("seed")), epochs_run=_int(attrs.get("epochs_run")) or 0,
        train_seconds=float(seconds) if _number(seconds) and seconds >= 0 else 0.0,
        best_epoch=_int(attrs.get("best_epoch")), first_own_epoch=_int(attrs.get("first_own_epoch")) or 1,
        val=Metrics.parse(attrs.get("val")), test=Metrics.parse(attrs.get("test")),
        fail_reason=_str(attrs.get("fail_reason")),
        config=_int(attrs.get("config")), rank=_int(attrs.get("rank")),
        data_checksum=_str(attrs.get("data_checksum")), command=_str(attrs.get("command")),
        model=_str(attrs.get("model_artifact")), model_sha256=_str(attrs.get("model_sha256")),
        diagnostics={k: v for k, v in attrs.items() if isinstance(v, list)},
        resume_state=StateRef.parse(attrs.get("resume_state")), resume_files=_files(attrs.get("resume_files")),
        resumed_from=attrs.get("resumed_from") if isinstance(attrs.get("resumed_from"), dict) else None,
        resume_refused=_str(attrs.get("resume_refused")), pretrained=_recipe_flag(attrs.get("recipe"), "pretrained"))


def _recipe_flag(recipe: Any, key: str) -> bool | None:
    value = recipe.get(key) if isinstance(recipe, dict) else None
    return value if isinstance(value, bool) else None


def read_all(trials: Iterable[FrozenTrial]) -> list[TrialRecord]:
    return [read(t) for t in trials]


def ranked(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The trials with a result, best first (`Run.rank_key`)."""
    runs = [(r.run.rank_key, r) for r in records if r.run]
    return [r for _, r in sorted(runs, key=lambda p: p[0], reverse=True)]


def best(records: Iterable[TrialRecord]) -> TrialRecord | None:
    top = ranked(records)
    return top[0] if top else None


def plan(seed: int | None = None, *, config: int | None = None, rank: int | None = None,
         reference: bool = False) -> dict[str, Any]:
    """The user attributes of a trial to enqueue: what it is (`config`/`rank`: a seed-phase run of that searched
    trial; `reference`: a method's published parameters)."""
    out: dict[str, Any] = {"schema": SCHEMA}
    if seed is not None:
        out["seed"] = seed
    if config is not None:
        out |= {"config": config, "rank": rank}
    if reference:
        out["reference"] = True
    return out


def planned_seed(trial: optuna.Trial, default: int) -> int:
    """The training seed a trial's plan names (a seed-phase run), else `default` (the experiment's)."""
    seed = _int(trial.user_attrs.get("seed"))
    return default if seed is None else seed


def inherited(t: FrozenTrial) -> dict[str, Any]:
    """The plan of a trial, for its retry."""
    return {k: v for k, v in t.user_attrs.items() if k in PLAN_KEYS}


def _round(m: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()}


class Writer:
    """Writes one running trial's record (each call a storage write; the dashboard re-reads them every few
    seconds, so they stay small)."""

    def __init__(self, trial: optuna.Trial):
        self.trial, self.t0 = trial, time.time()

    def start(self, seed: int, command: str, recipe: dict, code_version: str) -> None:
        for key, value in (("schema", SCHEMA), ("command", command), ("recipe", recipe), ("seed", seed),
                           ("code_version", code_version), ("worker", f"{socket.gethostname()}:{os.getpid()}")):
            self.trial.set_user_attr(key, value)

    def checksum(self, value: str) -> None:
        self.trial.set_user_attr("data_checksum", value)

    def seconds(self) -> None:
        """The compute so far: written before each epoch's report, so that a killed trial's compute counts."""
        self.trial.set_user_attr("train_seconds", round(time.time() - self.t0, 2))

    def model(self, artifact: str, sha: str) -> None:
        """The kept model: its artifact id (optuna-dashboard lists it on the trial's page) and the file's sha256."""
        self.trial.set_user_attr("model_artifact", artifact)
        self.trial.set_user_attr("model_sha256", sha)

    def state(self, ref: StateRef | None) -> None:
        """The trial's last resumable state (None: removed, the trial ended)."""
        self.trial.set_user_attr("resume_state", None if ref is None else dataclasses.asdict(ref))

    def state_files(self, artifacts: list[str]) -> None:
        """The state files the trial may hold: named before a file is written, dropped only once it is removed, so
        that a worker killed anywhere leaves no file that no trial names."""
        self.trial.set_user_attr("resume_files", {"artifacts": artifacts})

    def resumed(self, number: int, epoch: int) -> None:
        self.trial.set_user_attr("resumed_from", {"trial": number, "epoch": epoch})

    def resume_refused(self, reason: str) -> None:
        self.trial.set_user_attr("resume_refused", reason[:500])

    def failed(self, reason: str) -> None:
        self.trial.set_user_attr("fail_reason", reason[:500])

    def finish(self, logged: Iterable[str], history: list[dict], result: FitResult | None = None) -> None:
        """The end of a run: its epochs, seconds and the method's diagnostics per epoch (None where undefined),
        and with a `FitResult` (a completed run) its selected epoch and val/test metrics."""
        self.trial.set_user_attr("epochs_run", len(history))
        self.seconds()
        for key in logged:
            self.trial.set_user_attr(key, [h.get(key) for h in history])
        if result is not None:
            for key in ("best_epoch", "first_own_epoch", "selection", "device", "data_checksum"):
                self.trial.set_user_attr(key, getattr(result, key))
            self.trial.set_user_attr("val", _round(result.val))
            self.trial.set_user_attr("test", _round(result.test))
