"""An experiment: one Optuna study per (dataset, method), all sharing fixed settings stored in the studies."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field

import optuna

from trainer.data import get_dataset, load_splits
from trainer.methods import get_method
from trainer.methods.base import Choice, Float, Int

PRUNERS = ("median", "hyperband", "none")
SELECTION = "best epoch by val WGA within a trial; best trial by val WGA across trials"


@dataclass
class Experiment:
    name: str
    datasets: list[str]
    methods: list[str]
    trials: int = 20               # budget per (dataset, method) study
    epochs: int | None = None      # max epochs per trial; None = the dataset's default
    pruner: str = "median"         # median, hyperband or none (every worker builds the same one)
    data_dir: str | None = None    # root of on-disk datasets (fixed, not searched)
    model: str | None = None       # architecture; None = the dataset's default
    image_size: int | None = None  # None = the dataset's default
    patience: int = 10             # early stopping on val WGA inside a trial
    seed: int = 0                  # training seed of every searched trial (replicates add others)
    data_seed: int = 0             # generated splits/colours, fixed for the experiment
    space: dict = field(default_factory=dict)  # bound overrides: {"fim": {"rho": [0.1, 0.3]}, "train": {...}}

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"experiment name must be non-empty without '/', got {self.name!r}")
        if not self.datasets or not self.methods:
            raise ValueError("an experiment needs at least one dataset and one method")
        for d in self.datasets:
            get_dataset(d)
        for m in self.methods:
            get_method(m)
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"unknown pruner {self.pruner!r} (choose from {', '.join(PRUNERS)})")
        for d in self.datasets:
            for m in self.methods:
                search_space(self, d, m)  # validates the overrides

    def study_name(self, dataset: str, method: str) -> str:
        return f"{self.name}/{dataset}/{method}"

    def studies(self) -> list[tuple[str, str, str]]:
        return [(self.study_name(d, m), d, m) for d in self.datasets for m in self.methods]

    def load_splits(self, dataset: str):
        """The dataset exactly as every trial of this experiment reads it."""
        return load_splits(dataset, data_dir=self.data_dir, data_seed=self.data_seed,
                           image_size=self.image_size or get_dataset(dataset)[1].image_size)

    def epochs_for(self, dataset: str) -> int:
        return self.epochs or get_dataset(dataset)[1].epochs

    @classmethod
    def from_toml(cls, path: str, **overrides) -> "Experiment":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot read experiment config ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("datasets", "methods"):
            if isinstance(data.get(key), str):
                data[key] = data[key].split(",")
        return cls(**data)


def train_space(dataset: str) -> dict:
    """Searched for every method, around the dataset's published recipe."""
    d = get_dataset(dataset)[1]
    return {
        "lr": Float(d.lr / 10, d.lr * 10, log=True),
        "weight_decay": Float(1e-5, 1.0, log=True),  # GroupDRO's strong-regularisation recipe uses 1.0
        "batch_size": Choice((max(8, d.batch_size // 2), d.batch_size, d.batch_size * 2)),
    }


def search_space(exp: Experiment, dataset: str, method: str) -> dict:
    space = {**train_space(dataset), **get_method(method).SPACE}
    for scope in ("train", method):
        for name, bounds in exp.space.get(scope, {}).items():
            if name not in space:
                raise ValueError(f"space override {scope}.{name}: no such searched parameter "
                                 f"(has: {', '.join(space)})")
            old = space[name]
            if isinstance(old, Choice):
                if not bounds:
                    raise ValueError(f"space override {scope}.{name}: empty choice list")
                space[name] = Choice(tuple(bounds))
            else:
                if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2):
                    raise ValueError(f"space override {scope}.{name}: expected [low, high], got {bounds!r}")
                low, high = bounds
                if not low < high or (getattr(old, "log", False) and low <= 0):
                    raise ValueError(f"space override {scope}.{name}: invalid bounds [{low}, {high}] "
                                     f"(need low < high{', low > 0 for a log scale' if getattr(old, 'log', False) else ''})")
                space[name] = Float(float(low), float(high), old.log) if isinstance(old, Float) else Int(int(low), int(high))
    return space


def reference_params(exp: Experiment, dataset: str, method: str) -> dict:
    """The published recipe as trial parameters (enqueued first), restricted to values inside the space."""
    d, params = get_dataset(dataset)[1], dataclasses.asdict(get_method(method).Params())
    ref = {"lr": d.lr, "weight_decay": d.weight_decay, "batch_size": d.batch_size, **params}
    out = {}
    for name, spec in search_space(exp, dataset, method).items():
        v = ref[name]
        if (isinstance(spec, Choice) and v in spec.choices) or (not isinstance(spec, Choice) and spec.low <= v <= spec.high):
            out[name] = v
    return out


def make_pruner(exp: Experiment, dataset: str) -> optuna.pruners.BasePruner:
    epochs = exp.epochs_for(dataset)
    if exp.pruner == "median":
        # MedianPruner counts only COMPLETE trials; let the first trials and epochs run unpruned.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 4), n_min_trials=3)
    if exp.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, epochs // 10), max_resource=epochs,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def init_experiment(storage, exp: Experiment, check_data: bool = True) -> list[str]:
    """Create the experiment's studies (harmless if they exist with the same settings). Returns study names.

    Everything is checked before anything is written, so a refused init leaves no partial experiment.
    """
    if check_data:
        for d in exp.datasets:
            exp.load_splits(d)
    settings = asdict(exp)
    existing = set(optuna.get_all_study_names(storage))
    for name, _, _ in exp.studies():
        if name in existing:
            stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get("experiment", {})
            diff = _diff(stored, settings)
            if diff:
                raise ValueError(f"experiment {exp.name!r} already exists with different settings: {'; '.join(diff)}")
    others = [n for n in existing if n.startswith(exp.name + "/") and n not in {s for s, _, _ in exp.studies()}]
    if others:
        raise ValueError(f"experiment {exp.name!r} already exists with different studies: {', '.join(sorted(others))}")
    names = []
    for name, dataset, method in exp.studies():
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
        if name not in existing:
            study.set_user_attr("experiment", settings)
            study.set_user_attr("dataset", dataset)
            study.set_user_attr("method", method)
            study.set_user_attr("uses_group_labels", get_method(method).uses_group_labels)
            study.set_user_attr("selection", SELECTION)
            study.enqueue_trial(reference_params(exp, dataset, method), user_attrs={"reference": True},
                                skip_if_exists=True)
        names.append(name)
    return names


def load_experiment(storage, name: str) -> tuple[Experiment, list[optuna.Study]]:
    names = sorted(n for n in optuna.get_all_study_names(storage) if n.startswith(name + "/"))
    if not names:
        raise ValueError(f"no experiment named {name!r} in this storage")
    studies = [optuna.load_study(study_name=n, storage=storage) for n in names]
    exp = Experiment(**studies[0].user_attrs["experiment"])
    order = {s: i for i, (s, _, _) in enumerate(exp.studies())}
    return exp, sorted(studies, key=lambda s: order.get(s.study_name, len(order)))
