"""The paper's regime offline: the bundled benchmarks' small CNNs fine-tuned from a backbone pretrained on a disjoint
source (trainer/backbones.py, `--pretrained`), compared through the study protocol.

    python bench/pretrained.py [--datasets cmnist,texdigits] [--trials 6] [--top-k 2] [--seeds 5] [--workers 2]
                               [--epochs N] [--methods erm,groupdro,jtt,dfr,fim] [--scopes logits,last_layer]
                               [--dir DIR] [--tables-only]

Per dataset, one SQLite storage in DIR (default: a new temporary folder) and three experiments, each the demo's
protocol (a search of --trials trials per method, then the top-k configurations x --seeds training seeds, the same
seeds for every method): `pre` (ERM, GroupDRO, JTT, DFR and Ours with the full scope, the paper's quantity),
`pre-logits` and `pre-last_layer` (Ours with that scope). Prints each experiment's report, then one table per
dataset: every row's test Avg and Worst, its paired worst-group difference to ERM and to GroupDRO over the same
seeds (95% Student-t intervals) and the report's mark of a selected model that is no trained baseline.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study.demo import run_workers  # noqa: E402
from study.experiment import Experiment, init_experiment, load_experiment  # noqa: E402
from study.render import render_markdown  # noqa: E402
from study.replicate import replicate  # noqa: E402
from study.results import collect  # noqa: E402
from study.statistics import decided, paired_diffs, t_interval  # noqa: E402
from study.storage import make_storage  # noqa: E402
from study.worker import run_worker  # noqa: E402
from study.tables import no_baseline  # noqa: E402

METHODS = "erm,groupdro,jtt,dfr,fim"  # `pre`'s; Ours there with the full scope
SCOPES = "logits,last_layer"           # Ours' other scopes, one experiment each


def experiments(methods: str, scopes: str) -> dict[str, tuple[list[str], dict]]:
    """{name: (methods, fixed params)}: `pre`, then `pre-SCOPE` for each other scope of Ours."""
    out = {"pre": (methods.split(","), {"fim": {"scope": "full"}} if "fim" in methods.split(",") else {})}
    out.update({f"pre-{s}": (["fim"], {"fim": {"scope": s}}) for s in scopes.split(",") if s})
    return out


def protocol(url: str, db: Path, name: str, dataset: str, methods: list[str], params: dict, args) -> None:
    storage = make_storage(url)
    init_experiment(storage, Experiment.of(name=name, datasets=[dataset], methods=methods, params=params,
                                           trials=args.trials, pretrained=True, epochs=args.epochs))
    _, studies, seed_studies = load_experiment(storage, name, seeds=True)

    def work(todo, total: int, phase: str) -> None:
        if args.workers:
            run_workers(url, db, args.workers, todo, total, f"{dataset} {name}: {phase}", name)
        else:  # one worker in this process (no interpreter to start: the smallest runs)
            run_worker(storage, name, device="cpu", log=lambda *a, **k: None)
    work(studies, args.trials * len(studies), "search")
    enqueued = replicate(storage, name, args.seeds, args.top_k)
    work(list(seed_studies.values()), sum(map(len, enqueued.values())), "seeds")


def pm(values) -> str:
    s = pd.Series(values, dtype=float) * 100
    return f"{s.mean():.1f} ± {s.std():.1f}"


def interval(a, b) -> str:
    diffs = paired_diffs(a, b)
    if a is b or len(diffs) < 2:
        return ""
    mean, lo, hi = t_interval(diffs)
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}] {decided(lo, hi)}"


def summary(url: str, names) -> pd.DataFrame:
    """The experiments' rows in one table, paired against ERM and GroupDRO over the same seeds."""
    rows = []
    for name in names:
        exp, results = collect(make_storage(url), name)
        rows += [(f"{r.label} ({exp.params[r.method]['scope']})" if r.method == "fim" else r.label, r)
                 for r in results]
    erm, dro = (next(r for _, r in rows if r.method == m) for m in ("erm", "groupdro"))
    return pd.DataFrame([{
        "method": label + (" †" if no_baseline(r) else ""),
        "test Avg": pm([t.test.avg_train_weighted for t in r.runs()]),
        "test Worst": pm([t.test.wga for t in r.runs()]),
        "seeds": len(r.runs()),
        "Worst − ERM (pp, 95% CI)": interval(r, erm), "Worst − GroupDRO (pp, 95% CI)": interval(r, dro),
        "mark": no_baseline(r) or ""} for label, r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="cmnist,texdigits")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="worker processes (0: one worker in this process)")
    p.add_argument("--epochs", type=int, default=None, help="default: the fine-tuning recipe's (30)")
    p.add_argument("--dir", default=None, help="where the storages go (default: a new temporary folder)")
    p.add_argument("--tables-only", action="store_true", help="print the tables of the storages in --dir again")
    p.add_argument("--methods", default=METHODS, help="`pre`'s methods (erm and groupdro among them)")
    p.add_argument("--scopes", default=SCOPES, help="Ours' scopes besides full, one experiment each ('' for none)")
    args = p.parse_args()
    if args.tables_only and not args.dir:
        p.error("--tables-only reads the storages of an earlier run: give its --dir")
    folder = Path(args.dir or tempfile.mkdtemp(prefix="pretrained-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets.split(","):
        db = folder / f"{dataset}.db"
        url = f"sqlite:///{db}"
        start = time.time()
        todo = experiments(args.methods, args.scopes)
        for name, (methods, params) in todo.items():
            if not args.tables_only:
                protocol(url, db, name, dataset, methods, params, args)
            exp, results = collect(make_storage(url), name)
            print(render_markdown(exp, results, "train_weighted"))
        print(f"\n{dataset}, pretrained backbone, the study protocol ({args.trials} trials, top {args.top_k} x "
              f"{args.seeds} seeds), {time.time() - start:.0f} s; storage {url}\n")
        print(summary(url, todo).to_markdown(index=False))


if __name__ == "__main__":
    main()
