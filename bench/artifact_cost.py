"""What keeping models and resumable states costs: the same trial under five policies, side by side in one run,
and the time to keep a ResNet-50's model and its resumable state.

    python bench/artifact_cost.py [--epochs 20] [--repeats 3] [--datasets cmnist,texdigits] [--no-resnet]

Per bundled benchmark: one-trial studies run by the worker loop on SQLite (the demo's path), the policies
alternating: nothing kept (`--keep none --resume-budget 0`), the selected model (`--resume-budget 0`), the default
(the model and resumable states paced within 3% of the training time), a state after every epoch
(`--resume-budget 1`) and every epoch's model kept (`--keep all-epochs`, counted as keeping the model). The table
gives each policy's median trial time (the worker loop's wall time, its process start and data excluded), its
ratio to keeping nothing, and the time spent inside keeping models (serialising, sha256, the artifact writes) and
inside the states (the snapshots and their writes) as a share of the trial's training time. Then a ResNet-50
(2 classes, Waterbirds' model): its model and its resumable state (weights, SGD momentum, the best weights so far)
written as a trial writes them, beside a Waterbirds epoch and trial on an H200 from bench/README.md's step cost
(ERM 29.23 ms/step x 38 steps per epoch x 300 epochs; evaluation not counted, so the shares are upper bounds), and
how often the default pacing writes that state there.
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

import study.resume as resume
import study.worker as worker
from study.artifacts import AtomicFileStore
from study.experiment import Experiment, init_experiment
from study.storage import make_storage
from trainer.checkpoint import manifest_of, sha256, to_bytes
from trainer.resume import ResumeState, cpu_copy, rng_states

SETTINGS = {"cmnist": dict(image_size=7, model="cnn_narrow"), "texdigits": dict(image_size=64, model="cnn_stem")}
H200_WATERBIRDS_EPOCH_S = 29.23e-3 * 38  # ERM's training steps only (bench/README.md: step cost)
H200_WATERBIRDS_TRIAL_S = H200_WATERBIRDS_EPOCH_S * 300
POLICIES = {"nothing": ("none", 0.0), "model": ("selected", 0.0), "default": ("selected", 0.03),
            "state every epoch": ("selected", 1.0), "all epochs": ("all-epochs", 0.03)}


def one_trial(dataset: str, policy: str, epochs: int) -> tuple[float, float]:
    """(the worker loop's seconds, the trial's train_seconds) of a one-trial study."""
    keep, budget = POLICIES[policy]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = make_storage(f"sqlite:///{tmp}/t.db")
        exp = Experiment.of(name="keep", datasets=[dataset], methods=["erm"], trials=1, epochs=epochs, patience=0,
                            keep=keep, resume_budget=budget, **SETTINGS[dataset])
        init_experiment(storage, exp, check_data=False)
        t0 = time.perf_counter()
        worker.run_worker(storage, "keep", device="cpu", sampler_seed=0, log=lambda *_: None)
        total = time.perf_counter() - t0
        (trial,) = storage.get_all_trials(storage.get_study_id_from_name(f"keep/{dataset}/erm"))
        assert (trial.user_attrs.get("model_artifact") is not None) == (keep != "none")
        return total, trial.user_attrs["train_seconds"]


def resnet50_state_seconds(repeats: int) -> tuple[float, float, int]:
    """(median seconds to snapshot, median seconds to write, bytes) of a ResNet-50's resumable state as a trial
    takes and writes it: weights, SGD momentum (after one step), the best weights so far as a separate copy."""
    from trainer.models import build_model
    model = build_model("resnet50", 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 1])).backward()
    optimizer.step()
    best = cpu_copy(model.state_dict())
    snaps, writes, size = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        store = AtomicFileStore(tmp)
        for i in range(repeats):
            t0 = time.perf_counter()
            state = ResumeState("0" * 16, "0" * 16, 1, cpu_copy(model.state_dict()), cpu_copy(optimizer.state_dict()),
                                {"module": {}, "optimizers": []}, rng_states(torch.device("cpu")), [{}], 1, {}, best, 0)
            t1 = time.perf_counter()
            data = state.to_bytes()
            sha256(data)
            store.write(f"s{i}", io.BytesIO(data))
            snaps.append(t1 - t0)
            writes.append(time.perf_counter() - t1)
            size = len(data)
    return statistics.median(snaps), statistics.median(writes), size


def resnet50_keep_seconds(repeats: int) -> tuple[float, int]:
    """(median seconds, bytes) to keep a ResNet-50's model as a trial does."""
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
    spent: dict[str, list[float]] = {"model": [0.0], "states": [0.0]}
    real_keep, real_offer, real_flush = worker.keep_model, resume.StateKeeper.offer, resume.StateKeeper.flush

    def timed(kind, f):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[kind][-1] += time.perf_counter() - t0
        return run
    real_epoch = worker.keep_epoch
    worker.keep_model = timed("model", real_keep)
    worker.keep_epoch = timed("model", real_epoch)
    resume.StateKeeper.offer = timed("states", real_offer)  # type: ignore[method-assign]
    resume.StateKeeper.flush = timed("states", real_flush)  # type: ignore[method-assign]
    rows = []
    try:
        for dataset in args.datasets.split(","):
            runs: dict[str, list[tuple[float, float, float, float]]] = {p: [] for p in POLICIES}
            one_trial(dataset, "nothing", 1)  # warm-up: the first trial of a process pays for loading the data
            for _ in range(args.repeats):  # alternating: the machine's drift falls on all alike
                for policy in runs:
                    spent["model"].append(0.0)
                    spent["states"].append(0.0)
                    total, train = one_trial(dataset, policy, args.epochs)
                    runs[policy].append((total, train, spent["model"][-1], spent["states"][-1]))
            nothing = statistics.median(r[0] for r in runs["nothing"])
            for policy, r in runs.items():
                train = statistics.median(x[1] for x in r)
                rows.append({"benchmark": dataset, "policy": policy, "trial (s)": statistics.median(x[0] for x in r),
                             "ratio to nothing": statistics.median(x[0] for x in r) / nothing,
                             "keeping the model, share": statistics.median(x[2] for x in r) / train,
                             "states, share": statistics.median(x[3] for x in r) / train})
    finally:
        worker.keep_model, worker.keep_epoch = real_keep, real_epoch
        resume.StateKeeper.offer, resume.StateKeeper.flush = real_offer, real_flush  # type: ignore[method-assign]
    print(f"\nERM, {args.epochs} epochs, 1 thread, median of {args.repeats} trials per policy (shares: of the "
          "trial's training time)\n")
    print(pd.DataFrame(rows).round(4).to_markdown(index=False))
    if not args.no_resnet:
        seconds, size = resnet50_keep_seconds(args.repeats)
        print(f"\nResNet-50 (2 classes): its model, {size / 1e6:.1f} MB, kept in {seconds:.2f} s (median of "
              f"{args.repeats}); {100 * seconds / H200_WATERBIRDS_TRIAL_S:.2f}% of a Waterbirds trial's training on "
              f"an H200 ({H200_WATERBIRDS_TRIAL_S:.0f} s: 300 epochs x 38 steps x 29.23 ms)")
        snap, write, size = resnet50_state_seconds(args.repeats)
        every = (snap + write) / 0.03  # training seconds the default budget needs per state (snapshots included)
        print(f"ResNet-50 resumable state: {size / 1e6:.1f} MB, snapshot (host copies) {snap:.3f} s, written in "
              f"{write:.2f} s (median of {args.repeats}). At the default 3% budget a state is written every "
              f"~{every:.0f} s of training: every ~{every / H200_WATERBIRDS_EPOCH_S:.0f} epochs of Waterbirds on an "
              f"H200 ({H200_WATERBIRDS_EPOCH_S:.2f} s an epoch); the snapshots come out of the same budget: at "
              f"most one every ~{snap / (0.03 * H200_WATERBIRDS_EPOCH_S):.1f} epochs there (a GPU's device-to-host "
              "copy is not measured here)")


if __name__ == "__main__":
    main()
