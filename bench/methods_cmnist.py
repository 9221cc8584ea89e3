"""Every registered method (fim in both trace scopes) on cmnist (or --dataset texdigits) with its default recipe,
several seeds each, early stopping on val WGA.

    python bench/methods_cmnist.py [--dataset cmnist] [--only erm,groupdro,fim] [--seeds 5] [--epochs 20] [--jobs 2]
                                   [--pretrained]

Prints test Avg (train-weighted and plain) and Worst-group accuracy as mean ± std over seeds, and each method's
paired worst-group difference to ERM and to GroupDRO (same seeds) with its 95% Student-t interval.
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

RUNS = [(f"{cls.card.label} ({name})", name, {}) for name, cls in METHODS.items()] + [
    ("Ours (fim, last_layer)", "fim", {"scope": "last_layer"})]


def run_one(job):
    label, method, params, seed, epochs, recipe = job
    torch.set_num_threads(1)
    from trainer import TrainConfig, fit
    recipe = {"dataset": "cmnist", **recipe}
    r = fit(TrainConfig(method=method, seed=seed, epochs=epochs, method_params=params, **recipe),
            log=None)
    own = [h for h in r.history if h.get("constrained")]  # the Fisher method's constrained epochs
    diag = {k: float(np.mean([h[k] for h in own])) if own else np.nan
            for k in ("at_cap_frac", "at_zero_frac", "violated_frac")}
    enrichment = [h["lambda_enrichment"] for h in own if h.get("lambda_enrichment") is not None]
    return {"method": label, "seed": seed, "avg": r.test["avg_train_weighted"], "avg_plain": r.test["avg_plain"],
            "worst": r.test["wga"], "val_wga": r.val["wga"], "best_epoch": r.best_epoch,
            "seconds": r.seconds, **diag, "enrichment": float(np.mean(enrichment)) if enrichment else np.nan}


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
    p.add_argument("--dataset", default="cmnist", help="a generated dataset: cmnist or texdigits")
    p.add_argument("--only", help="comma-separated method names (default: every registered method)")
    p.add_argument("--pretrained", action="store_true", help="fine-tune from the offline backbone "
                   "(trainer/backbones.py) with the dataset's fine-tuning recipe")
    return p.parse_args()


def paired(df: pd.DataFrame, against: str, order: list[str]) -> list[str]:
    """Each row's test Worst minus `against`'s over the same seeds (pp), with its 95% t-interval and verdict."""
    from study.statistics import decided, t_interval
    ref = df[df["method"] == against].set_index("seed")["worst"]
    out = []
    for label in order:
        mine = df[df["method"] == label].set_index("seed")["worst"]
        diffs = 100 * (mine - ref).dropna()
        if label == against or len(diffs) < 2:
            out.append("")
            continue
        mean, lo, hi = t_interval(diffs)
        out.append(f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}] {decided(lo, hi)}")
    return out


def main():
    args = parse_args(__doc__)
    specs = [r for r in RUNS if not args.only or r[1] in args.only.split(",")]
    df = runs(specs, args.seeds, args.epochs, args.jobs, dataset=args.dataset, pretrained=args.pretrained)
    order = [label for label, *_ in specs]
    table = pd.DataFrame({"test Avg (train-weighted)": pm(df, "avg", order),
                          "test Avg (plain)": pm(df, "avg_plain", order),
                          "test Worst": pm(df, "worst", order), "val WGA": pm(df, "val_wga", order),
                          "s/run": [f"{v:.0f}" for v in df.groupby("method")["seconds"].mean().reindex(order)]},
                         index=order)
    for name, label in (("erm", "ERM"), ("groupdro", "GroupDRO")):
        ref = next((lab for lab, m, prm in specs if m == name and not prm), None)
        if ref:
            table[f"Worst − {label} (pp, 95% CI)"] = paired(df, ref, order)
    print(f"\n{args.dataset}{' (pretrained)' if args.pretrained else ''}, {args.seeds} seeds, mean ± std (%), best "
          "epoch by val WGA\n")
    print(table.to_markdown())


if __name__ == "__main__":
    main()
