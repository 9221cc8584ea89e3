"""Every method's learning on both bundled benchmarks, as numbers to compare across a change of the code.

    python bench/method_fingerprint.py [--epochs 3] [--datasets cmnist,texdigits] [--save FILE] [--compare FILE]

Runs every registered method (and the variants that take another code path: Ours' three trace scopes and its
global active set, fim_relative's full scope, adaptive SAM, the Fisher penalty every 2nd step) on cmnist and
texdigits, one CPU thread, seed 0, and keeps what each run learned — every epoch's training logs and val metrics,
the selected epoch, every per-group val and test accuracy — and its diagnostics (the method's per-epoch statistics).
`--save` writes them as JSON; `--compare` runs again and prints, per run, whether what it learned is bit-identical
to the saved file's (else the first number that is not: the run fails), and the first diagnostic that differs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import pandas as pd

from trainer import TrainConfig, fit
from trainer.methods import METHODS

SHORT = {"jtt": {"stage1_epochs": 1}, "latent_aug": {"n_pairs": 100, "gen_epochs": 2, "width": 8}}
VARIANTS = [("fim", {"scope": "last_layer"}), ("fim", {"scope": "full"}), ("fim", {"active_set": "global"}),
            ("fim_relative", {"scope": "full"}), ("sam", {"adaptive": True}), ("fisher_penalty", {"every_k": 2})]
DATASETS = ("cmnist", "texdigits")


def runs() -> list[tuple[str, str, dict]]:
    out = [(name, name, dict(SHORT.get(name, {}))) for name in METHODS]
    out += [(f"{m} {' '.join(f'{k}={v}' for k, v in p.items())}", m, p) for m, p in VARIANTS]
    return out


LEARNED = ("epoch", "own")  # beside every train_* and val_* key of an epoch's record


def record(r) -> dict:
    """A run's numbers, without its timings."""
    history = [{k: v for k, v in h.items() if k not in ("seconds", "generator_seconds")} for h in r.history]
    return {"best_epoch": r.best_epoch, "objective": r.objective, "history": history, "val": r.val, "test": r.test}


def split(run: dict) -> tuple[dict, list]:
    """(what the run learned, its diagnostics) of a record(): per-group accuracies and counts, not how groups are
    named."""
    def metrics(m):
        return {**{k: v for k, v in m.items() if k != "groups"},
                "groups": [{k: g[k] for k in ("group", "acc", "count")} for g in m["groups"]]}
    learnt = [{k: v for k, v in h.items() if k in LEARNED or k.startswith(("train_", "val_"))} for h in run["history"]]
    diagnostics = [{k: v for k, v in h.items() if not (k in LEARNED or k.startswith(("train_", "val_")))}
                   for h in run["history"]]
    return ({"best_epoch": run["best_epoch"], "objective": run["objective"], "history": learnt,
             "val": metrics(run["val"]), "test": metrics(run["test"])}, diagnostics)


def first_difference(a, b, path="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}{k}: only in {'new' if k in b else 'saved'}"
            d = first_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}{i}.")
            if d:
                return d
        return None
    return None if a == b else f"{path.rstrip('.')}: saved {a!r}, now {b!r}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--save", help="write the runs' numbers to this JSON file")
    ap.add_argument("--compare", help="compare with this JSON file (written by --save)")
    ap.add_argument("--only", help="comma-separated run names (default: all)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated bundled benchmarks")
    args = ap.parse_args(argv)
    saved = json.load(open(args.compare)) if args.compare else {}
    out, rows = {}, []
    chosen = [r for r in runs() if not args.only or r[0] in args.only.split(",")]
    for dataset in args.datasets.split(","):
        for label, method, params in chosen:
            t0 = time.perf_counter()
            cfg = TrainConfig(dataset=dataset, method=method, method_params=params, epochs=args.epochs, patience=0,
                              seed=0, threads=1, device="cpu")
            key = f"{dataset} {label}"
            out[key] = record(fit(cfg, log=None))
            row = {"run": key, "seconds": round(time.perf_counter() - t0, 1),
                   "test wga": round(out[key]["test"]["wga"], 4)}
            if args.compare:
                (learnt, diag), (was, was_diag) = split(out[key]), split(saved[key]) if key in saved else ({}, [])
                diff = first_difference(was, learnt) if key in saved else "not in the saved file"
                row["learned identical"] = "yes" if diff is None else f"no: {diff}"
                row["first diagnostic that differs"] = first_difference(was_diag, diag) or "-"
            rows.append(row)
            print(rows[-1], file=sys.stderr, flush=True)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))
    return 1 if args.compare and any(r["learned identical"] != "yes" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
