"""Where one trial's time goes: process start, data, forward/backward, evaluation, storage.

    python bench/trial_cost.py [--epochs 20] [--method erm] [--repeats 3]

Compares the bundled benchmark (cmnist: 2 x 7 x 7 colour digits, 8-16-32 CNN) with the two earlier configurations
(2 x 14 x 14 with the same CNN; 28 x 28 with the 32-64-128 CNN) and the Waterbirds-shaped texdigits (3 x 64 x 64,
the strided 16-32-64 CNN), side by side in one run, one thread each (as the demo's two workers run). Process start
and data are paid once per worker (texdigits' data: generated, or read from its cache when warm); the rest once
per trial.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import pandas as pd
import torch

import trainer.loop as loop
from study.experiment import Experiment, init_experiment
from study.storage import make_storage
from study.worker import run_worker
from trainer import TrainConfig, fit
from trainer.data import load_splits

CONFIGS = {"bundled: 2x7x7, cnn_narrow": ("cmnist", dict(image_size=7, model="cnn_narrow")),
           "earlier: 2x14x14, cnn_narrow": ("cmnist", dict(image_size=14, model="cnn_narrow")),
           "earlier: 28x28, cnn": ("cmnist", dict(image_size=28, model="cnn")),
           "texdigits: 3x64x64, cnn_stem": ("texdigits", dict(image_size=64, model="cnn_stem"))}


def timed_fit(cfg: TrainConfig, splits) -> tuple[float, float]:
    """(forward/backward seconds, evaluation seconds) of one run."""
    spent = {"eval": 0.0}
    real = loop.evaluate

    def evaluate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            spent["eval"] += time.perf_counter() - t0
    loop.evaluate = evaluate
    try:
        t0 = time.perf_counter()
        fit(cfg, splits=splits, log=None)
        total = time.perf_counter() - t0
    finally:
        loop.evaluate = real
    return total - spent["eval"], spent["eval"]


def storage_seconds(dataset: str, method: str, epochs: int, settings: dict) -> float:
    """A real one-trial study run by the worker loop on SQLite, minus its training: the storage's share."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = make_storage(f"sqlite:///{tmp}/t.db")
        exp = Experiment.of(name="cost", datasets=[dataset], methods=[method], trials=1, epochs=epochs, patience=0,
                            **settings)
        init_experiment(storage, exp, check_data=False)
        t0 = time.perf_counter()
        run_worker(storage, "cost", device="cpu", sampler_seed=0, log=lambda *_: None)
        total = time.perf_counter() - t0
        (trial,) = storage.get_all_trials(storage.get_study_id_from_name(f"cost/{dataset}/{method}"))
        return total - trial.user_attrs["train_seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--method", default="erm")
    p.add_argument("--repeats", type=int, default=3, help="median over this many measurements")
    p.add_argument("--only", help="comma-separated column prefixes (bundled, earlier, texdigits; default: all)")
    args = p.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if not args.only or k.split(":")[0] in args.only.split(",")}
    torch.set_num_threads(1)
    med = statistics.median
    start = med(_wall([sys.executable, "-c", "import study.worker"]) for _ in range(args.repeats))
    rows = {}
    for name, (dataset, settings) in configs.items():
        t0 = time.perf_counter()
        splits = load_splits(dataset, image_size=settings["image_size"])
        data = time.perf_counter() - t0
        cfg = TrainConfig(dataset=dataset, method=args.method, epochs=args.epochs, patience=0, **settings)
        runs = [timed_fit(cfg, splits) for _ in range(args.repeats)]
        fwd, ev = med(r[0] for r in runs), med(r[1] for r in runs)
        store = med(storage_seconds(dataset, args.method, args.epochs, settings) for _ in range(args.repeats))
        rows[name] = {"process start (per worker)": start, "data (per worker)": data,
                      "forward/backward (per trial)": fwd, "evaluation (per trial)": ev,
                      "storage and objective (per trial)": store, "trial": fwd + ev + store}
    df = pd.DataFrame(rows)
    bundled = next((c for c in df.columns if c.startswith("bundled")), None)
    for name in [c for c in df.columns if bundled and c != bundled]:  # ratios to the bundled benchmark
        df[f"{name.split(':')[0]} {name.split(': ')[1].split(',')[0]} / bundled"] = df[name] / df[bundled]
    print(f"\n{args.method}, {args.epochs} epochs, 1 thread, median of {args.repeats} (seconds)\n")
    print(df.round(3).to_markdown())


def _wall(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
