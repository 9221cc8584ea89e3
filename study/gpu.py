"""One GPU per worker: each worker claims a free GPU index with a lock held for its lifetime.

`docker compose up --scale worker=N` gives every replica the same GPU reservation (docker/compose#11863), so the
workers choose among themselves: the first free index wins. On PostgreSQL the lock is a session advisory lock
on a connection of its own (released by the server when the process dies, however it dies); on SQLite it is an
flock on a file in the temp directory (released by the kernel likewise). Workers that share a database but run
on different machines set STUDY_GPU_HOST to the machine's name so that their indices do not collide.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

GPUS_ENV = "STUDY_GPUS"        # comma-separated GPU indices: overrides detection ("" = no GPU)
HOST_ENV = "STUDY_GPU_HOST"    # the machine whose GPUs are claimed (default: one machine for the whole storage)
SHARE_ENV = "STUDY_SHARE_GPUS"  # 1: with every GPU claimed, share one instead of waiting


def gpu_indices() -> list[int]:
    value = os.environ.get(GPUS_ENV)
    if value is not None:
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{GPUS_ENV}={value!r}: expected comma-separated GPU indices, e.g. 0,1,2,3") from None
    import torch
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _key(host: str, index: int) -> int:
    """The advisory-lock key of (host, GPU index)."""
    from .storage import advisory_key
    return advisory_key(f"debias-study-gpu:{host}:{index}")


class PostgresGpuLock:
    def __init__(self, url: str, host: str):
        self.url, self.host = url, host
        self.index: int | None = None  # the claimed GPU
        self.conn = self._connect()

    def _connect(self):
        import psycopg2
        conn = psycopg2.connect(make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False),
                                connect_timeout=10)
        conn.autocommit = True
        return conn

    def try_claim(self, index: int) -> bool:
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (_key(self.host, index),))
            return bool(cur.fetchone()[0])

    def keep(self, log=print) -> None:
        """Between trials: a database restart ends the lock's session; take the same GPU's lock again."""
        index = self.index
        if index is None:
            return  # nothing claimed
        import psycopg2
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT 1")
            return
        except psycopg2.Error:
            pass
        try:
            self.conn = self._connect()
            if not self.try_claim(index):
                log(f"worker {os.getpid()}: GPU {index} was claimed by another worker while the database was "
                    "restarting; both now share it")
        except psycopg2.Error:
            pass  # still down: the storage calls ride it out or stop the worker


class FileGpuLock:
    def __init__(self, host: str):
        self.dir = Path(tempfile.gettempdir()) / f"debias-study-gpus-{hashlib.sha256(host.encode()).hexdigest()[:8]}"
        self.dir.mkdir(exist_ok=True)
        self.held: list = []
        self.index: int | None = None  # the claimed GPU

    def keep(self, log=print) -> None:
        pass  # the kernel holds the lock as long as the process

    def try_claim(self, index: int) -> bool:
        f = open(self.dir / f"gpu{index}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self.held.append(f)  # kept open: the lock lives as long as the process
        return True


def claim_gpu(storage_url: str, gpus: list[int], share: bool, poll: float, log=print):
    """(index, lock): the first free GPU of `gpus`, waiting while all are claimed (or sharing, if `share`).
    Keep the returned lock referenced: the claim ends with it."""
    host = os.environ.get(HOST_ENV, "default")
    pg = make_url(storage_url).get_backend_name() == "postgresql"
    lock: PostgresGpuLock | FileGpuLock
    if pg:
        import psycopg2
        try:
            lock = PostgresGpuLock(storage_url, host)
        except psycopg2.Error as e:
            from .storage import StorageError, first_line, mask_url
            raise StorageError(f"cannot claim a GPU through {mask_url(storage_url)}: {first_line(e)}") from None
    else:
        lock = FileGpuLock(host)
    waiting = False
    while True:
        for i in gpus:
            if lock.try_claim(i):
                log(f"worker {os.getpid()}: claimed GPU {i} of {gpus}")
                lock.index = i
                return i, lock
        if share:
            i = gpus[os.getpid() % len(gpus)]
            log(f"worker {os.getpid()}: all GPUs {gpus} are claimed; sharing GPU {i} ({SHARE_ENV}=1)")
            return i, None
        if not waiting:
            log(f"worker {os.getpid()}: all GPUs {gpus} are claimed by other workers; waiting for one to be released")
            waiting = True
        time.sleep(poll)


def select_device(storage_url: str, device: str, share: bool, poll: float, log=print):
    """(device, lock). An explicit device is used as given; `auto` claims a GPU when there is one (looking again
    every `poll` seconds while all are claimed), else the CPU."""
    if device != "auto":
        return device, None
    gpus = gpu_indices()
    if not gpus:
        return "cpu", None
    index, lock = claim_gpu(storage_url, gpus, share, poll=poll, log=log)
    import torch
    if not torch.cuda.is_available():  # STUDY_GPUS set on a host without CUDA
        log(f"worker {os.getpid()}: GPU {index} claimed but CUDA is not available here: training on the CPU")
        return "cpu", lock
    return f"cuda:{index}", lock
