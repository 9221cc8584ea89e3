"""An experiment: one Optuna study per (dataset, method), all sharing fixed settings stored in the studies."""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import warnings
from dataclasses import asdict, dataclass, field

import optuna

import torch

from trainer.config import TrainConfig, default_patience
from trainer.data import DATASETS, SCRATCH_MODELS, get_dataset, recipe
from trainer.methods import METHODS, TrainSplit, get_method
from trainer.methods.base import Choice, Float, Int
from trainer.metrics import get_selection
from trainer.settings import check

from .artifacts import KEEP, check_location, check_store, default_location
from .records import plan
from .storage import named_lock

PRUNERS = ("median", "hyperband", "none")
SEEDS_SUFFIX = "seeds"   # the seed-phase study of (dataset, method) is "<experiment>/<dataset>/<method>/seeds"
MAX_NAME = 120           # Optuna stores study names in 512 characters; keep room for the dataset/method suffix


def own_studies(names, experiment: str) -> list[str]:
    """The studies of `experiment` among `names`: <experiment>/<dataset>/<method>, and its /seeds sibling, for a
    registered dataset and method. Another tool's study under the same prefix ("team/other") is not one of them."""
    out = []
    for n in names:
        head, sep, rest = n.partition("/")
        parts = rest.split("/")
        if head == experiment and sep and len(parts) in (2, 3) and parts[0] in DATASETS and parts[1] in METHODS and (
                len(parts) == 2 or parts[2] == SEEDS_SUFFIX):
            out.append(n)
    return sorted(out)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


RUN_SETTINGS = {f.name: f for f in TrainConfig.settings("experiment")}  # what an experiment fixes for every trial
SEARCHED_RUN = ("lr", "weight_decay", "batch_size")  # searched for every method, unless the experiment fixes them


@dataclass
class Experiment:
    """One study per (dataset, method). `run` holds the trainer's settings that every trial shares (unset: the
    dataset's recipe); `params` fixes method parameters for every trial. A setting fixed here is not searched."""
    name: str
    datasets: list[str]
    methods: list[str]
    trials: int = 20               # search budget per (dataset, method) study; a retried lineage counts once
    pruner: str = "median"         # median, hyperband or none (every worker builds the same one)
    run: TrainConfig = field(default_factory=TrainConfig)  # its per-trial settings (dataset, method, ...) unused
    params: dict = field(default_factory=dict)  # {METHOD: {param: value}}: fixed for every trial, not searched
    space: dict = field(default_factory=dict)  # bound overrides: {METHOD: {param: [low, high]}, "train": {...}}
    artifacts: str | None = None   # the folder the trials keep their models in ("": none kept; None: not said, init
    #                                fills in the default: beside an SQLite file, else none, see study/artifacts.py)
    keep: str = "selected"         # what a trial keeps there: none, or selected (the model its test pass used)
    resume_budget: float = 0.03    # a running trial's resumable states (study/resume.py) cost at most this share of
    #                                its training time (0: none written; they need the artifact store)
    resume_interval: float = 0.0   # and are at least this many training seconds apart

    def __post_init__(self):
        if self.methods == ["all"]:  # every registered method, in the registry's order
            self.methods = list(METHODS)
        if not isinstance(self.name, str) or not self.name or "/" in self.name or len(self.name) > MAX_NAME:
            raise ValueError(f"experiment name must be 1 to {MAX_NAME} characters without '/', got {self.name!r}")
        for key in ("datasets", "methods"):
            value = getattr(self, key)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{key} must be a non-empty list of names, got {value!r}")
            if len(set(value)) != len(value):
                raise ValueError(f"{key} lists a name twice: {value!r}")
        for d in self.datasets:
            get_dataset(d)
        for m in self.methods:
            get_method(m)
        if not (_is_int(self.trials) and 1 <= self.trials < 2**31):
            raise ValueError(f"trials must be an integer from 1 to 2**31 - 1, got {self.trials!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"unknown pruner {self.pruner!r} (choose from {', '.join(PRUNERS)})")
        if self.keep not in KEEP:
            raise ValueError(f"unknown keep policy {self.keep!r} (choose from {', '.join(KEEP)})")
        for key, high in (("resume_budget", 1.0), ("resume_interval", 1e7)):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= high):
                raise ValueError(f"{key} must be a number from 0 to {high:g}, got {value!r}")
        if self.artifacts is not None:
            if not isinstance(self.artifacts, str) or "\n" in self.artifacts or "\0" in self.artifacts:
                raise ValueError(f"artifacts must be a folder's path or s3://BUCKET/PREFIX, got {self.artifacts!r}")
            if self.artifacts:
                check_location(self.artifacts)  # a location this version opens
        for name, f in RUN_SETTINGS.items():
            setattr(self.run, name, check(f, getattr(self.run, name)))
        for key in ("params", "space"):
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ValueError(f"{key} must be tables [{key}.METHOD] of name = value, got {value!r}")
        unknown = set(self.params) - set(self.methods)
        if unknown:
            raise ValueError(f"params for {', '.join(sorted(unknown))}: not a method of this experiment "
                             f"({', '.join(self.methods)})")
        unknown = set(self.space) - {"train", *self.methods}
        if unknown:
            raise ValueError(f"space override for {', '.join(sorted(unknown))}: not 'train' or a method of this "
                             f"experiment ({', '.join(self.methods)})")
        for d in self.datasets:
            self.recipe(d).resolved()  # the fixed settings are valid for every dataset (model, augment, freeze_bn)
            for m in self.methods:
                check_space(search_space(self, d, m), m, self.epochs_for(d), self.params.get(m, {}))

    def settings(self) -> dict:
        """What the studies store: the experiment's own settings, with `run` holding only the run settings."""
        return {**{k: v for k, v in asdict(self).items() if k != "run"},
                "run": {name: getattr(self.run, name) for name in RUN_SETTINGS}}

    @classmethod
    def of(cls, **settings) -> "Experiment":
        """From settings by name, run settings among them: Experiment.of(name=..., epochs=4, ...)."""
        return cls.from_dict(settings)

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> "Experiment":
        """From stored settings, a TOML file or flags: run settings may be given at the top level (epochs = 4) or
        in a `run` table; a setting added since the settings were written takes its default."""
        data = dict(data)
        run = data.pop("run", None) or {}
        if not isinstance(run, dict):
            raise ValueError(f"{where}run must be a table of run settings, got {run!r}")
        run = dict(run)
        run.update({k: data.pop(k) for k in list(data) if k in RUN_SETTINGS})
        known = {f.name for f in dataclasses.fields(cls)} - {"run"}
        unknown = (set(data) - known) | (set(run) - set(RUN_SETTINGS))
        if unknown:
            raise ValueError(f"{where}unknown setting(s) {', '.join(sorted(unknown))} (run settings: "
                             f"{', '.join(RUN_SETTINGS)})")
        return cls(**data, run=TrainConfig(**run))

    def recipe(self, dataset: str, method: str | None = None) -> TrainConfig:
        """The settings every trial of (dataset, method) shares, as a TrainConfig whose unset fields resolve to the
        dataset's recipe for the experiment's model; the method's fixed parameters included."""
        method = method or self.run.method  # none: the trainer's default method, for the settings alone
        return dataclasses.replace(self.run, dataset=dataset, method=method,
                                   method_params=dict(self.params.get(method, {})))

    def check_weights(self, dataset: str, in_channels: int) -> None:
        """The pretrained weights the dataset's recipe starts from are on this machine and load into its model, for
        the data's `in_channels` (init checks them as it checks the data: not every trial failing on a worker
        later). A small CNN's offline backbone is built here on first use (a minute at most), then cached."""
        cfg = self.recipe(dataset).resolved()
        if not (cfg.pretrained or cfg.weights) or cfg.model is None:
            return
        from trainer.models import build_model, pretrained_weights_path
        if cfg.weights or cfg.model not in SCRATCH_MODELS:  # a file: --weights, or torchvision's cache
            try:
                pretrained_weights_path(cfg.model, cfg.weights)
            except ValueError as e:
                raise ValueError(f"dataset {dataset}: its recipe starts {cfg.model} from "
                                 f"{'pretrained' if cfg.weights else 'ImageNet'} weights: {e}; or "
                                 f"train from scratch: --model cnn") from None
        try:  # loaded into the model as every trial will: a file no worker can load is refused here
            build_model(cfg.model, 2, pretrained=True, weights_path=cfg.weights, in_channels=in_channels,
                        source=(dataset, cfg.image_size))
        except ValueError as e:
            raise ValueError(f"dataset {dataset}: {e}") from None

    def warnings(self) -> list[str]:
        """Each (dataset, method)'s recipe warning (Method.recipe_warning) over the values its search may draw."""
        out = []
        for d in self.datasets:
            for m in self.methods:
                cfg, space = self.recipe(d, m).resolved(), search_space(self, d, m)
                values = {k: tuple(space[k].choices) if isinstance(space.get(k), Choice) else (v,)
                          for k, v in cfg.method_params.items()}
                lr = space["lr"].high if isinstance(space.get("lr"), Float) else cfg.lr
                assert lr is not None and cfg.grad_clip is not None
                if line := get_method(m).recipe_warning(values, lr, cfg.grad_clip):
                    out.append(f"{d}/{m}: {line}")
        return out

    def study_name(self, dataset: str, method: str) -> str:
        return f"{self.name}/{dataset}/{method}"

    def seeds_study_name(self, dataset: str, method: str) -> str:
        """The seed phase's own study: its runs never appear in the search's history or best trial."""
        return f"{self.study_name(dataset, method)}/{SEEDS_SUFFIX}"

    def studies(self) -> list[tuple[str, str, str]]:
        return [(self.study_name(d, m), d, m) for d in self.datasets for m in self.methods]

    def load_splits(self, dataset: str):
        """The dataset exactly as every trial of this experiment reads it."""
        return self.recipe(dataset).resolved().load_splits()

    def epochs_for(self, dataset: str) -> int:
        """The trials' epoch budget: the experiment's, else its recipe's for this model (a pretrained small CNN's
        fine-tuning recipe has its own)."""
        return self.run.epochs or recipe(dataset, self.run.model, self.run.pretrained).epochs

    def patience_for(self, dataset: str) -> int:
        return self.run.patience if self.run.patience is not None else default_patience(self.epochs_for(dataset))

    @property
    def selection(self) -> str:
        return self.run.selection

    def selection_text(self) -> str:
        return (f"best epoch by {get_selection(self.selection).text} within a trial, among the method's own epochs "
                f"(not a warm-up); best configuration by the same metric")

    @classmethod
    def from_toml(cls, path: str, **overrides) -> "Experiment":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot read experiment config ({e})") from None
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "name" not in data:
            raise ValueError(f"{path}: no experiment name (name = \"...\" or --experiment)")
        for key in ("datasets", "methods"):
            if isinstance(data.get(key), str):
                data[key] = data[key].split(",")
        missing = [k for k in ("datasets", "methods") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing setting(s) {', '.join(missing)}")
        return cls.from_dict(data, where=f"{path}: ")


def train_space(exp: Experiment, dataset: str) -> dict:
    """Searched for every method, around the dataset's recipe for the experiment's model."""
    d = recipe(dataset, exp.run.model, exp.run.pretrained)
    return {
        "lr": Float(d.lr / 10, d.lr * 10, log=True),
        "weight_decay": Float(1e-5, 1.0, log=True),  # GroupDRO's strong-regularisation recipe uses 1.0
        "batch_size": Choice((max(8, d.batch_size // 2), d.batch_size, d.batch_size * 2)),
    }


def _number(scope: str, name: str, v, integer: bool):
    ok = _is_int(v) if integer else isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"space override {scope}.{name}: bound {v!r} is not {kind}")
    return v


def search_space(exp: Experiment, dataset: str, method: str) -> dict:
    """The searched parameters of (dataset, method): the training ones and the method's, less those the experiment
    fixes, with the experiment's bound overrides."""
    fixed = {n for n in SEARCHED_RUN if getattr(exp.run, n) is not None} | set(exp.params.get(method, {}))
    space = {n: s for n, s in {**train_space(exp, dataset), **get_method(method).space_for(exp.epochs_for(dataset))
                               }.items() if n not in fixed}
    for scope in ("train", method):
        for name, bounds in exp.space.get(scope, {}).items():
            if name not in space:
                raise ValueError(f"space override {scope}.{name}: no such searched parameter "
                                 f"({'fixed by the experiment; ' if name in fixed else ''}has: {', '.join(space)})")
            old = space[name]
            if isinstance(old, Choice):
                if not isinstance(bounds, list) or not bounds or len(set(map(repr, bounds))) != len(bounds):
                    raise ValueError(f"space override {scope}.{name}: expected a non-empty list of distinct "
                                     f"choices, got {bounds!r}")
                space[name] = Choice(tuple(bounds))
            else:
                if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2):
                    raise ValueError(f"space override {scope}.{name}: expected [low, high], got {bounds!r}")
                low, high = (_number(scope, name, v, isinstance(old, Int)) for v in bounds)
                log = getattr(old, "log", False)
                if not low < high or (log and low <= 0):
                    raise ValueError(f"space override {scope}.{name}: invalid bounds [{low}, {high}] "
                                     f"(need low < high{', low > 0 for a log scale' if log else ''})")
                space[name] = Float(float(low), float(high), log) if isinstance(old, Float) else Int(low, high)
    return space


def check_space(space: dict, method: str, epochs: int, params: dict | None = None) -> None:
    """Every value the search can draw must be one the trainer and the method accept: each searched parameter is
    tried at its bounds (each choice) in a real TrainConfig and a real method instance, beside the experiment's fixed
    `params`, before anything is written."""
    cls = get_method(method)
    params = params or {}

    def build(values: dict) -> None:
        cls(cls.Params(**{**params, **values}), TrainSplit(torch.arange(4) % 2, 2, 4, torch.arange(4)))
    # a method's searched integers (warm-ups, stages) at their lowest, so that its defaults fit the epoch budget
    fixed = {**params, **{n: s.low for n, s in space.items()
                          if isinstance(s, Int) and n in {f.name for f in cls.param_fields()}}}
    try:  # the experiment's fixed parameters: known, typed, within the epochs, accepted by the method
        TrainConfig(dataset="synthetic", method=method, epochs=epochs, method_params=fixed).resolved()
        build({})
    except (ValueError, TypeError) as e:
        raise ValueError(f"params.{method}: {params} not accepted ({e})") from None
    for name, spec in space.items():
        for value in spec.choices if isinstance(spec, Choice) else (spec.low, spec.high):
            try:
                if name in SEARCHED_RUN:
                    TrainConfig(dataset="synthetic", method=method, epochs=epochs, method_params=fixed,
                                **{name: value}).resolved()
                else:  # the parameter's declared limits, then the method's own cross-field checks
                    TrainConfig(dataset="synthetic", method=method, epochs=epochs,
                                method_params={**fixed, name: value}).resolved()
                    build({name: value})
            except (ValueError, TypeError) as e:
                raise ValueError(f"search space {method}.{name}: value {value!r} is not accepted ({e})") from None


def reference_params(exp: Experiment, dataset: str, method: str) -> dict:
    """The published recipe as trial parameters (enqueued first), restricted to values inside the space."""
    d = recipe(dataset, exp.run.model, exp.run.pretrained)
    params = dataclasses.asdict(get_method(method).Params(**exp.params.get(method, {})))
    ref = {"lr": d.lr, "weight_decay": d.weight_decay, "batch_size": d.batch_size, **params}
    out = {}
    for name, spec in search_space(exp, dataset, method).items():
        v = ref[name]
        if (isinstance(spec, Choice) and v in spec.choices) or (
                not isinstance(spec, Choice) and spec.low <= v <= spec.high):
            out[name] = v
    return out


def latest_first_own_epoch(exp: Experiment, dataset: str, method: str) -> int:
    """The latest first own epoch the search can draw (integer parameters such as warm-ups at their upper bound)."""
    cls = get_method(method)
    high = {n: s.high for n, s in search_space(exp, dataset, method).items() if isinstance(s, Int)}
    return cls.first_own_epoch(cls.Params(**{**exp.params.get(method, {}), **high}))


def make_pruner(exp: Experiment, dataset: str, method: str) -> optuna.pruners.BasePruner:
    epochs = exp.epochs_for(dataset)
    # Never judged on a warm-up: the earliest prune is at the method's first own epoch.
    start = max(1, epochs // 4, latest_first_own_epoch(exp, dataset, method))
    if exp.pruner == "median":
        # MedianPruner counts only COMPLETE trials; let the first trials and epochs run unpruned.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=start, n_min_trials=3)
    if exp.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(start, epochs // 10), max_resource=epochs,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _stored_settings(storage, name: str, existing: set[str]) -> dict | None:
    """The settings an existing experiment's studies hold, in this version's form (a setting added since: its
    default; run settings written at the top level by an earlier version: in `run`)."""
    for n in own_studies(existing, name):
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(n))
        if isinstance(attrs.get("experiment"), dict):
            return Experiment.from_dict(attrs["experiment"]).settings()
    return None


def _flat(settings: dict) -> dict:
    """The settings that must agree when an experiment is extended, run settings by their own names."""
    return {**{k: v for k, v in settings.items() if k not in ("run", "datasets", "methods", "space", "params")},
            **settings["run"]}


def _extended(exp: Experiment, stored: dict) -> Experiment:
    """`exp` as an addition to the stored experiment: its datasets and methods joined to the stored ones (stored
    first), space overrides and fixed parameters of the new methods added; any other difference is a conflict,
    named in the error."""
    new = exp.settings()
    conflicts = _diff(_flat(stored), _flat(new))
    # the space overrides and fixed parameters of the stored methods the init names (and of "train"), each table
    # parameter by parameter: one given differently, or left out, is a conflict, as a run setting is; a stored
    # method the init does not name keeps its own
    named = {"train", *(set(new["methods"]) & set(stored["methods"]))}
    for key in ("space", "params"):
        scopes = {k for k in new[key] if k == "train" or k in stored["methods"]} | (set(stored[key]) & named)
        for k in sorted(scopes):
            conflicts += [f"{key}.{k}.{c}" for c in _diff(stored[key].get(k, {}), new[key].get(k, {}))]
    if conflicts:
        raise ValueError(f"experiment {exp.name!r} already exists with different settings: {'; '.join(conflicts)} "
                         f"(a new dataset or method is added to it; other settings need a new experiment)")
    merged = {**stored, "datasets": list(dict.fromkeys([*stored["datasets"], *new["datasets"]])),
              "methods": list(dict.fromkeys([*stored["methods"], *new["methods"]])),
              "space": {**stored["space"], **new["space"]}, "params": {**stored["params"], **new["params"]}}
    return Experiment.from_dict(merged)


def init_experiment(storage, exp: Experiment, check_data: bool = True) -> list[str]:
    """Create the experiment's studies (harmless if they exist with the same settings). Returns study names.

    Per (dataset, method): the search study and its seed-phase sibling. An existing experiment gets the datasets
    and methods it lacks (every other setting must agree). Everything is checked before anything is written, so a
    refused init leaves no partial experiment.
    """
    def merged() -> tuple[set[str], Experiment]:
        existing = set(optuna.get_all_study_names(storage))
        stored = _stored_settings(storage, exp.name, existing)
        # an existing experiment: add the datasets and methods it lacks, refuse real conflicts
        return existing, (_extended(exp, stored) if stored is not None else exp)

    if exp.run.weights and not os.path.isabs(exp.run.weights):  # workers start in other folders, on other hosts
        exp = dataclasses.replace(exp, run=dataclasses.replace(exp.run, weights=os.path.abspath(exp.run.weights)))
    if exp.artifacts is None:  # not said: an existing experiment's, else the default for this storage
        stored = _stored_settings(storage, exp.name, set(optuna.get_all_study_names(storage)))
        exp = dataclasses.replace(exp, artifacts=stored["artifacts"] if stored else
                                  default_location(str(storage.engine.url)))
    if exp.keep != "none" or exp.resume_budget > 0:
        check_store(exp.artifacts or "", create=True)  # before anything is written: a store no trial can write
    checked: set[str] = set()

    def check(full: Experiment) -> None:
        for d in full.datasets if check_data else ():  # this machine's files: the data, then the weights
            if d not in checked:
                full.check_weights(d, full.load_splits(d).in_channels)
                checked.add(d)
    check(merged()[1])  # outside the lock: loading data can take minutes
    # Two inits extending one experiment at once would each write its own extension over the other's: read, merge
    # and write under the experiment's lock.
    with named_lock(storage, f"debias-study-init:{exp.name}"):
        existing, full = merged()
        check(full)
        return _create(storage, full, existing)


def _create(storage, exp: Experiment, existing: set[str]) -> list[str]:
    settings = exp.settings()
    ours = {n for s, d, m in exp.studies() for n in (s, exp.seeds_study_name(d, m))}
    half, stale = set(), []  # killed before their settings were written: completed below; extended: updated
    for name in sorted(ours & existing):
        attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
        if "experiment" not in attrs:
            half.add(name)
        elif attrs["experiment"] != settings:
            stale.append(name)
    others = [n for n in own_studies(existing, exp.name) if n not in ours]
    if others:
        raise ValueError(f"experiment {exp.name!r} already exists with different studies: {', '.join(sorted(others))}")
    for name in stale:  # first: until the new studies exist, load_experiment says the init must be run again
        storage.set_study_user_attr(storage.get_study_id_from_name(name), "experiment", settings)
    metric = [exp.selection]  # optuna-dashboard shows the selection metric, not "Objective 0"
    names = []
    for name, dataset, method in exp.studies():
        for study_name, phase in ((name, "search"), (exp.seeds_study_name(dataset, method), "seeds")):
            study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                        load_if_exists=True)
            if study_name not in existing or study_name in half:
                with warnings.catch_warnings():  # marked experimental since Optuna 3.2
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(metric)
                study.set_user_attr("dataset", dataset)
                study.set_user_attr("method", method)
                study.set_user_attr("phase", phase)
                if phase == "search" and not study.get_trials(deepcopy=False):
                    study.enqueue_trial(reference_params(exp, dataset, method), user_attrs=plan(reference=True))
                study.set_user_attr("experiment", settings)  # last: a study with its settings is complete
        names.append(name)
    return names


def load_experiment(storage, name: str, seeds: bool = False):
    """(experiment, search studies in the experiment's order); with seeds=True also {search study name: its
    seed-phase study}."""
    names = set(optuna.get_all_study_names(storage))
    if not own_studies(names, name):
        raise ValueError(f"no experiment named {name!r} in this storage")
    settings = _stored_settings(storage, name, names)
    incomplete = ValueError(f"experiment {name!r} was not completely created (init was interrupted): run the same "
                            "init again to complete it")
    if settings is None:
        raise incomplete
    exp = Experiment.from_dict(settings)
    studies = [optuna.load_study(study_name=s, storage=storage) for s, _, _ in exp.studies() if s in names]
    if any("experiment" not in s.user_attrs for s in studies) or len(studies) < len(exp.studies()):
        raise incomplete
    if not seeds:
        return exp, studies
    sibling = {}
    for s in studies:
        seeds_name = f"{s.study_name}/{SEEDS_SUFFIX}"
        if seeds_name in names:
            sibling[s.study_name] = optuna.load_study(study_name=seeds_name, storage=storage)
    return exp, studies, sibling


def delete_experiment(storage, name: str, yes: bool = False) -> str:
    """Deletes every study of the experiment (search and seed phase) and says what it removed. Finished trials are
    results and running ones are work under way: deleting either needs `yes`."""
    mine = own_studies(optuna.get_all_study_names(storage), name)
    if not mine:
        raise ValueError(f"no experiment named {name!r} in this storage")
    trials = {n: storage.get_all_trials(storage.get_study_id_from_name(n), deepcopy=False) for n in mine}
    n_trials = sum(map(len, trials.values()))
    finished = sum(t.state.is_finished() for ts in trials.values() for t in ts)
    running = sum(t.state == optuna.trial.TrialState.RUNNING for ts in trials.values() for t in ts)
    what = f"{len(mine)} studies, {n_trials} trials ({finished} finished, {running} running)"
    if (finished or running) and not yes:
        raise ValueError(f"experiment {name!r} holds {what}: add --yes to delete them")
    for n in mine:
        optuna.delete_study(study_name=n, storage=storage)
    return f"deleted experiment {name!r}: {what}"
