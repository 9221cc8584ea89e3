"""Every registered method (fim in both trace scopes) on cmnist with its default recipe, several seeds each, early
stopping on val WGA.

    python bench/methods_cmnist.py [--seeds 5] [--epochs 20] [--jobs 2]

Prints test Avg (train-weighted and plain) and Worst-group accuracy as mean ± std over seeds.
bench/fim_ablation.py runs the same way (run_one, runs) with the Fisher method's ablations.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from trainer.methods import METHODS

RUNS = [(f"{cls.label} ({name})", name, {}) for name, cls in METHODS.items()] + [
    ("Ours (fim, last_layer)", "fim", {"scope": "last_layer"})]


def run_one(job):
    label, method, params, seed, epochs, recipe = job
    torch.set_num_threads(1)
    from trainer import TrainConfig, fit
    r = fit(TrainConfig(dataset="cmnist", method=method, seed=seed, epochs=epochs, method_params=params, **recipe),
            log=None)
    own = [h for h in r["history"] if h.get("constrained")]  # the Fisher method's constrained epochs
    diag = {k: float(np.mean([h[k] for h in own])) if own else np.nan
            for k in ("at_cap_frac", "at_zero_frac", "violated_frac")}
    enrichment = [h["lambda_enrichment"] for h in own if h.get("lambda_enrichment") is not None]
    return {"method": label, "seed": seed, "avg": r["test"]["avg_train_weighted"], "avg_plain": r["test"]["avg_plain"],
            "worst": r["test"]["wga"], "val_wga": r["val"]["wga"], "best_epoch": r["best_epoch"],
            "seconds": r["seconds"], **diag, "enrichment": float(np.mean(enrichment)) if enrichment else np.nan}


def runs(specs, seeds: int, epochs: int | None, jobs: int, **recipe) -> pd.DataFrame:
    """Every (label, method, params) of `specs` for seeds 0..seeds-1, `jobs` processes of one thread each; `recipe`:
    TrainConfig fields for every run (image_size=14, say)."""
    todo = [(label, m, prm, s, epochs, recipe) for label, m, prm in specs for s in range(seeds)]
    with ProcessPoolExecutor(jobs) as pool:
        return pd.DataFrame(list(tqdm(pool.map(run_one, todo), total=len(todo), desc="runs")))


def pm(df: pd.DataFrame, col: str, order: list[str]) -> list[str]:
    agg = df.groupby("method", sort=False)[col].agg(["mean", "std"]).reindex(order)
    return [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(agg["mean"], agg["std"])]


def parse_args(description: str) -> argparse.Namespace:
    """The flags every cmnist bench of this kind takes: --seeds, --epochs, --jobs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="default: the dataset's")
    p.add_argument("--jobs", type=int, default=2)
    return p.parse_args()


def main():
    args = parse_args(__doc__)
    df = runs(RUNS, args.seeds, args.epochs, args.jobs)
    order = [label for label, *_ in RUNS]
    table = pd.DataFrame({"test Avg (train-weighted)": pm(df, "avg", order),
                          "test Avg (plain)": pm(df, "avg_plain", order),
                          "test Worst": pm(df, "worst", order), "val WGA": pm(df, "val_wga", order),
                          "s/run": [f"{v:.0f}" for v in df.groupby("method")["seconds"].mean().reindex(order)]},
                         index=order)
    print(f"\ncmnist, {args.seeds} seeds, mean ± std (%), best epoch by val WGA\n")
    print(table.to_markdown())


if __name__ == "__main__":
    main()
