"""`python -m study {init,worker,slurm,dashboard,export,delete,report,list,status,replicate,demo}`: the study
service's command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

from trainer.settings import Parser

from .storage import DEFAULT_STORAGE, StorageError, from_flags, mask_url, seconds, storage_url


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help=f"storage URL (default: $OPTUNA_STORAGE or {DEFAULT_STORAGE})")
    p.add_argument("--storage-file", help="a file holding the storage URL, readable only by you (chmod 600); "
                                          "also $OPTUNA_STORAGE_FILE")
    p.add_argument("--heartbeat-interval", type=int, help="seconds between trial heartbeats (default 60)")
    p.add_argument("--grace-period", type=int, help="seconds of silence before a trial is stale (default 180)")
    p.add_argument("--storage-timeout", type=float,
                   help="seconds of database outage to ride out before exiting (default: 600 for a worker, 15 for "
                        "the other commands; STUDY_STORAGE_TIMEOUT)")


# ---------------------------------------------------------------------------------------------------------------------
# The commands: each its arguments and what it does (returns the exit status; None: 0), in the table COMMANDS.


def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with the experiment's settings (flags override it)")
    p.add_argument("--experiment", help="experiment name")
    p.add_argument("--datasets", help="comma-separated dataset names, e.g. cmnist")
    p.add_argument("--methods", help="comma-separated method names (python -m trainer --help lists them), or 'all'")
    p.add_argument("--trials", type=int, help="trial budget per (dataset, method) study (default 20)")
    p.add_argument("--pruner", help="median, hyperband or none (default median)")
    p.add_argument("--artifacts", help="absolute path of the folder where trials keep their models, shared by every "
                                       "worker (default: beside an SQLite file, demo.db -> demo-artifacts/; none "
                                       "for a server database); '' keeps none")
    p.add_argument("--keep", help="what each trial keeps there: selected (the model its test pass used, for every "
                                  "COMPLETE trial; the default), all-epochs (that and every epoch's weights of every "
                                  "trial, pruned ones too: a ResNet-50 keeps 94 MB an epoch) or none")
    p.add_argument("--resume-budget", type=float, help="share of a trial's training time its resumable states may "
                                                       "cost (default 0.03; 0 writes none): a stopped or dead trial's "
                                                       "retry goes on from the last one")
    p.add_argument("--resume-interval", type=float, help="and at least this many training seconds between two "
                                                         "(default 0)")
    from trainer.cli import add_method_flags
    from trainer.config import TrainConfig
    from trainer.settings import add_flags
    # every run setting an experiment fixes for all its trials, and every method parameter (fixed for the methods
    # that have it; a fixed parameter is not searched), generated from the trainer's declarations
    add_flags(p.add_argument_group("run settings of every trial (default: the dataset's recipe)"),
              TrainConfig.settings("experiment"))
    add_method_flags(p)


def _init(args, storage_file):
    from .experiment import init_experiment
    exp = _experiment_from_args(args)
    for line in exp.warnings():  # before the data loads: a run that would fail is said first
        print(f"warning: {line}", file=sys.stderr, flush=True)
    names = init_experiment(_storage(args), exp)
    print(f"experiment {exp.name!r}: {len(names)} studies ready ({', '.join(names)})")


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)
    p.add_argument("--device", default="auto", help="auto (claim a free GPU, else the CPU), cpu, cuda:N (no claim)")
    p.add_argument("--share-gpus", action="store_true",
                   help="with every GPU claimed by other workers, share one instead of waiting "
                        "(also STUDY_SHARE_GPUS=1)")
    p.add_argument("--sampler-seed", type=int, help="TPE seed (default: different for every worker)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--poll-seconds", type=float,
                   help="with no trial to take while others run, look again after this long (default 5; "
                        "STUDY_POLL_SECONDS)")


def _worker(args, storage_file):
    from .worker import DEFAULT_POLL_SECONDS, POLL_ENV, run_worker
    if args.sampler_seed is not None and not 0 <= args.sampler_seed < 2**31:
        raise ValueError(f"--sampler-seed must be from 0 to 2**31 - 1, got {args.sampler_seed}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    poll = seconds(args.poll_seconds if args.poll_seconds is not None else
                   os.environ.get(POLL_ENV, DEFAULT_POLL_SECONDS),
                   "poll interval", f"--poll-seconds / {POLL_ENV}", positive=True)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from .gpu import SHARE_ENV, select_device
    storage = _storage(args)
    share = args.share_gpus or os.environ.get(SHARE_ENV) == "1"
    device, gpu_lock = select_device(storage_url(args.storage), args.device, share, poll)  # held till exit
    return run_worker(storage, args.experiment, device=device, sampler_seed=args.sampler_seed,
                      poll_seconds=poll, between_trials=gpu_lock.keep if gpu_lock else None)


def _slurm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)
    p.add_argument("--workers", type=int, required=True, help="array tasks, one worker each")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per worker, --gres=gpu:N (0: CPU workers)")
    p.add_argument("--cpus", type=int, default=8, help="CPUs per worker (default 8)")
    p.add_argument("--time", default="24:00:00", help="time limit per array task (default 24:00:00)")
    p.add_argument("--partition")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option, e.g. --sbatch-arg=--account=lab (repeatable)")
    p.add_argument("--log-dir", default="slurm-logs", help="the script and the workers' logs (default slurm-logs)")
    p.add_argument("--dry-run", action="store_true", help="write and print the script, submit nothing")


def _slurm(args, storage_file):
    from .experiment import load_experiment
    from .slurm import SlurmJob, submit
    url = storage_url(args.storage)
    if not url.startswith("postgresql"):
        raise ValueError(f"storage {mask_url(url)}: workers on several nodes need a PostgreSQL storage "
                         "(--storage-file, --storage or $OPTUNA_STORAGE)")
    load_experiment(_storage(args), args.experiment)  # a typo submits nothing
    job = SlurmJob(args.experiment, args.workers, args.gpus, args.cpus, args.time, args.partition,
                   storage_file, args.log_dir, tuple(args.sbatch_arg))
    # without a file the URL travels in sbatch's exported environment, never in the script
    path, job_id = submit(job, dry_run=args.dry_run, env=None if storage_file else {"OPTUNA_STORAGE": url})
    print(path.read_text() if args.dry_run else f"submitted job array {job_id}: {args.workers} workers "
          f"({path}); logs in {args.log_dir}/, squeue -j {job_id}; scancel {job_id} stops them (their "
          "running trials are re-queued)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True, help="a new or empty folder: DATASET/METHOD/seedN.pt and manifest.json")
    p.add_argument("--datasets", help="comma-separated datasets of the experiment (default: all)")
    p.add_argument("--methods", help="comma-separated methods of the experiment (default: all)")


def _export(args, storage_file):
    from .artifacts import export
    entries = export(_storage(args), args.experiment, args.out,
                     datasets=args.datasets.split(",") if args.datasets else None,
                     methods=args.methods.split(",") if args.methods else None)
    print(f"{len(entries)} models and {os.path.join(args.out, 'manifest.json')} written; evaluate one: python -m "
          f"trainer --evaluate {os.path.join(args.out, entries[0]['file']) if entries else 'FILE'}")


def _dashboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--artifacts", help="the folder of the kept models, shown on each trial's page (default: the one "
                                       "the storage's experiments name, when they name one)")


def _dashboard(args, storage_file):
    from optuna_dashboard import run_server

    from .artifacts import open_store
    from .status import artifact_locations
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
    storage = _storage(args)
    if args.artifacts is None:
        named = artifact_locations(storage)
        args.artifacts = named[0] if len(named) == 1 else ""  # several: the dashboard takes one store
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ (storage {mask_url(storage_url(args.storage))})",
          flush=True)
    run_server(storage, host=args.host, port=args.port, artifact_store=open_store(args.artifacts))


def _delete_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)
    p.add_argument("--yes", action="store_true", help="also when it holds finished trials")


def _delete(args, storage_file):
    from .experiment import delete_experiment
    print(delete_experiment(_storage(args), args.experiment, args.yes))


def _list(args, storage_file):
    from .status import experiments_table
    table = experiments_table(_storage(args))
    print(table.to_markdown(index=False) if len(table) else "no experiments in this storage")


def _experiment_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)


def _status(args, storage_file):
    from .status import status_table
    print(status_table(_storage(args), args.experiment).to_markdown())


def _replicate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)
    p.add_argument("--seeds", type=int, default=5,
                   help="training seeds per configuration, the searched run counting as one (default 5)")
    p.add_argument("--top-k", type=int, default=3, help="configurations carried into the seed phase (default 3)")


def _replicate(args, storage_file):
    from .replicate import replicate
    for name, runs in replicate(_storage(args), args.experiment, args.seeds, args.top_k).items():
        shown = ", ".join(f"#{rank} seed {seed}" for rank, seed in runs)
        print(f"{name}: enqueued {len(runs)} seed-phase runs{': ' + shown if runs else ' (all present)'}")
    print("start workers (python -m study worker) to run them, then python -m study.report")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default="sqlite:///demo.db", help="a fresh SQLite file (recreated)")
    p.add_argument("--datasets", default="cmnist",
                   help="comma-separated bundled benchmarks, e.g. cmnist,texdigits (default: cmnist); with several "
                        "the report ends with a summary across them")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trials", type=int, default=6, help="trials per method")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--methods", help="comma-separated methods, or 'all' for every registered method "
                                     "(default: the paper's comparison, the control, GroupDRO and Ours)")
    p.add_argument("--seeds", type=int, default=6,
                   help="seeds per top configuration in the seed phase, the searched run included (0: none)")
    p.add_argument("--top-k", type=int, default=2, help="configurations carried into the seed phase")
    p.add_argument("--html", default="demo-report.html", help="where to write the HTML report")


def _demo(args, storage_file):
    from .demo import run_demo
    try:
        return run_demo(args.storage, workers=args.workers, trials=args.trials, epochs=args.epochs, seeds=args.seeds,
                        top_k=args.top_k, html=args.html, methods=args.methods, datasets=args.datasets)
    except KeyboardInterrupt:
        print("error: demo interrupted; its workers were stopped and their trials re-queued", file=sys.stderr)
        return 2


@dataclass(frozen=True)
class Command:
    """One `python -m study` command: its help, its arguments, what it does (args, the --storage-file given)."""
    help: str
    run: Callable[[argparse.Namespace, str | None], int | None]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    storage: bool = True     # takes the storage flags (_storage_args)
    read_only: bool = False  # opens the storage read-only: a wrong role or database is said in one line
    long_outages: bool = False  # rides out database outages for minutes (a worker), not seconds (a person)


COMMANDS: dict[str, Command] = {
    "init": Command("create an experiment's studies (harmless if they exist)", _init, _init_args),
    "worker": Command("run trials until every study meets its budget", _worker, _worker_args, long_outages=True),
    "slurm": Command("submit the experiment's workers as a SLURM job array (one GPU each)", _slurm, _slurm_args),
    "dashboard": Command("optuna-dashboard on the storage (no authentication: keep it local)", _dashboard,
                         _dashboard_args, read_only=True),
    "export": Command("write the selected configuration's kept models (every seed) and their manifest", _export,
                      _export_args, read_only=True),
    "delete": Command("delete an experiment's studies (says what it removes)", _delete, _delete_args),
    # `python -m study report ...` is `python -m study.report ...`: main() hands it over before parsing
    "report": Command("the paper's table and figures (python -m study report --help)", lambda a, f: None,
                      storage=False),
    "list": Command("the experiments in the storage", _list, read_only=True),
    "status": Command("trial counts and best val WGA per study", _status, _experiment_arg, read_only=True),
    "replicate": Command("the seed phase: re-run the top-k configurations with more seeds", _replicate,
                         _replicate_args),
    "demo": Command("the whole comparison on a laptop: SQLite, CPU, cmnist", _demo, _demo_args, storage=False),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, add_help=name != "report")
        command.arguments(sp)
        if command.storage:
            _storage_args(sp)
    return p


def _storage(args):
    from .storage import INTERACTIVE_TIMEOUT, STORAGE_TIMEOUT, make_storage
    command = COMMANDS[args.command]  # only workers ride out long outages; a person at a prompt hears within seconds
    return make_storage(args.storage, args.heartbeat_interval, args.grace_period, timeout=args.storage_timeout,
                        default_timeout=STORAGE_TIMEOUT if command.long_outages else INTERACTIVE_TIMEOUT,
                        read_only=command.read_only)


def _experiment_from_args(args):
    from trainer.cli import method_params_from_args
    from trainer.config import TrainConfig

    from .experiment import Experiment
    keys = ("datasets", "methods", "trials", "pruner", "artifacts", "keep", "resume_budget", "resume_interval",
            *(f.name for f in TrainConfig.settings("experiment")))
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    for key in ("datasets", "methods"):
        if key in given:
            given[key] = given[key].split(",")
    if args.config:
        exp = Experiment.from_toml(args.config, name=args.experiment, **given)
    else:
        missing = [f"--{k}" for k in ("experiment", "datasets", "methods") if getattr(args, k) is None]
        if missing:
            raise ValueError(f"init needs {', '.join(missing)} (or --config FILE)")
        exp = Experiment.from_dict({"name": args.experiment, **given})
    params = method_params_from_args(args, exp.methods)
    if params:  # the method flags: fixed for the experiment's methods that have them, over the file's values
        exp = Experiment.from_dict({**exp.settings(), "params": {m: {**exp.params.get(m, {}), **params.get(m, {})}
                                                                  for m in {*exp.params, *params}}})
    return exp


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # python -m study report ... == python -m study.report ...
        from .report import main as report_main
        return report_main(argv[1:])
    import optuna
    from optuna.exceptions import ExperimentalWarning

    from sqlalchemy.exc import SQLAlchemyError

    from trainer.data import DataError

    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)  # trial failures are reported by the worker itself
    args = get_args_parser().parse_args(argv)
    try:
        storage_file = None
        if hasattr(args, "storage_file"):  # the commands with _storage_args; the file's URL becomes --storage
            args.storage, storage_file = from_flags(args.storage, args.storage_file)
        return COMMANDS[args.command].run(args, storage_file) or 0
    except (ValueError, DataError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a worker that cannot train here, or halted studies
        from .worker import EnvironmentFault, StudiesHalted
        if not isinstance(e, (EnvironmentFault, StudiesHalted)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, StudiesHalted) else 2
    except SQLAlchemyError as e:  # a write cut off by an outage, say: one line, never a traceback
        from .storage import first_line
        print(f"error: storage {mask_url(storage_url(getattr(args, 'storage', None)))}: {first_line(e)}",
              file=sys.stderr)
        return 2
