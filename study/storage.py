"""Optuna RDB storage: PostgreSQL (psycopg2) for the service, an embedded SQLite file by default."""
from __future__ import annotations

import os
import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

DEFAULT_STORAGE = "sqlite:///studies.db"
HEARTBEAT_INTERVAL = 60  # seconds between heartbeats of a running trial
GRACE_PERIOD = 180       # a trial silent this long is stale: failed and re-queued with the same parameters
MAX_RETRY = 3            # re-queues per trial lineage after a dead worker


class StorageError(RuntimeError):
    """The storage cannot be reached or the URL is invalid; the message has the URL with its password masked."""


def storage_url(url: str | None = None) -> str:
    return url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def make_storage(url: str | None = None, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int = MAX_RETRY) -> RDBStorage:
    url = storage_url(url)
    interval = heartbeat_interval or int(os.environ.get("STUDY_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL))
    grace = grace_period or int(os.environ.get("STUDY_GRACE_PERIOD", max(GRACE_PERIOD, 3 * interval)))
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"invalid storage URL {mask_url(url)!r}") from None
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        # Several local processes share the file: wait for the lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif dialect == "postgresql":
        if parsed.drivername not in ("postgresql", "postgresql+psycopg2"):
            raise StorageError(f"use the psycopg2 driver (postgresql://...), not {parsed.drivername!r}: "
                               "psycopg 3 breaks best_trial (optuna#6096)")
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3: name psycopg2 explicitly.
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        # pre-ping survives database restarts; small pools keep workers x pool + dashboard < max_connections.
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 3600,
                         "connect_args": {"connect_timeout": 10}}
    else:
        raise StorageError(f"unsupported storage {mask_url(url)!r}: use postgresql:// or sqlite:///")
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=grace,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry))
    except (SQLAlchemyError, ImportError, ValueError) as e:
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(f"cannot open storage {mask_url(url)}: {first}") from None


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries (a lineage counts once)."""
    with warnings.catch_warnings():  # retry_history is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
