"""`python -m trainer`: one training run from the command line, writing the result as JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import COMPILE_MIN_STEPS, IMAGE_LOADERS, TrainConfig
from .data import DATASETS
from .metrics import SELECTIONS
from .methods import METHODS
from .models import MODELS


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_flags() -> dict[str, list[str]]:
    """Method parameter name -> the methods that have it."""
    owners: dict[str, list[str]] = {}
    for mname, cls in METHODS.items():
        for f in cls.param_fields():
            owners.setdefault(f.name, []).append(mname)
    return owners


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cmnist", choices=list(DATASETS), help="dataset")
    p.add_argument("--method", default="erm", choices=list(METHODS), help="debiasing method")
    p.add_argument("--data-dir", help="root of an on-disk dataset in its official layout")
    p.add_argument("--model", choices=MODELS, help="architecture (default: the dataset's)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start ResNets from ImageNet weights (default: the dataset's)")
    p.add_argument("--weights", help="pretrained weights file (else torchvision's local cache)")
    p.add_argument("--image-size", type=int, help="crop size for image datasets (default: the dataset's)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default: the dataset's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the dataset's)")
    p.add_argument("--lr", type=float, help="SGD learning rate (default: the dataset's)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: the dataset's)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--patience", type=int,
                   help="early stopping patience in the method's own epochs (0 = off; default max(10, epochs // 4))")
    p.add_argument("--selection", default="val_wga", choices=list(SELECTIONS),
                   help="model-selection metric: val_wga (reads val group labels), val_worst_class or val_avg")
    p.add_argument("--grad-clip", type=float,
                   help="max gradient norm for every method, 0 = off (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="training seed (init, sampling, augmentation)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of generated splits/colours (cmnist)")
    p.add_argument("--train-agreement", type=float, default=0.95,
                   help="cmnist: fraction of training samples whose colour agrees with the label")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader processes of the PIL image loader")
    p.add_argument("--image-loader", default="decoded", choices=IMAGE_LOADERS,
                   help="decoded: images decoded once, cached, augmented on the device; pil: per-item PIL")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=f"torch.compile the model (default: on for CUDA runs of >= {COMPILE_MIN_STEPS} steps)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random resized crop + flip of training images (default: the dataset's recipe)")
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="keep BatchNorm statistics frozen while training a pretrained model (default: the recipe)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic CUDA algorithms, so that the recorded command reproduces the run exactly")
    p.add_argument("--threads", type=int, help="torch CPU threads (a CPU run's numbers depend on them; "
                                                "default: torch's choice)")
    p.add_argument("--output", help="write the result JSON here")
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    owners = method_flags()
    for mname, cls in METHODS.items():
        group = p.add_argument_group(f"{mname} parameters")
        for f in cls.param_fields():
            if owners[f.name][0] != mname:
                continue  # shared name: the first owner declares the flag
            defaults = ", ".join(f"{m} {next(g.default for g in METHODS[m].param_fields() if g.name == f.name)}"
                                 for m in owners[f.name])
            kw = {"help": f"{f.metadata['help']} (default: {defaults})", "default": None}
            if f.type in ("bool", bool):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = {"float": float, "int": int, "str": str}.get(f.type, f.type)
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(flag(f.name), **kw)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    owners = method_flags()
    params = {}
    for name, methods in owners.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.method not in methods:
            raise ValueError(f"{flag(name)} is a parameter of {'/'.join(methods)}, not of {args.method}")
        params[name] = value
    common = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**common, method_params=params)


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .loop import NonFiniteLossError, fit

    args = get_args_parser().parse_args(argv)
    try:
        if args.output:
            check_output(args.output)  # before training: a result is never trained and then lost
        result = fit(config_from_args(args), progress=args.progress)
    except (ValueError, DataError, NonFiniteLossError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = result["test"]
    print(f"best epoch {result['best_epoch']}: test wga {t['wga']:.4f}  avg (train-weighted) "
          f"{t['avg_train_weighted']:.4f}  avg (plain) {t['avg_plain']:.4f}  [{result['seconds']:.0f}s]")
    if args.output:
        write_json(args.output, result)
    return 0


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
