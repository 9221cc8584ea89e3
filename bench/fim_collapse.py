"""How the full-scope Fisher constraint fails on cmnist: a sweep of its multiplier cap against ERM, with what tells
fitting from flattening (the features' norm, the most predicted class, the constrained samples' accuracy).

    python bench/fim_collapse.py [--seeds 3] [--jobs 2] [--caps 1e-30,1e-4,1e-3,1e-2,1,10] [--epochs 20]

cmnist's default recipe (2 x 7 x 7, `cnn_narrow`, 20 epochs, clipping 5), `fim --scope full` with every other
parameter at its default; seeds 0 .. seeds-1. Per row: test worst-group and average (%, mean ± std), the seeds whose
features collapsed (val mean penultimate norm < 1e-3 at some epoch) and the first epoch they did, the share of the
most predicted val class at the last epoch, the constrained samples' train accuracy and the mean multiplier in the
first constrained epoch, and the selected model's train accuracy on bias-aligned and bias-conflicting samples.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from methods_cmnist import pm  # noqa: E402

COLLAPSED = 1e-3  # study.tables.COLLAPSED_NORM


def run_one(job) -> dict:
    label, method, params, seed, epochs = job
    torch.set_num_threads(1)
    from trainer import TrainConfig, fit
    from trainer.metrics import bias_conflicting
    from trainer.models import build_model
    cfg = TrainConfig(dataset="cmnist", method=method, seed=seed, method_params=params, threads=1, epochs=epochs)
    splits = cfg.resolved().load_splits()  # once: the run's and the selected model's train accuracy
    r = fit(cfg, splits=splits, log=None, keep_state=True)
    model = build_model(r.hparams["model"], splits.n_classes, in_channels=splits.in_channels)
    model.load_state_dict(r.state)
    with torch.no_grad():
        right = model.eval()(splits.train.x).argmax(1) == splits.train.y
    conflicting = bias_conflicting(splits.train.y, splits.train.a)
    flat = [h["epoch"] for h in r.history if h["val_feature_norm"] < COLLAPSED]
    own = [h for h in r.history if h.get("constrained")]
    return {"method": label, "seed": seed, "worst": r.test["wga"], "avg": r.test["avg_train_weighted"],
            "collapsed": bool(flat), "first_flat": flat[0] if flat else np.nan,
            "top_share": r.history[-1]["val_top_class_share"],
            "active_acc": own[0]["active_accuracy"] if own else np.nan,
            "lambda_mean": own[0]["lambda_mean"] if own else np.nan,
            "aligned": float(right[~conflicting].float().mean()),
            "conflicting": float(right[conflicting].float().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--caps", default="1e-30,1e-4,1e-3,1e-2,1,10")
    p.add_argument("--epochs", type=int, default=None, help="default: the dataset's (20)")
    args = p.parse_args()
    specs = [("ERM", "erm", {})] + [(f"full, λ_max {c}", "fim", {"scope": "full", "lambda_max": float(c)})
                                    for c in args.caps.split(",")]
    jobs = [(label, m, prm, s, args.epochs) for label, m, prm in specs for s in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        df = pd.DataFrame(list(tqdm(pool.map(run_one, jobs), total=len(jobs), desc="runs")))
    g = df.groupby("method", sort=False)
    order = list(g.size().index)

    def pct(col):
        return pm(df, col, order)

    table = pd.DataFrame({
        "test Worst": pct("worst"), "test Avg": pct("avg"),
        "collapsed seeds": [f"{int(v.sum())}/{len(v)}" for _, v in g["collapsed"]],
        "first collapsed epoch": [", ".join(str(int(e)) for e in v.dropna()) or "—" for _, v in g["first_flat"]],
        "top class share, last epoch": pct("top_share"),
        "constrained acc, 1st epoch": pct("active_acc"), "λ mean, 1st epoch": [
            "" if np.isnan(v) else f"{v:.3g}" for v in g["lambda_mean"].mean()],
        "train acc aligned": pct("aligned"), "train acc conflicting": pct("conflicting")}, index=order)
    print(f"\ncmnist default recipe, seeds 0-{args.seeds - 1}, mean ± std (%); selected model by val WGA\n")
    print(table.to_markdown())


if __name__ == "__main__":
    main()
