"""`python -m study {init,worker,dashboard,report,list,status,replicate,delete,demo}`: the study service's command
line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

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


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create an experiment's studies (harmless if they exist)")
    init.add_argument("--config", help="TOML file with the experiment's settings (flags override it)")
    init.add_argument("--experiment", help="experiment name")
    init.add_argument("--datasets", help="comma-separated dataset names, e.g. cmnist")
    init.add_argument("--methods", help="comma-separated method names (python -m trainer --help lists them), or 'all'")
    init.add_argument("--trials", type=int, help="trial budget per (dataset, method) study (default 20)")
    init.add_argument("--pruner", help="median, hyperband or none (default median)")
    from trainer.cli import add_method_flags
    from trainer.config import TrainConfig
    from trainer.settings import add_flags
    # every run setting an experiment fixes for all its trials, and every method parameter (fixed for the methods
    # that have it; a fixed parameter is not searched), generated from the trainer's declarations
    add_flags(init.add_argument_group("run settings of every trial (default: the dataset's recipe)"),
              TrainConfig.settings("experiment"))
    add_method_flags(init)
    _storage_args(init)

    worker = sub.add_parser("worker", help="run trials until every study meets its budget")
    worker.add_argument("--experiment", required=True)
    worker.add_argument("--device", default="auto",
                        help="auto (claim a free GPU, else the CPU), cpu, cuda:N (no claim)")
    worker.add_argument("--share-gpus", action="store_true",
                        help="with every GPU claimed by other workers, share one instead of waiting "
                             "(also STUDY_SHARE_GPUS=1)")
    worker.add_argument("--sampler-seed", type=int, help="TPE seed (default: different for every worker)")
    worker.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    worker.add_argument("--poll-seconds", type=float,
                        help="with no trial to take while others run, look again after this long (default 5; "
                             "STUDY_POLL_SECONDS)")
    _storage_args(worker)

    slurm = sub.add_parser("slurm", help="submit the experiment's workers as a SLURM job array (one GPU each)")
    slurm.add_argument("--experiment", required=True)
    slurm.add_argument("--workers", type=int, required=True, help="array tasks, one worker each")
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per worker, --gres=gpu:N (0: CPU workers)")
    slurm.add_argument("--cpus", type=int, default=8, help="CPUs per worker (default 8)")
    slurm.add_argument("--time", default="24:00:00", help="time limit per array task (default 24:00:00)")
    slurm.add_argument("--partition")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                       help="another #SBATCH option, e.g. --sbatch-arg=--account=lab (repeatable)")
    slurm.add_argument("--log-dir", default="slurm-logs", help="the script and the workers' logs (default slurm-logs)")
    slurm.add_argument("--dry-run", action="store_true", help="write and print the script, submit nothing")
    _storage_args(slurm)

    dash = sub.add_parser("dashboard", help="optuna-dashboard on the storage (no authentication: keep it local)")
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    _storage_args(dash)

    delete = sub.add_parser("delete", help="delete an experiment's studies (says what it removes)")
    delete.add_argument("--experiment", required=True)
    delete.add_argument("--yes", action="store_true", help="also when it holds finished trials")
    _storage_args(delete)

    sub.add_parser("report", add_help=False, help="the paper's table and figures (python -m study report --help)")

    lst = sub.add_parser("list", help="the experiments in the storage")
    _storage_args(lst)

    status = sub.add_parser("status", help="trial counts and best val WGA per study")
    status.add_argument("--experiment", required=True)
    _storage_args(status)

    rep = sub.add_parser("replicate", help="the seed phase: re-run the top-k configurations with more seeds")
    rep.add_argument("--experiment", required=True)
    rep.add_argument("--seeds", type=int, default=5,
                     help="training seeds per configuration, the searched run counting as one (default 5)")
    rep.add_argument("--top-k", type=int, default=3, help="configurations carried into the seed phase (default 3)")
    _storage_args(rep)

    demo = sub.add_parser("demo", help="the whole comparison on a laptop: SQLite, CPU, cmnist")
    demo.add_argument("--storage", default="sqlite:///demo.db", help="a fresh SQLite file (recreated)")
    demo.add_argument("--datasets", default="cmnist",
                      help="comma-separated bundled benchmarks, e.g. cmnist,texdigits (default: cmnist); with several "
                           "the report ends with a summary across them")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--trials", type=int, default=6, help="trials per method")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--methods", help="comma-separated methods, or 'all' for every registered method "
                                        "(default: the paper's comparison, the control, GroupDRO and Ours)")
    demo.add_argument("--seeds", type=int, default=6,
                      help="seeds per top configuration in the seed phase, the searched run included (0: none)")
    demo.add_argument("--top-k", type=int, default=2, help="configurations carried into the seed phase")
    demo.add_argument("--html", default="demo-report.html", help="where to write the HTML report")
    return p


def _storage(args):
    from .storage import INTERACTIVE_TIMEOUT, STORAGE_TIMEOUT, make_storage
    # only workers ride out long outages; a person at a prompt hears within seconds
    default = STORAGE_TIMEOUT if args.command == "worker" else INTERACTIVE_TIMEOUT
    return make_storage(args.storage, args.heartbeat_interval, args.grace_period, timeout=args.storage_timeout,
                        default_timeout=default, read_only=args.command in ("status", "dashboard", "list"))


def _experiment_from_args(args):
    from trainer.cli import method_params_from_args
    from trainer.config import TrainConfig

    from .experiment import Experiment
    keys = ("datasets", "methods", "trials", "pruner", *(f.name for f in TrainConfig.settings("experiment")))
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
        if args.command == "init":
            from .experiment import init_experiment
            exp = _experiment_from_args(args)
            names = init_experiment(_storage(args), exp)
            print(f"experiment {exp.name!r}: {len(names)} studies ready ({', '.join(names)})")
        elif args.command == "delete":
            from .experiment import delete_experiment
            print(delete_experiment(_storage(args), args.experiment, args.yes))
        elif args.command == "worker":
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
        elif args.command == "slurm":
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
        elif args.command == "dashboard":
            from optuna_dashboard import run_server
            if not 1 <= args.port <= 65535:
                raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
            print(f"optuna-dashboard on http://{args.host}:{args.port}/ "
                  f"(storage {mask_url(storage_url(args.storage))})",
                  flush=True)
            run_server(_storage(args), host=args.host, port=args.port)
        elif args.command == "list":
            from .status import experiments_table
            table = experiments_table(_storage(args))
            print(table.to_markdown(index=False) if len(table) else "no experiments in this storage")
        elif args.command == "status":
            from .status import status_table
            print(status_table(_storage(args), args.experiment).to_markdown())
        elif args.command == "replicate":
            from .replicate import replicate
            for name, runs in replicate(_storage(args), args.experiment, args.seeds, args.top_k).items():
                shown = ", ".join(f"#{rank} seed {seed}" for rank, seed in runs)
                print(f"{name}: enqueued {len(runs)} seed-phase runs{': ' + shown if runs else ' (all present)'}")
            print("start workers (python -m study worker) to run them, then python -m study.report")
        elif args.command == "demo":
            from .demo import run_demo
            try:
                return run_demo(args.storage, workers=args.workers, trials=args.trials, epochs=args.epochs,
                                seeds=args.seeds,
                                top_k=args.top_k, html=args.html, methods=args.methods, datasets=args.datasets)
            except KeyboardInterrupt:
                print("error: demo interrupted; its workers were stopped and their trials re-queued", file=sys.stderr)
                return 2
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
    return 0
