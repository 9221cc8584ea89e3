"""Ours in each trace scope against ERM and GroupDRO on the bundled cmnist, at 7 x 7 (the default) and 14 x 14.

    python bench/fim_scopes.py [--seeds 5] [--jobs 2] [--epochs N] [--sizes 7,14] [--searched --trials 12 --top-k 2]

Default recipes (every method's defaults, the dataset's recipe; only the digit size changes), seeds 0..n-1, early
stopping on val WGA. Rows: ERM, GroupDRO, and Ours with the logits, last_layer and full scopes (full: per-batch and
global active sets, empirical and expected Fisher). Each row: test Worst and Avg (train-weighted) mean ± std, the
paired 95% t-intervals of its test Worst minus ERM's and minus GroupDRO's over the same seeds, the enrichment of
lambda on bias-conflicting samples (group labels are read for that log only) and seconds per run.

--searched runs the study service's protocol instead (what the demo runs): per image size, one SQLite storage, a
TPE search of --trials trials per method (Ours once per scope, the scope fixed through the experiment's space),
then the top --top-k configurations re-run with --seeds seeds (the searched run counts as one) by two workers;
each row is the configuration the seed phase selects by mean val WGA. `--only "ERM;GroupDRO;Latent de-biasing"`
puts latent-space de-biasing (trainer/methods/latent_aug.py) beside them. Paired intervals need ERM and GroupDRO in
the same run (--scopes baselines,...). The bias-relative rows are `fim_relative`, an extension beyond the paper.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from methods_cmnist import pm, runs

from study.statistics import t_interval

SPECS = [
    ("ERM", "erm", {}),
    ("GroupDRO", "groupdro", {}),
    ("Ours (logits)", "fim", {"scope": "logits"}),
    ("Ours (logits, global K)", "fim", {"scope": "logits", "active_set": "global"}),
    ("Ours (last_layer)", "fim", {"scope": "last_layer"}),
    ("Ours (full)", "fim", {"scope": "full"}),
    ("Ours (full, global K)", "fim", {"scope": "full", "active_set": "global"}),
    ("Ours (full, expected)", "fim", {"scope": "full", "fisher": "expected"}),
    ("bias-relative K (logits)", "fim_relative", {"scope": "logits"}),  # the extension beyond the paper
    ("bias-relative K (full)", "fim_relative", {"scope": "full"}),
    ("Latent de-biasing", "latent_aug", {}),  # trains on the attribute labels of the training split, like GroupDRO
]
SEARCHED_SCOPES = ("logits", "last_layer", "full")
EXTENSION = "bias-relative K"  # fim_relative, searched over its scopes in one experiment of its own


def paired(worst: pd.DataFrame, label: str, against: str) -> str:
    if label == against:
        return "—"
    mean, lo, hi = t_interval(100 * (worst[label] - worst[against]))
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def table(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    worst = df.pivot(index="seed", columns="method", values="worst").dropna()
    enrichment = df.groupby("method")["enrichment"].mean().reindex(order)
    return pd.DataFrame({
        "test Worst": pm(df, "worst", order), "test Avg (train-weighted)": pm(df, "avg", order),
        "Worst − ERM, 95% CI": [paired(worst, label, "ERM") for label in order],
        "Worst − GroupDRO, 95% CI": [paired(worst, label, "GroupDRO") for label in order],
        "λ enrichment": [f"{v:.1f}×" if v == v else "" for v in enrichment],
        "s/run": [f"{v:.0f}" for v in df.groupby("method")["seconds"].mean().reindex(order)],
    }, index=order)


def searched(size: int, args) -> pd.DataFrame:
    """The demo's protocol on cmnist at `size`: a storage of its own, one experiment per Ours scope."""
    import warnings

    from study.demo import run_workers
    from study.experiment import Experiment, init_experiment, load_experiment
    from study.replicate import replicate
    from study.results import collect
    from study.storage import make_storage

    db = Path(tempfile.mkdtemp(prefix=f"fim_scopes{size}_")) / "s.db"
    url = f"sqlite:///{db}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = make_storage(url)
    rows = []
    for scope in args.scopes.split(","):
        name = f"scopes{size}-{scope}"
        methods = {"baselines": ["erm", "groupdro"], "relative": ["fim_relative"]}.get(scope, ["fim"])
        exp = Experiment.of(name=name, datasets=["cmnist"], methods=methods, trials=args.trials, image_size=size,
                            space={} if scope in ("baselines", "relative") else {"fim": {"scope": [scope]}})
        init_experiment(storage, exp)
        _, studies, seed_studies = load_experiment(storage, name, seeds=True)
        run_workers(url, db, args.jobs, studies, args.trials * len(studies), f"{name} search", experiment=name)
        enqueued = replicate(storage, name, args.seeds, args.top_k)
        run_workers(url, db, args.jobs, list(seed_studies.values()), sum(map(len, enqueued.values())),
                    f"{name} seeds", experiment=name)
        for r in collect(storage, name)[1]:
            label = {"erm": "ERM", "groupdro": "GroupDRO", "fim": f"Ours ({scope})",
                     "fim_relative": EXTENSION}[r.method]
            for t in r.runs():
                own = [e for e in t.record.diagnostics.get("lambda_enrichment") or [] if e is not None]
                rows.append({"method": label, "seed": t.seed, "worst": t.test.wga,
                             "avg": t.test.avg("avg_train_weighted"), "seconds": t.record.train_seconds,
                             "enrichment": float(np.mean(own)) if own else np.nan,
                             "params": ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in t.record.params.items()
                                                 if k != "scope" or r.method != "fim")})
    print(f"storage of the searched runs: {url}")
    return pd.DataFrame(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None, help="default recipes: epochs per run (default: the dataset's)")
    p.add_argument("--sizes", default="7,14", help="comma-separated digit sizes (cmnist image_size)")
    p.add_argument("--only", default=None, help="';'-separated row labels (default recipes)")
    p.add_argument("--searched", action="store_true", help="the study protocol instead of default recipes")
    p.add_argument("--trials", type=int, default=12, help="--searched: search budget per method")
    p.add_argument("--top-k", type=int, default=2, help="--searched: configurations re-run with seeds")
    p.add_argument("--scopes", default="baselines,logits,last_layer,full,relative",
                   help="--searched: experiments to run: baselines (ERM, GroupDRO), an Ours scope, relative "
                        "(fim_relative, its scope searched)")
    args = p.parse_args()
    if args.seeds < 2:
        raise SystemExit(f"error: --seeds must be >= 2 for a paired interval, got {args.seeds}")
    specs = SPECS if args.only is None else [s for s in SPECS if s[0] in args.only.split(";")]
    for size in (int(v) for v in args.sizes.split(",")):
        if args.searched:
            df = searched(size, args)
            order = [m for m in ["ERM", "GroupDRO", *(f"Ours ({s})" for s in SEARCHED_SCOPES), EXTENSION]
                     if m in set(df["method"])]
            what = (f"searched recipe ({args.trials} TPE trials per method, the top {args.top_k} re-run, "
                    f"the selected one's {args.seeds} seeds)")
        else:
            df = runs(specs, args.seeds, args.epochs, args.jobs, image_size=size)
            order = [label for label, *_ in specs]
            what = "default recipe"
        print(f"\ncmnist 2 × {size} × {size}, {what}, {args.seeds} seeds, mean ± std (%), paired over seeds\n")
        print(table(df, order).to_markdown())
        if args.searched:
            chosen = df.drop_duplicates("method").set_index("method")["params"].reindex(order)
            print("\nselected configurations:\n" + "\n".join(f"- {m}: {v}" for m, v in chosen.items()))


if __name__ == "__main__":
    main()
