"""ERM, GroupDRO and fim (both trace scopes) on cmnist, several seeds each, early stopping on val WGA.

    python bench/methods_cmnist.py [--seeds 3] [--epochs 20] [--jobs 2]

Prints test Avg (train-weighted and plain) and Worst-group accuracy as mean ± std over seeds.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor

import pandas as pd
import torch
from tqdm import tqdm

RUNS = [("ERM", "erm", {}), ("GroupDRO", "groupdro", {}), ("fim (logits)", "fim", {"scope": "logits"}),
        ("fim (last_layer)", "fim", {"scope": "last_layer"})]


def run_one(job):
    label, method, params, seed, epochs = job
    torch.set_num_threads(1)
    from trainer import TrainConfig, fit
    r = fit(TrainConfig(dataset="cmnist", method=method, seed=seed, epochs=epochs, method_params=params), log=None)
    return {"method": label, "seed": seed, "avg": r["test"]["avg_train_weighted"], "avg_plain": r["test"]["avg_plain"],
            "worst": r["test"]["wga"], "val_wga": r["val"]["wga"], "best_epoch": r["best_epoch"],
            "seconds": r["seconds"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="default: the dataset's")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    jobs = [(label, m, prm, s, args.epochs) for label, m, prm in RUNS for s in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(tqdm(pool.map(run_one, jobs), total=len(jobs), desc="runs"))
    df = pd.DataFrame(rows)
    order = [label for label, *_ in RUNS]
    agg = df.groupby("method", sort=False).agg(["mean", "std"]).reindex(order)

    def pm(col):
        return [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(agg[(col, "mean")], agg[(col, "std")])]

    table = pd.DataFrame({"test Avg (train-weighted)": pm("avg"), "test Avg (plain)": pm("avg_plain"),
                          "test Worst": pm("worst"), "val WGA": pm("val_wga"),
                          "s/run": [f"{v:.0f}" for v in agg[("seconds", "mean")]]}, index=order)
    print(f"\ncmnist, {args.seeds} seeds, mean ± std (%), best epoch by val WGA\n")
    print(table.to_markdown())


if __name__ == "__main__":
    main()
