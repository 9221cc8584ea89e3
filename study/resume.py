"""Trials that resume: a running trial keeps its resumable state (trainer/resume.py) in the experiment's artifact
store, and the retry of a trial that died or was stopped goes on from it.

A state is written after an epoch when the `Pacer` says it is worth it (its writes cost at most the experiment's
`resume_budget` of the training time, at least `resume_interval` seconds apart), and on a stop signal (`flush`:
the last snapshot, taken after every epoch while the same budget allows — every epoch, unless the copies
themselves are costly). Each write is a new artifact id (a fresh UUID: two workers never write the same file),
listed in the trial's `resume_files` before its file exists, named as its `resume_state` once whole; the state it
replaces is removed after, and leaves the list at the next write: a worker killed anywhere leaves no file that no
trial names.
A trial that ends (COMPLETE, PRUNED, a failure that is not retried) removes its state and its ancestors'. The
retry (Optuna's `retry_history`) reads the newest ancestor state; one that is missing, damaged, of other settings
or other data is refused, and the retry starts from epoch 0 saying why (`resume_refused`): never a crash.
"""
from __future__ import annotations

import contextlib
import io
import time
import uuid
from typing import Callable

import optuna

from trainer.checkpoint import sha256
from trainer.resume import MAX_BYTES, Pacer, ResumeError, ResumeState, nbytes

from .records import StateRef, Writer, read


def ancestors(trial: optuna.Trial) -> list[optuna.trial.FrozenTrial]:
    """The trials this one retries, the newest first (the dead trial, its own dead ancestor, ...): Optuna's
    `retry_history`, read from the trial's system attributes (one query; a first attempt has none)."""
    storage, study_id = trial.study._storage, trial.study._study_id
    numbers = storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
    out = []
    for n in reversed(numbers if isinstance(numbers, list) else []):
        with contextlib.suppress(KeyError):  # a trial removed by hand
            out.append(storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, n)))
    return out


def read_state(store, ref: StateRef) -> ResumeState:
    """The state `ref` names, verified against its recorded size and sha256; ResumeError saying what is wrong."""
    if ref.bytes > MAX_BYTES:
        raise ResumeError(f"its recorded size {ref.bytes} bytes is beyond {MAX_BYTES}")
    try:
        with store.open_reader(ref.artifact) as f:
            data = f.read(ref.bytes + 1)
    except (OSError, ValueError, optuna.artifacts.exceptions.ArtifactNotFound) as e:
        raise ResumeError(f"its file {ref.artifact!r} cannot be read ({getattr(e, 'strerror', None) or e})") \
            from None
    if len(data) != ref.bytes:
        raise ResumeError(f"its file holds {len(data)} bytes, not the recorded {ref.bytes} (truncated or replaced)")
    if sha256(data) != ref.sha256:
        raise ResumeError("its file's sha256 is not the recorded one (damaged or replaced)")
    return ResumeState.from_bytes(data)


class StateKeeper:
    """One running trial's resumable states in the store: `offer` is fit's `on_state`."""

    def __init__(self, trial: optuna.Trial, store, writer: Writer, budget: float, interval: float,
                 guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.trial, self.store, self.writer, self.guard = trial, store, writer, guard
        self.pacer = Pacer(budget, interval)
        self.latest: ResumeState | None = None  # the last finished epoch's snapshot (written on a stop)
        self.ref: StateRef | None = None        # the last written one
        self.files: list[str] = []              # every file it may hold (listed in the trial first)
        self.on = store is not None and budget > 0
        self._ancestors: list[optuna.trial.FrozenTrial] | None = None

    @property
    def ancestors(self) -> list[optuna.trial.FrozenTrial]:
        """Read once (at the start: `find`), used again when the trial ends."""
        if self._ancestors is None:
            self._ancestors = ancestors(self.trial)
        return self._ancestors

    def find(self, hparams: dict, data_checksum: str, device: str
             ) -> tuple[ResumeState | None, int | None, str | None]:
        """(state, the trial it comes from, None) to go on from; (None, None, why not) when the newest ancestor's
        recorded state cannot be used; (None, None, None) when no ancestor recorded one."""
        for t in self.ancestors:
            ref = read(t).resume_state
            if ref is None:
                continue
            if self.store is None:
                return None, None, f"trial {t.number} recorded a state, but this worker has no artifact store"
            try:
                state = read_state(self.store, ref)
                state.check(hparams, data_checksum, device)
            except ResumeError as e:
                return None, None, f"trial {t.number}'s state after epoch {ref.epoch}: {e}"
            return state, t.number, None
        return None, None, None

    def offer(self, epoch: int, take: Callable[[], ResumeState]) -> None:
        if not (self.on and self.pacer.snapshot_due()):
            return
        t0 = time.monotonic()
        self.latest = take()
        self.pacer.snapshotted(time.monotonic() - t0)
        if self.pacer.due(nbytes(self.latest)):
            self.write()

    def write(self) -> None:
        """The latest snapshot into the store, whole, then named in the trial; the state it replaces removed.
        OSError (a full disk) propagates: it fails the trial, and the temporary file is gone."""
        state = self.latest
        assert state is not None
        with self.guard():  # a file and its name in the trial: never cut between them
            t0 = time.monotonic()
            data = state.to_bytes()
            artifact = f"state-{uuid.uuid4()}"
            self.files = [*(f for f in self.files if self.ref and f == self.ref.artifact), artifact]
            self.writer.state_files(self.files)
            self.store.write(artifact, io.BytesIO(data))
            ref = StateRef(artifact, state.epoch, sha256(data), len(data))
            try:
                self.writer.state(ref)
            except BaseException:
                self._remove(artifact)  # not named anywhere: never left behind
                raise
            old, self.ref = self.ref, ref
            if old is not None:
                self._remove(old.artifact)
            else:  # this trial's first state: its ancestors' are no longer needed
                self._remove_ancestors()
            self.pacer.wrote(time.monotonic() - t0, len(data))

    def flush(self) -> None:
        """On a stop: the last finished epoch's state, unless it is written already."""
        if self.on and self.latest is not None and (self.ref is None or self.ref.epoch != self.latest.epoch):
            self.write()

    def discard(self) -> None:
        """The trial ended and will not be retried: its state and its ancestors' are removed."""
        if self.store is None:
            return
        if self.ref is not None:
            self._remove(self.ref.artifact)
            self.writer.state(None)
            self.ref = None
        for artifact in self.files:  # a write that failed (a full disk): its file is gone, a name may not be
            self._remove(artifact)
        self._remove_ancestors()

    def _remove_ancestors(self) -> None:
        for t in self.ancestors:
            record = read(t)
            named = {record.resume_state.artifact} if record.resume_state else set()
            for artifact in named | set(record.resume_files):
                self._remove(artifact)

    def _remove(self, artifact: str) -> None:
        with contextlib.suppress(OSError, optuna.artifacts.exceptions.ArtifactNotFound):
            self.store.remove(artifact)
