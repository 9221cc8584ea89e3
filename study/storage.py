"""Optuna RDB storage: PostgreSQL (psycopg2) for the service, an embedded SQLite file by default."""
from __future__ import annotations

import abc
import contextlib
import copy
import fcntl
import hashlib
import math
import os
import tempfile
import sys
import time
import uuid
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, DisconnectionError, InterfaceError, OperationalError,
                            PendingRollbackError, SQLAlchemyError)

from .records import inherited

DEFAULT_STORAGE = "sqlite:///studies.db"
HEARTBEAT_INTERVAL = 60  # seconds between heartbeats of a running trial
GRACE_PERIOD = 180       # a trial silent this long is stale: failed and re-queued with the same parameters
MAX_RETRY = 3            # re-queues per trial lineage after a dead worker
STORAGE_TIMEOUT = 600    # seconds of database outage that a worker's storage calls ride out before it gives up
IDLE_TRANSACTION_TIMEOUT = 60  # the longest a frozen worker can stall the others' claims on PostgreSQL (seconds)
INTERACTIVE_TIMEOUT = 15  # the same for interactive commands (init, status, replicate, report, dashboard)
PLACEHOLDER_PASSWORDS = {"change-me", "changeme"}  # the deploy files' placeholders: refused, never used


class StorageError(RuntimeError):
    """The storage cannot be reached or the URL is invalid; the message has the URL with its password masked."""


class StorageUnavailable(StorageError):
    """The database stayed unreachable longer than the storage timeout."""


# Connection errors that waiting cannot fix: reported at once instead of retried.
_PERMANENT = ("authentication failed", "does not exist", "no password supplied", "permission denied",
              "unable to open database file", "invalid dsn", "could not translate host name", "readonly database",
              "no such table")
# What a connection cut off by a restart says when the driver does not raise it as a connection error (libpq's
# answer to a half-read result, a commit on a dead connection):
_TRANSIENT = ("server closed the connection", "connection already closed", "terminating connection",
              "no connection to the server", "could not receive data", "ssl syscall error",
              "no message from the libpq", "the database system is")


def _chain(e: BaseException | None, as_shown: bool = False) -> Iterator[BaseException]:
    """e, then what it was raised from or during, outermost first; as_shown: as a traceback shows it (a context
    hidden by `raise ... from None` left out)."""
    while e is not None:
        yield e
        e = e.__cause__ or (None if as_shown and e.__suppress_context__ else e.__context__)


def _connection_error(e: BaseException | None) -> BaseException | None:
    """The transient connection-level database error in e's cause chain (server down or restarting), if any."""
    for e in _chain(e):
        text = str(e).lower()
        # PendingRollbackError: a session whose connection died mid-transaction (SQLAlchemy wants the rollback that
        # Optuna's commit path has just attempted): a new session on a new connection succeeds
        if isinstance(e, (OperationalError, InterfaceError, DisconnectionError, PendingRollbackError)) or (
                isinstance(e, DBAPIError) and e.connection_invalidated) or (
                isinstance(e, SQLAlchemyError) and any(p in text for p in _TRANSIENT)):
            return None if any(p in text for p in _PERMANENT) else e
    return None


def database_error(e: BaseException | None) -> bool:
    """An error of the database or of Optuna's storage layer in e's chain as Python shows it (not the trial's own
    doing; a StorageUnavailable, raised `from None`, is the worker's to report, not a trial's)."""
    return any(isinstance(c, (SQLAlchemyError, optuna.exceptions.StorageInternalError)) for c in _chain(e, True))


def cause_chain(e: BaseException | None) -> str:
    """The exception's class chain, outermost first, with the innermost message (what a one-line report hides)."""
    chain = list(_chain(e))
    return " <- ".join(type(c).__name__ for c in chain) + (f": {first_line(chain[-1])}" if chain else "")


def first_line(e: BaseException) -> str:
    """The first line of a (database) error's message, for one-line reports."""
    return (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]


def ride_out(call, url: str, timeout: float, what: str = ""):
    """call() until it succeeds; connection errors are retried with exponential backoff (0.5 s doubling to 10 s)
    for up to `timeout` seconds, then StorageUnavailable naming the masked URL and the error."""
    start, delay, announced, attempt = time.monotonic(), 0.5, False, 0
    while True:
        try:
            return call(attempt)
        except Exception as e:
            cause = _connection_error(e)
            if cause is None:
                raise
            waited = time.monotonic() - start
            if waited >= timeout:
                raise StorageUnavailable(f"storage {mask_url(url)} unreachable for {waited:.0f} s (limit {timeout:g} s"
                                         f", STUDY_STORAGE_TIMEOUT): {first_line(cause)}") from None
            if not announced:
                print(f"storage {mask_url(url)} unreachable{what} ({first_line(cause)}); retrying for up to "
                      f"{timeout:g} s", file=sys.stderr, flush=True)
                announced = True
            time.sleep(min(delay, max(0.0, timeout - waited)))
            delay, attempt = min(2 * delay, 10.0), attempt + 1


class ResilientStorage(BaseStorage, BaseHeartbeat):
    """Optuna's RDBStorage behind a wrapper whose every call rides out a database restart (see `ride_out`); once it
    has given up, every later call fails at once, so a worker stops with one error instead of waiting again in each
    layer. It wraps rather than subclasses: Optuna puts its `_CachedStorage` (finished trials read once) in front
    of any RDBStorage, and that cache calls the RDBStorage's private methods (`_create_new_trial`, `_get_trials`,
    ...), which a subclass's riding-out never reached. Here the order is the other way round: this wrapper, then
    Optuna's cache, then the RDBStorage; every call a worker makes enters through this wrapper's public methods, and
    a connection error raised anywhere below is ridden out here. Nothing of Optuna's is patched.

    Writes whose first attempt may have committed before the connection died are made safe to repeat: a new trial
    carries a token, found again instead of created twice (a second, parameterless RUNNING trial otherwise waits
    out the grace period); a parameter already written is not written again; a final state already set counts as
    set. A waiting trial popped by a cut-off attempt (`set_trial_state_values(..., RUNNING)` answering False on the
    repeat) stays RUNNING without a heartbeat and is re-queued with its parameters after the grace period."""

    def __init__(self, rdb: RDBStorage, url: str, timeout: float):
        from optuna.storages._cached_storage import _CachedStorage
        self.rdb, self.backend = rdb, _CachedStorage(rdb)  # what Study would build: finished trials read once
        self._url, self._timeout = url, timeout
        self._gave_up: str | None = None

    @property
    def engine(self) -> sqlalchemy.engine.Engine:
        return self.rdb.engine

    def _ride(self, name: str, call):
        """call(attempt) ridden out; attempt > 0 is a repeat after a connection error (the cut-off attempt may have
        committed: a write that must not happen twice looks first)."""
        if self._gave_up:
            raise StorageUnavailable(self._gave_up)
        try:
            return ride_out(call, self._url, self._timeout, f" ({name})")
        except StorageUnavailable as e:
            self._gave_up = str(e)
            raise
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:  # not ridden out: the whole chain
            print(f"storage call {name} failed: {cause_chain(e)}", file=sys.stderr, flush=True)
            raise

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        token = uuid.uuid4().hex
        template = copy.deepcopy(template_trial) if template_trial is not None else FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(), datetime_complete=None,
            params={}, distributions={}, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=-1)
        template.system_attrs = {**template.system_attrs, CREATE_TOKEN: token}

        def create(attempt: int) -> int:
            if attempt:
                for t in self.backend.get_all_trials(study_id, deepcopy=False):
                    if t.system_attrs.get(CREATE_TOKEN) == token:
                        return t._trial_id  # the cut-off attempt had committed
            return self.backend.create_new_trial(study_id, template)
        return self._ride("create_new_trial", create)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: optuna.distributions.BaseDistribution) -> None:
        def write(attempt: int) -> None:
            if not (attempt and param_name in self.backend.get_trial(trial_id).distributions):
                self.backend.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._ride("set_trial_param", write)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        def set_state(attempt: int) -> bool:
            try:
                return self.backend.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                if attempt and state.is_finished():
                    return True  # the attempt cut off by the outage had committed the final state
                raise
        return self._ride("set_trial_state_values", set_state)

    # The creation token stays in the database, out of every trial read through this wrapper.
    def get_trial(self, trial_id: int) -> FrozenTrial:
        return _untoken(self._ride("get_trial", lambda _: self.backend.get_trial(trial_id)))

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return [_untoken(t) for t in self._ride("get_all_trials", lambda _: self.backend.get_all_trials(
            study_id, deepcopy=deepcopy, states=states))]

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return _untoken(self._ride("get_best_trial", lambda _: self.backend.get_best_trial(study_id)))

    def delete_study(self, study_id: int) -> None:
        def delete(attempt: int) -> None:
            try:
                self.backend.delete_study(study_id)
            except KeyError:
                if not attempt:
                    raise  # else the cut-off attempt had committed
        self._ride("delete_study", delete)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        attrs = self._ride("get_trial_system_attrs", lambda _: self.backend.get_trial_system_attrs(trial_id))
        return {k: v for k, v in attrs.items() if k != CREATE_TOKEN}

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._ride("record_heartbeat", lambda _: self.rdb.record_heartbeat(trial_id))
        except StorageUnavailable:
            pass  # the heartbeat thread stays quiet: the worker's own next storage call reports the outage

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (heartbeat older than the grace period) plus RUNNING trials that never had a
        heartbeat and started longer than the grace period ago (a write cut off by an outage may leave one)."""
        return self._ride("fail_stale_trials", lambda _: self._stale(study_id))

    def _stale(self, study_id: int) -> list[int]:
        from datetime import timedelta, timezone

        from optuna.storages._rdb import models
        b = self.rdb
        stale = b._get_stale_trial_ids(study_id)
        grace = b.grace_period or 2 * (b.heartbeat_interval or 0)
        now = datetime.now(timezone.utc).replace(tzinfo=None)  # Optuna 5 stores datetime_start as naive UTC
        with b.scoped_session() as session:
            silent = (session.query(models.TrialModel.trial_id)
                      .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING,
                              ~models.TrialModel.heartbeats.any(),
                              models.TrialModel._datetime_start_utc < now - timedelta(seconds=grace)).all())
        b.scoped_session.remove()
        return stale + [t for (t,) in silent if t not in stale]

    def get_heartbeat_interval(self) -> int | None:
        return self.rdb.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self):
        return self.rdb.get_heartbeat_stale_trial_callback()

    def remove_session(self) -> None:
        self.backend.remove_session()


CREATE_TOKEN = "create_token"  # system attr: finds a trial again whose creation was cut off by an outage


def _untoken(trial: FrozenTrial) -> FrozenTrial:
    trial.system_attrs.pop(CREATE_TOKEN, None)  # a cached finished trial loses it once: it is never needed again
    return trial


def _delegate(name: str):
    def call(self, *args, **kwargs):
        return self._ride(name, lambda _: getattr(self.backend, name)(*args, **kwargs))
    call.__name__ = call.__qualname__ = name
    call.__doc__ = getattr(BaseStorage, name).__doc__
    return call


for _name in [n for n, v in vars(BaseStorage).items() if callable(v) and not n.startswith("_")
              and n not in vars(ResilientStorage)]:
    setattr(ResilientStorage, _name, _delegate(_name))
abc.update_abstractmethods(ResilientStorage)  # type: ignore[type-abstract]  # concrete from here on


def storage_url(url: str | None = None) -> str:
    return url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE


def read_storage_file(path: str) -> str:
    """The storage URL from the first line of a regular file that only its owner can read (it holds the password)."""
    from trainer.files import read_regular
    p = Path(path)
    try:
        mode = p.stat().st_mode
        data = read_regular(p, limit=64 * 1024)
        if data is None:
            raise FileNotFoundError(2, "No such file or directory")
        text = data.decode().strip()
    except OSError as e:
        raise StorageError(f"storage file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise StorageError(f"storage file {path}: not text (expected a storage URL on its first line)") from None
    if mode & 0o077:
        raise StorageError(f"storage file {path}: readable by other users (mode {mode & 0o777:o}): chmod 600 {path}")
    if not text:
        raise StorageError(f"storage file {path}: empty (expected a storage URL on its first line)")
    return text.splitlines()[0].strip()


def from_flags(storage: str | None, storage_file: str | None) -> tuple[str | None, str | None]:
    """(URL, the file it came from) for a command's --storage / --storage-file (else $OPTUNA_STORAGE_FILE when no
    --storage is given); the URL None: $OPTUNA_STORAGE or the default."""
    if storage and storage_file:
        raise ValueError("give --storage or --storage-file, not both")
    storage_file = storage_file or (None if storage else os.environ.get("OPTUNA_STORAGE_FILE"))
    return (read_storage_file(storage_file) if storage_file else storage), storage_file


_SECRET_KEYS = ("pass", "secret", "token", "key")  # query parameters that carry credentials (password=, sslpassword=)


def mask_url(url: str) -> str:
    """The URL with every credential replaced by ***: the password of user:password@ (split at the last '@', so a
    password with an unescaped '@' is hidden whole) and credential query parameters (?password=...)."""
    url = str(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<unparseable storage URL>"
    head, q, query = rest.partition("?")
    if "@" in head:
        userinfo, _, host = head.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        head = f"{user}{':***' if colon else ''}@{host}"
    if q:
        parts = []
        for item in query.split("&"):
            key, eq, value = item.partition("=")
            parts.append(f"{key}=***" if eq and any(k in key.lower() for k in _SECRET_KEYS) else item)
        query = "&".join(parts)
    return f"{scheme}://{head}{q}{query}"


def seconds(raw, what: str, source: str, positive: bool = False) -> float:
    """A duration from a flag or an environment variable (`source` names both): a finite number of seconds, >= 0
    (> 0 when `positive`), else StorageError naming the value."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise StorageError(f"{what} {raw!r} ({source}): expected a finite number of seconds "
                           f"{'>' if positive else '>='} 0")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise StorageError(f"{name}={raw!r}: expected a whole number of seconds >= 1")
    return value


def _has_optuna_tables(path: str) -> bool:
    import sqlite3
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'studies'")
            return bool(found.fetchone())
    except sqlite3.Error:
        return False


@contextlib.contextmanager
def _file_lock(path: str, wait: bool = True) -> Iterator[bool]:
    """An flock on a file in the temp directory named after `path` (released by the kernel if the process dies);
    yields whether it is held (with wait=False, False when another process holds it)."""
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"debias-study-{key}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_storage(url: str | None = None, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int = MAX_RETRY, timeout: float | None = None,
                 default_timeout: float = STORAGE_TIMEOUT, read_only: bool = False) -> ResilientStorage:
    """The storage at `url`; connection errors (also while opening it) are ridden out for `timeout` seconds
    (default $STUDY_STORAGE_TIMEOUT, else `default_timeout`: 600 s for workers, 15 s for interactive commands).
    `read_only` (status, report, dashboard): open an existing Optuna storage without creating or migrating one."""
    url = storage_url(url)
    userinfo = url.partition("://")[2].partition("?")[0].rpartition("@")[0]
    if "@" in userinfo:  # the driver would echo the password's tail as a host name
        raise StorageError(f"storage {mask_url(url)}: the password contains an unescaped '@': write it as %40")
    timeout = seconds(timeout if timeout is not None else os.environ.get("STUDY_STORAGE_TIMEOUT", default_timeout),
                      "storage timeout", "--storage-timeout / STUDY_STORAGE_TIMEOUT")
    for flag, value in (("--heartbeat-interval", heartbeat_interval), ("--grace-period", grace_period)):
        if value is not None and value < 1:
            raise StorageError(f"{flag} {value}: expected a whole number of seconds >= 1")
    interval = heartbeat_interval or _env_int("STUDY_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
    grace = grace_period or _env_int("STUDY_GRACE_PERIOD", max(GRACE_PERIOD, 3 * interval))
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"invalid storage URL {mask_url(url)!r}") from None
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise StorageError(f"storage {url!r} keeps nothing (an in-memory database): give sqlite:///FILE")
        if read_only and not Path(parsed.database).is_file():
            raise StorageError(f"storage {mask_url(url)}: no such file {parsed.database!r}")
        if read_only and not _has_optuna_tables(parsed.database):
            raise StorageError(f"storage {mask_url(url)}: {parsed.database!r} is not an Optuna storage (left as it is)")
        # Several local processes share the file: wait for the lock instead of failing.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    elif dialect == "postgresql":
        password = parsed.password if parsed.password is not None else os.environ.get("PGPASSWORD")
        if password is not None and password.strip().lower() in PLACEHOLDER_PASSWORDS:
            raise StorageError(f"storage {mask_url(url)}: the password is the placeholder {password!r} of the deploy "
                               "files (.env.example, the Kubernetes Secret): set a real one")
        if parsed.drivername not in ("postgresql", "postgresql+psycopg2"):
            raise StorageError(f"use the psycopg2 driver (postgresql://...), not {parsed.drivername!r}: "
                               "psycopg 3 breaks best_trial (optuna#6096)")
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3: name psycopg2 explicitly.
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        # pre-ping survives database restarts; small pools keep workers x pool + dashboard < max_connections.
        # The server ends a session idle in a transaction for longer than IDLE_TRANSACTION_TIMEOUT: a frozen worker
        # (SIGSTOP, a paused VM) cannot hold a claim lock or a row lock that stalls the others for longer.
        idle = _env_int("STUDY_IDLE_TRANSACTION_TIMEOUT", IDLE_TRANSACTION_TIMEOUT)
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 3600,
                         "connect_args": {"connect_timeout": 10,
                                          "options": f"-c idle_in_transaction_session_timeout={idle * 1000}"}}
    else:
        raise StorageError(f"unsupported storage {mask_url(url)!r}: use postgresql:// or sqlite:///")

    retry = CleanRetry(max_retry=max_retry)

    def open_storage(_):
        # Two processes creating Optuna's tables in one new SQLite file race (UNIQUE constraint failed:
        # alembic_version): the creation is serialised per file.
        lock = _file_lock(parsed.database) if dialect == "sqlite" else contextlib.nullcontext()
        with lock:
            backend = LockingRDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                                        grace_period=grace, heartbeat_stale_trial_callback=retry,
                                        skip_table_creation=read_only)
        return ResilientStorage(backend, url, timeout)
    try:
        return ride_out(open_storage, url, timeout, " (connecting)")
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError) as e:
        # the database's own words (Optuna's schema check wraps them in "exceeding max length", say)
        cause = next((c for c in _chain(e) if isinstance(c, SQLAlchemyError)), e)
        raise StorageError(f"cannot open storage {mask_url(url)}: {first_line(cause)}") from None


class LockingRDBStorage(RDBStorage):
    """Optuna's RDB storage, but a study's delete locks it first. Optuna's delete ignores an integrity error at
    commit, and a running worker's write to one of the study's trials landing between the cascade's reads and its
    deletes makes one: the study then silently stays (on PostgreSQL, whenever a write races the delete). Here the
    study's row and its trials' rows are locked before the cascade, so such a write waits for the delete and then
    fails on the missing trial (the worker says its experiment was deleted); any other integrity error is raised."""

    def delete_study(self, study_id: int) -> None:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            study = session.query(models.StudyModel).filter(models.StudyModel.study_id == study_id) \
                .with_for_update().one_or_none()
            if study is None:
                raise KeyError(f"No study with study_id {study_id} exists.")
            session.query(models.TrialModel).filter(models.TrialModel.study_id == study_id).with_for_update().all()
            session.delete(study)


class CleanRetry(RetryHeartbeatStaleTrialCallback):
    """Re-queues a dead trial with the same parameters, like Optuna's callback, but the retry inherits only the
    identity attributes (seed, configuration), never the dead trial's fail_reason, metrics or seconds. (The storage
    makes the re-queue safe to repeat across an outage: it is added once, not zero or two times.)"""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if self._max_retry is not None and self._max_retry < len(history):
            return
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            system_attrs={"failed_trial": trial.number, **trial.system_attrs, "retry_history": history},
            user_attrs=inherited(trial)))


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries (a lineage counts once)."""
    with warnings.catch_warnings():  # retry_history is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def advisory_key(text: str) -> int:
    """A signed 64-bit PostgreSQL advisory-lock key named by `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def named_lock(storage: ResilientStorage, name: str, wait: bool = True) -> Iterator[bool]:
    """A lock named `name` across every process using the storage; yields whether it is held (with wait=False, False
    at once when another process holds it). PostgreSQL: a transaction-level advisory lock, released by the server
    when the holder dies or stays idle in its transaction for longer than the idle-transaction timeout (a frozen
    holder: SIGSTOP, a paused VM). SQLite: an flock on a file in the temp directory, released by the kernel when the
    holder dies (a frozen holder keeps it until it resumes)."""
    if storage.engine.dialect.name == "postgresql":
        conn = storage.engine.connect()
        try:
            trans = conn.begin()
            key = {"k": advisory_key(name)}
            held = conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)" if wait else
                                                "SELECT pg_try_advisory_xact_lock(:k)"), key).scalar() is not False
            yield held
            try:
                trans.commit()
            except SQLAlchemyError:  # the server ended the session (idle timeout, restart): the lock went with it
                pass
        finally:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()
        return
    with _file_lock(f"{storage.engine.url.database}.{name}", wait) as held:
        yield held


def study_lock(storage: ResilientStorage, study_name: str):
    """Serialises the claim of a study's next trial across every worker, so that counting the budget and taking or
    creating the trial happen as one step. Never waits: a worker that finds it held takes work from another study,
    so a frozen holder stalls only its own study's claims, on PostgreSQL for at most the idle-transaction timeout."""
    return named_lock(storage, f"debias-study-claim:{study_name}", wait=False)
