"""Shared fixtures: small image datasets written in the official layouts."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# decoded-image caches of the tests go to a scratch folder, not the user's cache (subprocesses inherit it)
os.environ.setdefault("DEBIAS_CACHE_DIR", tempfile.mkdtemp(prefix="debias-test-cache-"))
# pytest-xdist runs one test process per core: torch's default of a thread per core in each would oversubscribe
# the machine (an in-process 3-epoch fit took 60 s beside another test instead of 8 s). Set before torch is
# imported; subprocesses inherit it (workers started with --threads set their own).
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


# an idle worker looks for work again after 1 s, not 5: the tests' short trials end sooner than a poll
os.environ.setdefault("STUDY_POLL_SECONDS", "1")


def write_image(path: Path, rng: np.random.Generator, size: int = 32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path.name


def _rows(n_per_split=(8, 4, 4)):
    """(split, y, a) rows with every group present in every split."""
    out = []
    for split, n in enumerate(n_per_split):
        out += [(split, i % 2, (i // 2) % 2) for i in range(n)]
    return out


@pytest.fixture
def waterbirds_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (split, y, a) in enumerate(_rows()):
        rel = f"{'001.Black_footed_Albatross' if y else '002.Laysan_Albatross'}/img_{i}.jpg"
        write_image(tmp_path / rel, rng)
        lines.append(f"{i + 1},{rel},{y},{split},{a},/x/place_{i}.jpg")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def celeba_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    names = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Young"]
    rows = _rows()
    attr = [str(len(rows)), " ".join(names)]
    part = []
    for i, (split, y, a) in enumerate(rows):
        fname = f"{i + 1:06d}.jpg"
        write_image(tmp_path / "img_align_celeba" / fname, rng)
        vals = [-1, 1 if y else -1, 1 if a else -1, 1]
        attr.append(f"{fname} " + " ".join(f"{v:2d}" for v in vals))
        part.append(f"{fname} {split}")
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(attr) + "\n")
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    return tmp_path


@pytest.fixture
def folder_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    lines = ["filename,y,a,split"]
    for i, (split, y, a) in enumerate(_rows()):
        write_image(tmp_path / "images" / f"{i}.png", rng)
        lines.append(f"images/{i}.png,{y},{a},{['train', 'val', 'test'][split]}")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


# ---- PostgreSQL: the real server on this machine, a fresh database per test session (or per test) ----
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin(sql: str) -> None:
    import psycopg2
    conn = psycopg2.connect(PG_ADMIN.replace("postgresql+psycopg2", "postgresql"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


class PrivateCluster:
    """A PostgreSQL server of our own (initdb in a temp folder, its own port), for the tests that stop and restart
    the database: the shared server the other tests use in parallel keeps running."""

    def __init__(self, root: Path):
        import shutil
        import socket
        bindir = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]).parent
        self.data, self.pg_ctl = root / "pgdata", [str(bindir / "pg_ctl")]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(root, "postgres", "postgres")
            self.pg_ctl = ["runuser", "-u", "postgres", "--", *self.pg_ctl]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        subprocess.run([*self.pg_ctl[:-1], str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                        "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
        self.opts = f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        subprocess.run([*self.pg_ctl, "-D", str(self.data), "-o", self.opts, "-l", str(self.data.parent / "log"),
                        "-w", "start"], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        subprocess.run([*self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"], check=True,
                       capture_output=True, timeout=120)


@pytest.fixture
def private_cluster():
    import shutil
    if not Path("/usr/lib/postgresql").is_dir():
        pytest.skip("needs the PostgreSQL server binaries")
    root = Path(tempfile.mkdtemp(prefix="debias-test-pg-"))  # outside pytest's root-only tmp: postgres reads it
    c = PrivateCluster(root)
    yield c
    subprocess.run([*c.pg_ctl, "-D", str(c.data), "-m", "immediate", "stop"], capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_databases():
    """Factory of fresh databases; all are dropped at the end of the session."""
    created = []

    def new() -> str:
        name = f"debias_test_{uuid.uuid4().hex[:10]}"
        _admin(f"CREATE DATABASE {name}")
        created.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + "/" + name

    yield new
    # dropped by a process of their own that outlives the session: each DROP DATABASE waits for a checkpoint (about
    # a second on this server), which the session need not wait for
    drops = "".join(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);" for name in created)
    subprocess.Popen([sys.executable, "-c", DROP, PG_ADMIN.replace("postgresql+psycopg2", "postgresql"), drops],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


DROP = """
import sys, psycopg2
conn = psycopg2.connect(sys.argv[1])
conn.autocommit = True
with conn.cursor() as cur:
    for statement in filter(None, sys.argv[2].split(";")):
        cur.execute(statement)
"""


@pytest.fixture
def pg_url(pg_databases) -> str:
    return pg_databases()


def study_cli(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def start_worker(url: str, experiment: str, *extra, env=None, log=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study", "worker", "--experiment", experiment, "--storage", url,
                             "--threads", "1", *extra], stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def _in_process(main, name: str, args) -> subprocess.CompletedProcess:
    """`python -m NAME ...` in this process: the same code path as the subprocess (`__main__` only calls main)
    without paying for a fresh interpreter (and torch import) per case."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse refusals
            code = e.code
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def worker_here(url: str, experiment: str) -> int:
    """`python -m study worker` run in this process, for the tests whose subject is what the trials leave, not the
    worker's process (its signals, exits, restarts): the same loop, without a fresh interpreter's ~2.5 s of
    imports. Returns its exit status."""
    return study_main("worker", "--storage", url, "--experiment", experiment, "--device", "cpu",
                      "--threads", "1").returncode


def study_main(*args) -> subprocess.CompletedProcess:
    """`python -m study ...` in this process, for commands that never start a worker."""
    from study.cli import main
    return _in_process(main, "study", args)


def trainer_main(*args) -> subprocess.CompletedProcess:
    """`python -m trainer ...` in this process (tests/test_study.py runs a recorded command as a real process)."""
    from trainer.cli import main
    return _in_process(main, "trainer", args)
