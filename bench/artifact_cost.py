"""What keeping every COMPLETE trial's model costs: the same trial with `--keep none` and `--keep selected`, side by
side in one run, and the time to keep a ResNet-50.

    python bench/artifact_cost.py [--epochs 20] [--repeats 3] [--datasets cmnist,texdigits] [--no-resnet]

Per bundled benchmark: one-trial studies run by the worker loop on SQLite (the demo's path), alternating the two
policies; the table gives each policy's median trial time (the worker loop's wall time, its process start and data
excluded), their ratio, and the time spent inside keeping the model (serialising it, its sha256 and the two
artifact writes) as a share of the trial's training time. Then a ResNet-50 (2 classes, Waterbirds' model) kept the
same way: its seconds, beside the training time of a Waterbirds trial on an H200 from bench/README.md's step cost
(ERM 29.23 ms/step × 38 steps per epoch × 300 epochs; evaluation not counted, so the share is an upper bound).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

import study.worker as worker
from study.artifacts import AtomicFileStore
from study.experiment import Experiment, init_experiment
from study.storage import make_storage
from trainer.checkpoint import manifest_of, sha256, to_bytes

SETTINGS = {"cmnist": dict(image_size=7, model="cnn_narrow"), "texdigits": dict(image_size=64, model="cnn_stem")}
H200_WATERBIRDS_TRIAL_S = 29.23e-3 * 38 * 300  # ERM's training steps only (bench/README.md: step cost)


def one_trial(dataset: str, keep: str, epochs: int, spent: list[float]) -> tuple[float, float]:
    """(the worker loop's seconds, the trial's train_seconds) of a one-trial study."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = make_storage(f"sqlite:///{tmp}/t.db")
        exp = Experiment.of(name="keep", datasets=[dataset], methods=["erm"], trials=1, epochs=epochs, patience=0,
                            keep=keep, **SETTINGS[dataset])
        init_experiment(storage, exp, check_data=False)
        t0 = time.perf_counter()
        worker.run_worker(storage, "keep", device="cpu", sampler_seed=0, log=lambda *_: None)
        total = time.perf_counter() - t0
        (trial,) = storage.get_all_trials(storage.get_study_id_from_name(f"keep/{dataset}/erm"))
        assert (trial.user_attrs.get("model_artifact") is not None) == (keep == "selected")
        return total, trial.user_attrs["train_seconds"]


def resnet50_keep_seconds(repeats: int) -> tuple[float, int]:
    """(median seconds, bytes) to keep a ResNet-50's state as a trial does."""
    from trainer.models import build_model
    state = {k: v.clone() for k, v in build_model("resnet50", 2).state_dict().items()}
    result = SimpleNamespace(dataset="waterbirds", method="erm", seed=0, hparams={}, selection="val_wga",
                             objective=0.0, best_epoch=1, refit=False, data_checksum="", val={}, test={})
    times, size = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        store = AtomicFileStore(tmp)
        for i in range(repeats):
            t0 = time.perf_counter()
            data = to_bytes(manifest_of(result), state)
            sha256(data)
            path = Path(tmp) / "model.pt"
            path.write_bytes(data)  # keep_model writes a temporary file, then uploads it
            with open(path, "rb") as f:
                store.write(f"m{i}", f)
            times.append(time.perf_counter() - t0)
            size = len(data)
    return statistics.median(times), size


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="median over this many trials per policy")
    p.add_argument("--datasets", default="cmnist,texdigits")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    spent: list[float] = []
    real = worker.keep_model

    def timed_keep(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t0)
    worker.keep_model = timed_keep
    rows = []
    try:
        for dataset in args.datasets.split(","):
            runs: dict[str, list[tuple[float, float]]] = {"none": [], "selected": []}
            for _ in range(args.repeats):  # alternating: the machine's drift falls on both alike
                for keep in runs:
                    runs[keep].append(one_trial(dataset, keep, args.epochs, spent))
            med = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
            keep_s = statistics.median(spent[-args.repeats:])
            train = statistics.median(s for _, s in runs["selected"])
            rows.append({"benchmark": dataset, "trial, keep none (s)": med["none"],
                         "trial, keep selected (s)": med["selected"], "ratio": med["selected"] / med["none"],
                         "keeping the model (s)": keep_s, "share of training time": keep_s / train})
    finally:
        worker.keep_model = real
    print(f"\nERM, {args.epochs} epochs, 1 thread, median of {args.repeats} trials per policy\n")
    print(pd.DataFrame(rows).round(4).to_markdown(index=False))
    if not args.no_resnet:
        seconds, size = resnet50_keep_seconds(args.repeats)
        print(f"\nResNet-50 (2 classes): {size / 1e6:.1f} MB kept in {seconds:.2f} s (median of {args.repeats}); "
              f"{100 * seconds / H200_WATERBIRDS_TRIAL_S:.2f}% of a Waterbirds trial's training on an H200 "
              f"({H200_WATERBIRDS_TRIAL_S:.0f} s: 300 epochs x 38 steps x 29.23 ms)")


if __name__ == "__main__":
    main()
