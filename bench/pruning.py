"""The same study budget on cmnist with and without pruning (same sampler seed, one worker each).

    python bench/pruning.py [--method fim] [--trials 12] [--epochs 12]

Prints best val WGA (and its test WGA) and the epochs trained in total for each pruner, and their ratios.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import optuna
import pandas as pd
import torch

from study.experiment import Experiment, init_experiment
from study.records import best as best_of, read_all
from study.storage import make_storage
from study.worker import run_worker


def run(pruner: str, args, tmp: str) -> dict:
    storage = make_storage(f"sqlite:///{tmp}/{pruner}.db")
    exp = Experiment.of(name=f"prune-{pruner}", datasets=["cmnist"], methods=[args.method], trials=args.trials,
                        epochs=args.epochs, pruner=pruner, patience=0)
    init_experiment(storage, exp)
    run_worker(storage, exp.name, device="cpu", sampler_seed=args.seed, log=lambda *_: None)
    study = optuna.load_study(study_name=exp.study_name("cmnist", args.method), storage=storage)
    records = read_all(study.trials)
    best = best_of(records)
    assert best is not None and best.run is not None, "no trial finished"
    return {"pruner": pruner, "best val WGA": best.value, "its test WGA": best.run.test.wga,
            "epochs trained": sum(len(t.intermediate_values) for t in study.trials),
            "pruned trials": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
            "seconds": sum(r.train_seconds for r in records)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="fim")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed, the same for every pruner")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(pr, args, tmp) for pr in ("none", "median", "hyperband")]
    df = pd.DataFrame(rows).set_index("pruner")
    base = df.loc["none"]
    df["WGA ratio"] = df["best val WGA"] / base["best val WGA"]
    df["epochs ratio"] = df["epochs trained"] / base["epochs trained"]
    print(f"\ncmnist / {args.method}: {args.trials} trials x up to {args.epochs} epochs, TPE seed {args.seed}\n")
    print(df.round(3).to_markdown())


if __name__ == "__main__":
    main()
