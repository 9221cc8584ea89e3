"""`python -m study demo`: ERM vs GroupDRO vs Ours on cmnist, on a laptop (SQLite, CPU, two workers)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.engine import make_url
from tqdm import tqdm

from .experiment import Experiment, init_experiment, load_experiment
from .storage import make_storage
from .worker import trial_counts

EXPERIMENT = "demo"


def run_demo(storage_url: str, workers: int = 2, trials: int = 6, epochs: int = 16) -> int:
    url = make_url(storage_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        raise ValueError(f"the demo recreates its storage: give a sqlite:///FILE URL, not {storage_url!r}")
    db = Path(url.database)
    if db.exists():
        db.unlink()
    storage = make_storage(storage_url)
    exp = Experiment(name=EXPERIMENT, datasets=["cmnist"], methods=["erm", "groupdro", "fim"], trials=trials,
                     epochs=epochs, patience=8)
    init_experiment(storage, exp)
    print(f"experiment {EXPERIMENT!r} on {storage_url}: {trials} trials x {len(exp.methods)} methods, "
          f"{workers} workers, up to {epochs} epochs per trial")
    t0 = time.time()
    logs = [open(db.with_name(f"{db.stem}.worker{i}.log"), "w") for i in range(workers)]
    threads = max(1, (os.cpu_count() or 2) // workers)
    procs = [subprocess.Popen([sys.executable, "-m", "study", "worker", "--experiment", EXPERIMENT,
                               "--storage", storage_url, "--device", "cpu", "--threads", str(threads)],
                              stdout=log, stderr=subprocess.STDOUT) for log in logs]
    _, studies = load_experiment(storage, EXPERIMENT)
    total = trials * len(studies)

    def finished() -> int:  # a retried lineage counts once
        return min(total, sum(c["complete"] + c["pruned"] + c["fail"] - c["retried"]
                              for c in map(trial_counts, studies)))

    with tqdm(total=total, desc="trials", unit="trial") as bar:
        while any(p.poll() is None for p in procs):
            bar.update(finished() - bar.n)
            time.sleep(1)
        bar.update(finished() - bar.n)
    for log in logs:
        log.close()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"worker(s) {failed} exited non-zero; see {logs[failed[0]].name}")
    print(f"all trials done in {time.time() - t0:.0f}s\n")
    from .report import report_markdown
    print(report_markdown(storage, EXPERIMENT))
    return 0
