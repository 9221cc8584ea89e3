"""`python -m trainer`: one training run from the command line, writing the result as JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import TrainConfig
from .files import write_atomically
from .methods import METHODS
from .settings import Parser, add_flags, flag


def method_flags() -> dict[str, list[str]]:
    """Method parameter name -> the methods that have it."""
    owners: dict[str, list[str]] = {}
    for mname, cls in METHODS.items():
        for f in cls.param_fields():
            owners.setdefault(f.name, []).append(mname)
    return owners


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per method parameter, in a group per method; a name several methods share is declared once, by its
    first owner, its help listing each owner's default."""
    owners = method_flags()
    for mname, cls in METHODS.items():
        mine = [f for f in cls.param_fields() if owners[f.name][0] == mname]
        defaults = {f.name: ", ".join(f"{m} {next(g.default for g in METHODS[m].param_fields() if g.name == f.name)}"
                                      for m in owners[f.name]) for f in mine}
        add_flags(p.add_argument_group(f"{mname} parameters"), mine, defaults)


def method_params_from_args(args: argparse.Namespace, methods: list[str]) -> dict[str, dict]:
    """{method: {parameter: value}} of the method flags given, for each of `methods` that has the parameter; a flag
    that none of them has is an error naming its owners."""
    params: dict[str, dict] = {}
    for name, owners in method_flags().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        mine = [m for m in methods if m in owners]
        if not mine:
            raise ValueError(f"{flag(name)} is a parameter of {'/'.join(owners)}, not of {'/'.join(methods)}")
        for m in mine:
            params.setdefault(m, {})[name] = value
    return params


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m trainer", description=__doc__)
    add_flags(p, TrainConfig.settings())  # every run setting, from TrainConfig's fields
    p.add_argument("--output", help="write the result JSON here")
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    p.add_argument("--evaluate", metavar="FILE",
                   help="evaluate a kept model (python -m study export) on its run's val and test splits instead of "
                        "training: its settings come from the file (only --data-dir, --device, --image-loader, "
                        "--num-workers may be given)")
    add_method_flags(p)
    return p


def given_settings(args: argparse.Namespace) -> dict:
    """The run settings given on the command line (a flag left out is None)."""
    return {f.name: getattr(args, f.name) for f in TrainConfig.settings() if getattr(args, f.name) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = given_settings(args)
    method = given.get("method", TrainConfig.method)
    return TrainConfig(**given, method_params=method_params_from_args(args, [method]).get(method, {}))


def check_output(path: str | os.PathLike) -> None:
    """The result can be written there: not a folder, its parent a folder (made if missing) we can write in."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--output {path}: is a folder, not a file")
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--output {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK):
                raise ValueError(f"--output {path}: {p} is not writable")
            break


def write_json(path: str | os.PathLike, obj) -> None:
    """Write atomically: a crash never leaves a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(obj, indent=1))


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .loop import NonFiniteLossError, fit

    args = get_args_parser().parse_args(argv)
    if args.evaluate:
        return _evaluate(args)
    try:
        if args.output:
            check_output(args.output)  # before training: a result is never trained and then lost
        cfg = config_from_args(args).resolved()
        if warning := cfg.warning():
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        result = fit(cfg, progress=args.progress)
    except (ValueError, DataError, NonFiniteLossError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = result.test
    print(f"best epoch {result.best_epoch}: test wga {t['wga']:.4f}  avg (train-weighted) "
          f"{t['avg_train_weighted']:.4f}  avg (plain) {t['avg_plain']:.4f}  [{result.seconds:.0f}s]")
    if args.output:
        write_json(args.output, result.to_dict())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """`--evaluate FILE`: the kept model's val and test metrics, and whether they equal the stored ones."""
    from .checkpoint import evaluate_file
    from .data import DataError
    owners = method_flags()
    given = given_settings(args) | {name: value for name, value in vars(args).items()
                                    if name in owners and value is not None}
    try:
        if args.output:
            check_output(args.output)
        r = evaluate_file(args.evaluate, **given)
    except (ValueError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split in ("val", "test"):
        m, same = r[split], r["same"][split]
        verdict = ("not compared: the method refit its head on val" if same is None and split == "val" else
                   "not compared: not measured at this epoch" if same is None else
                   "equal to the stored metrics" if same else "DIFFERENT from the stored metrics")
        print(f"{split}: wga {m['wga']:.4f}  avg (train-weighted) {m['avg_train_weighted']:.4f}  avg (plain) "
              f"{m['avg_plain']:.4f}  — {verdict}")
    if args.output:
        write_json(args.output, r)
    return 0 if all(v is not False for v in r["same"].values()) else 1


def command_for(cfg: TrainConfig) -> str:
    """The exact `python -m trainer ...` command that reproduces a run of this (resolved) config."""
    import shlex

    cfg = cfg.resolved()
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("method_params", "device") and v is not None}
    args = ["python", "-m", "trainer"]
    for name, value in {**settings, **cfg.method_params}.items():
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag(name), str(value)]
    return shlex.join(args)
