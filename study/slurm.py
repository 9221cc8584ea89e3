"""`python -m study slurm`: the experiment's workers as one SLURM job array, one GPU per array task.

The batch script is written to a file (kept beside the logs, so what ran can be read back) and submitted with
sbatch. It holds no credential: the storage URL reaches the workers through a file readable only by its owner
(--storage-file) or through the environment sbatch exports from the submitting shell (OPTUNA_STORAGE).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.files import write_atomically

REPO = Path(__file__).resolve().parents[1]
TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # SLURM's [days-]hours[:minutes[:seconds]] or minutes


@dataclass
class SlurmJob:
    experiment: str
    workers: int                    # array tasks = workers
    gpus: int = 1                   # per worker (--gres=gpu:N); 0 = CPU workers
    cpus: int = 8                   # per worker: data decoding and the trainer's host threads
    time: str = "24:00:00"          # per array task; near its end the worker stops and its trial is re-queued
    partition: str | None = None
    storage_file: str | None = None  # else OPTUNA_STORAGE from the submitting environment
    log_dir: str = "slurm-logs"
    extra: tuple[str, ...] = ()     # more #SBATCH lines, e.g. --account=X --qos=Y

    def check(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.experiment):
            raise ValueError(f"experiment name {self.experiment!r}: use letters, digits, '.', '_' or '-' for a job")
        for name, low in (("workers", 1), ("gpus", 0), ("cpus", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if not TIME.match(self.time):
            raise ValueError(f"--time {self.time!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
        # every value below lands in a line of the batch script: nothing that ends the line, adds an option or
        # is expanded (#SBATCH lines are read by sbatch, not bash: no quoting would help)
        if self.partition is not None and not re.fullmatch(r"[\w.-]+(,[\w.-]+)*", self.partition):
            raise ValueError(f"--partition {self.partition!r}: expected partition names (letters, digits, '.', '_', "
                             "'-'), comma-separated")
        log_dir = str(Path(self.log_dir).resolve())
        if not re.fullmatch(r"[\w./+-]+", log_dir):
            raise ValueError(f"--log-dir {self.log_dir!r}: the path {log_dir!r} may hold only letters, digits and "
                             "'._/+-' (it is written into #SBATCH --output=)")
        for arg in self.extra:
            if not re.fullmatch(r"--[a-z][a-z-]*(=[^\s'\"`$;&|<>\\]+)?", arg) or arg.split("=")[0] == "--wrap":
                raise ValueError(f"--sbatch-arg {arg!r}: expected one long sbatch option such as --account=NAME "
                                 "(no spaces, quotes or shell characters; not --wrap)")

    def script(self) -> str:
        """The batch script. `exec` makes the worker the batch step's process, so SLURM's SIGTERM (scancel,
        preemption, --signal before the time limit) reaches it directly: it writes its running trial's resumable
        state to the experiment's artifact store (a path on the shared file system), fails the trial with the
        reason, re-queues it with the same parameters (its retry goes on from that state), and exits."""
        device = "cuda" if self.gpus else "cpu"
        lines = ["#!/bin/bash",
                 f"# debias-study workers of experiment {self.experiment}: written by `python -m study slurm`",
                 f"#SBATCH --job-name=debias-{self.experiment}",
                 f"#SBATCH --array=0-{self.workers - 1}",
                 f"#SBATCH --cpus-per-task={self.cpus}",
                 f"#SBATCH --time={self.time}",
                 "#SBATCH --requeue",             # preempted or on a failed node: the array task runs again
                 "#SBATCH --signal=B:TERM@120",   # 2 min before the time limit: stop cleanly, re-queue the trial
                 f"#SBATCH --output={Path(self.log_dir).resolve()}/%x-%A_%a.out",
                 "#SBATCH --open-mode=append"]    # a requeued task appends to its log
        if self.gpus:
            lines.append(f"#SBATCH --gres=gpu:{self.gpus}")
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        lines += [f"#SBATCH {arg}" for arg in self.extra]
        worker = [sys.executable, "-m", "study", "worker", "--experiment", self.experiment,
                  "--device", device, "--threads", str(self.cpus)]
        if self.storage_file:
            worker += ["--storage-file", str(Path(self.storage_file).resolve())]
        lines += ["set -euo pipefail",
                  f"cd {shlex.quote(str(REPO))}",
                  "# the GPU is the one SLURM gave this task (CUDA_VISIBLE_DEVICES): no claim among the host's GPUs",
                  'export STUDY_GPU_HOST="${SLURMD_NODENAME:-$(hostname)}"',
                  f"exec {shlex.join(worker)}"]
        return "\n".join(lines) + "\n"


def submit(job: SlurmJob, script_path: str | None = None, dry_run: bool = False,
           env: dict | None = None) -> tuple[Path, str | None]:
    """Writes the script; unless dry_run, submits it. Returns (script path, job id)."""
    job.check()
    path = Path(script_path or Path(job.log_dir) / f"{job.experiment}-workers.sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(job.log_dir).mkdir(parents=True, exist_ok=True)
    write_atomically(path, job.script())  # never through a symlink planted at the script's name
    path.chmod(0o750)
    if dry_run:
        return path, None
    if not shutil.which("sbatch"):
        raise ValueError("sbatch not found: run this on a SLURM login node (or use --dry-run to write the script)")
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise ValueError(f"sbatch refused {path}: {done.stderr.strip().splitlines()[-1] if done.stderr else ''}")
    return path, done.stdout.strip().split(";")[0]
