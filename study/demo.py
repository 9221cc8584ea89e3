"""`python -m study demo`: ERM vs GroupDRO vs Ours on cmnist (or several bundled benchmarks), on a laptop (SQLite,
CPU, two workers)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

from sqlalchemy.engine import make_url
from tqdm import tqdm

from trainer.methods import COMPARISON

from .artifacts import default_location
from .experiment import Experiment, init_experiment, load_experiment
from .replicate import replicate
from .render import render_html, render_markdown
from .results import collect, trial_counts
from .storage import make_storage
from .worker import StopSignals

EXPERIMENT = "demo"


def run_workers(storage_url: str, db: Path, workers: int, studies, total: int, desc: str,
                experiment: str = EXPERIMENT) -> None:
    """Runs `workers` worker processes of `experiment` until they exit, with a bar of the trials of `studies` that
    finished; each logs to DB.workerN.log beside the SQLite file `db`."""
    logs = [open(db.with_name(f"{db.stem}.worker{i}.log"), "a") for i in range(workers)]
    threads = max(1, (os.cpu_count() or 2) // workers)
    procs = [subprocess.Popen([sys.executable, "-m", "study", "worker", "--experiment", experiment,
                               "--storage", storage_url, "--device", "cpu", "--threads", str(threads)],
                              stdout=log, stderr=subprocess.STDOUT) for log in logs]

    def finished() -> int:  # a retried lineage counts once
        return min(total, sum(c["complete"] + c["pruned"] + c["fail"] - c["retried"]
                              for c in map(trial_counts, studies)))

    try:
        start = finished()
        with tqdm(total=total - start, desc=desc, unit="trial") as bar:
            while any(p.poll() is None for p in procs):
                with STOP.interruptible(False):  # a read cut in the middle could keep the workers' writes locked out
                    done = finished() - start  # one storage read per second
                if done > bar.n:
                    bar.update(done - bar.n)
                time.sleep(1)
            bar.update(finished() - start - bar.n)
    except BaseException:  # Ctrl-C or SIGTERM to the demo: its workers stop too (their trials are re-queued)
        STOP.handled()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for log in logs:
            log.close()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise ValueError(f"worker(s) {failed} exited non-zero; see {logs[failed[0]].name}")


STOP = StopSignals(KeyboardInterrupt)  # like Ctrl-C: stop the workers, say so in one line


def _refuse_foreign(db: Path) -> None:
    """The demo recreates its file: never one that holds anything but an earlier demo."""
    if not db.exists():
        return
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            names = [n for (n,) in conn.execute("SELECT study_name FROM studies")]
    except sqlite3.Error:
        raise ValueError(f"{db} exists and is not a demo storage: not deleted (choose another --storage)") from None
    foreign = [n for n in names if not n.startswith(EXPERIMENT + "/")]
    if foreign:
        raise ValueError(f"{db} holds other experiments ({', '.join(sorted(foreign)[:3])}): not deleted (choose "
                         "another --storage)")


def _artifact_name(name: str) -> bool:
    """A file the trials write: a model (a UUID), a resumable state (state-UUID), or the temporary file of a write
    that a stop cut short (.NAME.RANDOM.tmp)."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:].split(".", 1)[0]
    try:
        uuid.UUID(name.removeprefix("state-"))
    except ValueError:
        return False
    return True


def _refuse_foreign_models(folder: Path) -> list[Path]:
    """The files of an earlier demo's model folder (`_artifact_name`), to delete with its storage; a folder holding
    anything else is not the demo's: refused."""
    if not folder.exists():
        return []
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} exists and is not the demo's model folder: not deleted (choose another --storage)")
    files = list(folder.iterdir())
    for f in files:
        if not _artifact_name(f.name):
            raise ValueError(f"{folder} holds {f.name}, not a model of an earlier demo: not deleted (choose another "
                             "--storage)")
        if f.is_symlink() or not f.is_file():
            raise ValueError(f"{folder}/{f.name} is not a file: not deleted (choose another --storage)")
    return files


def run_demo(storage_url: str, workers: int = 2, trials: int = 6, epochs: int = 20, seeds: int = 6, top_k: int = 2,
             html: str | None = "demo-report.html", methods: str | None = None, datasets: str = "cmnist") -> int:
    started = time.time()
    url = make_url(storage_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        raise ValueError(f"the demo recreates its storage: give a sqlite:///FILE URL, not {storage_url!r}")
    # everything is checked before anything is deleted
    for name, value, low in (("--workers", workers, 1), ("--top-k", top_k, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if seeds == 1 or seeds < 0:
        raise ValueError(f"--seeds must be 0 (no seed phase) or >= 2 (the searched run counts as one), got {seeds}")
    names = list(COMPARISON) if methods is None else methods.split(",")  # "all" is expanded by Experiment
    exp = Experiment.of(name=EXPERIMENT, datasets=datasets.split(","), methods=names, trials=trials, epochs=epochs)
    db = Path(url.database)
    _refuse_foreign(db)
    models = _refuse_foreign_models(Path(default_location(storage_url)))
    for old in (db, *db.parent.glob(f"{db.stem}.worker*.log"), *models):
        old.unlink(missing_ok=True)
    storage = make_storage(storage_url)
    init_experiment(storage, exp)
    STOP.install(interruptible=True)
    try:
        print(f"experiment {EXPERIMENT!r} on {storage_url}: {', '.join(exp.datasets)}, {trials} trials x "
              f"{len(exp.methods)} methods, "
              f"{workers} workers, up to {exp.run.epochs} epochs per trial, then the top {top_k} configurations of "
              f"each with {seeds} seeds")
        t0 = time.time()
        _, studies, seed_studies = load_experiment(storage, EXPERIMENT, seeds=True)
        run_workers(storage_url, db, workers, studies, trials * len(studies), "search")
        if seeds:
            enqueued = replicate(storage, EXPERIMENT, seeds, top_k)
            run_workers(storage_url, db, workers, list(seed_studies.values()), sum(map(len, enqueued.values())),
                         "seed phase")
        print(f"all trials done in {time.time() - t0:.0f} s; the demo took {time.time() - started:.0f} s\n")
        exp, results = collect(storage, EXPERIMENT)
        print(render_markdown(exp, results, "train_weighted"))
        if html:
            Path(html).write_text(render_html(exp, results, "train_weighted"))
            print(f"figures and table: {html}")
        where = f"--storage {storage_url} --experiment {EXPERIMENT}"
        print("\nnext:", *(f"  {line}" for line in (
            f"python -m study status {where}   # trial counts per study",
            f"python -m study.report {where} --out demo.csv   # or .md .tex .html",
            f"python -m study.report {where} --to-dashboard   # the figures, then:",
            f"python -m study dashboard --storage {storage_url}   # http://127.0.0.1:8080, with the kept models",
            f"python -m study export {where} --out demo-models   # the selected models, every seed",
            f"python -m study list --storage {storage_url}   # the experiments in the storage")), sep="\n")
        return 0
    except KeyboardInterrupt:
        STOP.handled()  # no redelivery while the interrupt is reported
        raise
