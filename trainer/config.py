"""The typed configuration of one training run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .data import BACKBONE_DATASETS, DATASETS, IMAGE_DATASETS, SCRATCH_MODELS, load_splits, recipe
from .methods import METHODS, get_method
from .metrics import SELECTIONS
from .models import MODELS
from .settings import check, param


IMAGE_LOADERS = ("decoded", "pil")
# torch.compile (bench/step_cost.py --compile, ResNet-50 batch 128 on an H200): 23.7 ms instead of 29.2 ms per
# ERM step (0.81x) after a 44 s compile, so it pays back after ~8,000 steps: on by default for CUDA runs of at
# least that many steps (Waterbirds' 300 epochs x 38 steps: on; a 20-epoch CMNIST run: off).
COMPILE_MIN_STEPS = 8000


PATIENCE_RULE = "max(10, epochs // 4)"  # default_patience in words: the help and the report's caption


def default_patience(epochs: int) -> int:
    """Early-stopping patience that scales with the epoch budget: 10 for short runs, a quarter of the budget for
    long ones (Waterbirds' 300 epochs: 75), so a long published recipe is not cut short."""
    return max(10, epochs // 4)


SEED_MAX = 2**31 - 1  # Optuna and numpy take seeds below 2**32; a study stores them as signed 32-bit integers
TRIAL = "trial"  # the settings a study sets per trial (searched or the study's) or per worker: not an experiment's


@dataclass
class TrainConfig:
    """Every setting of one run. Each field's metadata (help, choices, limits) makes the trainer's flags, the
    study's `init` flags, and the checks of a value from any of them, a TOML file or a stored study."""
    dataset: str = param("cmnist", "dataset", choices=DATASETS, scope=TRIAL)
    method: str = param("erm", "debiasing method", choices=METHODS, scope=TRIAL)
    data_dir: str | None = param(None, "root of an on-disk dataset in its official layout")
    model: str | None = param(None, "architecture (default: the dataset's)", choices=tuple(MODELS))
    pretrained: bool | None = param(None, "start from pretrained weights: ResNets from ImageNet's, the small CNNs on "
                                    "cmnist and texdigits from a backbone pretrained offline (default: the dataset's)")
    weights: str | None = param(None, "pretrained weights file (else torchvision's local cache; the small CNNs': "
                                "the offline backbone)")
    image_size: int | None = param(None, "crop size of image datasets (default: the dataset's)", low=1)
    epochs: int | None = param(None, "maximum epochs (default: the dataset's)", low=1)
    batch_size: int | None = param(None, "batch size (default: the dataset's; searched by a study)", low=1)
    lr: float | None = param(None, "SGD learning rate (default: the dataset's; searched by a study)", low=0.0)
    weight_decay: float | None = param(None, "weight decay (default: the dataset's; searched by a study)", low=0.0)
    momentum: float = param(0.9, "SGD momentum (published recipes use 0.9)", low=0.0)
    patience: int | None = param(None, "early stopping after this many of the method's own epochs without a better "
                                 f"selection metric; 0 = never (default: {PATIENCE_RULE})", low=0)
    selection: str = param("val_wga", "model-selection metric: val_wga (reads val group labels), val_worst_class or "
                           "val_avg (no group label)", choices=tuple(SELECTIONS))
    grad_clip: float | None = param(None, "max gradient norm for every method alike, 0 = off (default: the dataset's)",
                                    low=0.0)
    seed: int = param(0, "training seed: model init, sampling order, augmentation (a study: of its searched "
                      "trials; the seed phase adds seed+1, ...)", low=0, high=SEED_MAX)
    data_seed: int = param(0, "seed of generated splits and colours (cmnist, texdigits): fixed across training "
                           "seeds", low=0, high=SEED_MAX)
    train_agreement: float = param(0.95, "cmnist: fraction of training samples whose colour agrees with the label",
                                   low=0.0, high=1.0)
    device: str = param("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N", scope=TRIAL)
    num_workers: int = param(4, "DataLoader processes of the PIL image loader", low=0)
    image_loader: str = param("decoded", "decoded: images decoded once, cached, augmented on the device; pil: "
                              "per-item PIL", choices=IMAGE_LOADERS)
    compile: bool | None = param(None, f"torch.compile the model (default: on for CUDA runs of >= "
                                 f"{COMPILE_MIN_STEPS} steps)")
    augment: bool | None = param(None, "random resized crop + flip of training images (default: the dataset's)")
    freeze_bn: bool | None = param(None, "keep BatchNorm statistics frozen while training a pretrained model "
                                   "(default: the dataset's)")
    deterministic: bool = param(False, "deterministic CUDA algorithms, so that the recorded command reproduces the "
                                "run exactly")
    threads: int | None = param(None, "torch CPU threads: a CPU run's numbers depend on them (default: torch's "
                                "choice)", low=1, scope=TRIAL)
    method_params: dict = field(default_factory=dict, metadata={"scope": TRIAL})  # the method's (see its Params)

    @classmethod
    def settings(cls, scope: str | None = None) -> list:
        """The fields that are settings (flags), all or those of one scope: TRIAL, or "experiment" for the rest."""
        out = [f for f in fields(cls) if "help" in f.metadata]
        if scope is None:
            return out
        return [f for f in out if f.metadata.get("scope", "experiment") == scope]

    def resolved(self) -> "TrainConfig":
        """Fill unset fields from the dataset's defaults, validate, and expand method params to all fields."""
        # types, choices and limits of every setting, from its metadata
        given = replace(self, **{f.name: check(f, getattr(self, f.name)) for f in self.settings()})
        if not isinstance(given.method_params, dict):
            raise ValueError(f"method_params must be a table of the method's parameters, got {given.method_params!r}")
        defaults = recipe(given.dataset, given.model, given.pretrained)
        method_cls = get_method(given.method)
        filled = {f.name: getattr(defaults, f.name) for f in fields(defaults)
                  if hasattr(given, f.name) and getattr(given, f.name) is None}
        cfg = replace(given, **filled)
        if cfg.model in SCRATCH_MODELS and cfg.pretrained and cfg.dataset not in BACKBONE_DATASETS and not cfg.weights:
            raise ValueError(f"model {cfg.model!r} has pretrained weights only for {', '.join(BACKBONE_DATASETS)} "
                             f"(use --no-pretrained, a ResNet, or --weights FILE)")
        if cfg.augment and cfg.dataset not in IMAGE_DATASETS:
            raise ValueError(f"dataset {cfg.dataset!r} has no augmentation (image datasets: "
                             f"{', '.join(IMAGE_DATASETS)})")
        if cfg.freeze_bn and not cfg.pretrained:
            raise ValueError(f"freeze_bn needs a pretrained model: a randomly initialised {cfg.model}'s BatchNorm "
                             "statistics would stay at their initial 0 and 1")
        assert cfg.epochs is not None  # every recipe sets it
        if cfg.patience is None:
            cfg.patience = default_patience(cfg.epochs)
        if cfg.lr is None or not cfg.lr > 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr}")
        known = {f.name for f in method_cls.param_fields()}
        unknown = set(cfg.method_params) - known
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} for method {cfg.method!r} "
                             f"(has: {', '.join(sorted(known)) or 'none'})")
        given_params = {f.name: check(f, cfg.method_params[f.name], f"{cfg.method}.")
                        for f in method_cls.param_fields() if f.name in cfg.method_params}
        cfg.method_params = asdict(method_cls.Params(**given_params))
        first = method_cls.first_own_epoch(method_cls.Params(**cfg.method_params))
        if first > cfg.epochs:
            raise ValueError(f"method {cfg.method!r} trains its own epochs from epoch {first} (after its warm-up or "
                             f"first stage), but epochs is {cfg.epochs}")
        return cfg

    def warning(self) -> str | None:
        """What this (resolved) run should say before it starts (its method's recipe_warning), or None."""
        assert self.lr is not None and self.grad_clip is not None
        return get_method(self.method).recipe_warning({k: (v,) for k, v in self.method_params.items()}, self.lr,
                                                      self.grad_clip)

    def load_splits(self):
        """The dataset as this (resolved) run reads it."""
        return load_splits(self.dataset, data_dir=self.data_dir, image_size=self.image_size, data_seed=self.data_seed,
                           train_agreement=self.train_agreement, decoded=self.image_loader == "decoded",
                           augment=self.augment)

    def to_dict(self) -> dict:
        return asdict(self)
