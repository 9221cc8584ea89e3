"""`python -m study.report`: the paper's table (test Avg / Worst per method) from an experiment's studies.

Selection, the same rule for every method: by the experiment's selection metric (ties: val average, then fewer
epochs). After `python -m study replicate`, the top-k searched configurations are re-run with more seeds and the
one with the best mean over its seeds is the row: mean ± std over its seeds, and paired Student-t intervals of
the worst-group differences between methods.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.files import write_atomically
from trainer.settings import Parser

from .figures import figures
from .render import FORMATS, SUFFIXES, render
from .results import AVG, collect


REPORT_MARK: dict[str, str | tuple[str, ...]] = {
    "markdown": "Experiment ", "csv": ("experiment,table,", "dataset,method,"),  # this layout, the last
    "latex": "\\begin{table}", "html": "<!DOCTYPE html>"}


def check_outputs(paths: list[str], fmt: str | None, storage) -> list[tuple[Path, str]]:
    """(path, format) for every --out, refusing before anything is written: an unknown suffix, the storage file
    itself, a folder, or an existing file that is not a report of this format (never overwritten)."""
    db = storage.engine.url.database if storage.engine.dialect.name == "sqlite" else None
    out = []
    for path in map(Path, paths):
        f = fmt or SUFFIXES.get(path.suffix.lower())
        if f is None:
            raise ValueError(f"--out {path}: cannot tell the format from {path.suffix!r}; give --format")
        if db and path.resolve() == Path(db).resolve():
            raise ValueError(f"--out {path}: that is the storage itself; not overwritten")
        if path.is_dir():
            raise ValueError(f"--out {path}: is a folder")
        if not path.parent.is_dir():  # checked for every --out before the first is written
            raise ValueError(f"--out {path}: no folder {str(path.parent)!r}")
        if path.exists():
            try:
                head = path.read_text(errors="strict")[:200]
            except (UnicodeDecodeError, OSError):
                head = ""
            if not head.startswith(REPORT_MARK[f]):
                raise ValueError(f"--out {path}: exists and is not a {f} report; not overwritten")
        out.append((path, f))
    return out


def to_dashboard(storage, experiment: str, avg: str) -> int:
    """Saves each study's figures into the study for optuna-dashboard (same ids: a rerun replaces them)."""
    import optuna
    from optuna_dashboard import save_plotly_graph_object

    exp, results = collect(storage, experiment)
    n = 0
    for r in results:
        study = optuna.load_study(study_name=r.name, storage=storage)
        for key, fig in figures([x for x in results if x.dataset == r.dataset], avg, exp.selection).items():
            save_plotly_graph_object(study, fig, graph_object_id=f"report-{key}")
            n += 1
    return n


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True,
                   help="the experiment, or several comma-separated (their reports side by side)")
    p.add_argument("--storage", help="storage URL (default: $OPTUNA_STORAGE or sqlite:///studies.db)")
    p.add_argument("--storage-file", help="a file holding the storage URL, readable only by you (chmod 600); "
                                          "also $OPTUNA_STORAGE_FILE")
    p.add_argument("--format", choices=FORMATS,
                   help="output format (default: from each --out suffix .md/.csv/.tex/.html, else markdown)")
    p.add_argument("--out", action="append", default=[],
                   help="write to this file instead of standard output (repeatable: --out r.html --out r.md)")
    p.add_argument("--avg", choices=list(AVG), default="train_weighted",
                   help="Avg definition: train_weighted (Waterbirds convention) or plain test accuracy")
    p.add_argument("--to-dashboard", action="store_true",
                   help="also save the figures into each study for optuna-dashboard")
    return p


def main(argv=None) -> int:
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from .storage import INTERACTIVE_TIMEOUT, StorageError, from_flags, make_storage
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    args = get_args_parser().parse_args(argv)
    try:
        url, _ = from_flags(args.storage, args.storage_file)
        storage = make_storage(url, default_timeout=INTERACTIVE_TIMEOUT, read_only=True)
        outs = check_outputs(args.out, args.format, storage)  # every --out is checked before any is written
        names = list(dict.fromkeys(args.experiment.split(",")))
        reports = [collect(storage, name) for name in names]
        if not args.out:
            sys.stdout.write(render(args.format or "markdown", reports, args.avg))
        for out, fmt in outs:
            write_atomically(out, render(fmt, reports, args.avg))
            print(f"wrote the {fmt} report of {', '.join(map(repr, names))} to {out}", file=sys.stderr)
        if args.to_dashboard:
            n = sum(to_dashboard(storage, name, args.avg) for name in names)
            print(f"saved {n} figures into the studies for optuna-dashboard", file=sys.stderr)
    except (ValueError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
