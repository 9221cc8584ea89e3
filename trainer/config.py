"""The typed configuration of one training run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .data import IMAGE_DATASETS, SCRATCH_MODELS, recipe
from .methods import get_method
from .metrics import get_selection
from .models import MODELS


IMAGE_LOADERS = ("decoded", "pil")
# torch.compile (bench/step_cost.py --compile, ResNet-50 batch 128 on an H200): 23.7 ms instead of 29.2 ms per
# ERM step (0.81x) after a 44 s compile, so it pays back after ~8,000 steps: on by default for CUDA runs of at
# least that many steps (Waterbirds' 300 epochs x 38 steps: on; a 20-epoch CMNIST run: off).
COMPILE_MIN_STEPS = 8000


def default_patience(epochs: int) -> int:
    """Early-stopping patience that scales with the epoch budget: 10 for short runs, a quarter of the budget for
    long ones (Waterbirds' 300 epochs: 75), so a long published recipe is not cut short."""
    return max(10, epochs // 4)


@dataclass
class TrainConfig:
    dataset: str = "cmnist"          # registry name: cmnist, waterbirds, celeba, folder, synthetic
    method: str = "erm"              # registry name: erm, groupdro, fim
    data_dir: str | None = None      # root of an on-disk dataset (official layout)
    model: str | None = None         # cnn, resnet18, resnet50; None = the dataset's default
    pretrained: bool | None = None   # ImageNet weights for ResNets; None = the dataset's default
    weights: str | None = None       # explicit pretrained weights file (overrides torchvision's cache)
    image_size: int | None = None    # crop size of image datasets; None = the dataset's default
    epochs: int | None = None        # maximum epochs; None = the dataset's default
    batch_size: int | None = None
    lr: float | None = None          # SGD learning rate
    weight_decay: float | None = None
    momentum: float = 0.9            # SGD momentum (published recipes use 0.9)
    patience: int | None = None      # stop after this many of the method's own epochs without a better selection
                                     # metric; 0 = never; None = default_patience(epochs), which scales with the budget
    selection: str = "val_wga"       # model-selection metric: val_wga, val_worst_class or val_avg (trainer/metrics.py)
    grad_clip: float | None = None   # max gradient norm for every method alike; 0 = off; None = the dataset's recipe
    seed: int = 0                    # model init, sampling order, augmentation
    data_seed: int = 0               # splits and colours of generated datasets; fixed across training seeds
    train_agreement: float = 0.95    # cmnist: fraction of training samples whose colour agrees with the label
    device: str = "auto"             # auto = cuda when available, else cpu
    num_workers: int = 4             # DataLoader processes of the PIL image loader
    image_loader: str = "decoded"    # decoded: cached uint8 tensors, augmented on the device; pil: per-item PIL
    compile: bool | None = None      # torch.compile the model; None = on for CUDA runs of >= COMPILE_MIN_STEPS
    augment: bool | None = None      # random resized crop + flip of training images; None = the dataset's recipe
    freeze_bn: bool | None = None    # BatchNorm statistics frozen in training (pretrained models); None = the recipe
    deterministic: bool = False      # deterministic algorithms (CUDA): a recorded command reproduces its run exactly
    threads: int | None = None       # torch CPU threads: a CPU run's numbers depend on them; None = torch's choice
    method_params: dict = field(default_factory=dict)  # the method's own hyperparameters (see its Params)

    def resolved(self) -> "TrainConfig":
        """Fill unset fields from the dataset's defaults, validate, and expand method params to all fields."""
        defaults = recipe(self.dataset, self.model, self.pretrained)
        method_cls = get_method(self.method)
        filled = {f.name: getattr(defaults, f.name) for f in fields(defaults)
                  if hasattr(self, f.name) and getattr(self, f.name) is None}
        cfg = replace(self, **filled)
        if cfg.model in SCRATCH_MODELS and cfg.pretrained:
            raise ValueError(f"model {cfg.model!r} has no pretrained weights (use --no-pretrained or a ResNet)")
        if cfg.augment and cfg.dataset not in IMAGE_DATASETS:
            raise ValueError(f"dataset {cfg.dataset!r} has no augmentation (image datasets: "
                             f"{', '.join(IMAGE_DATASETS)})")
        if cfg.freeze_bn and not cfg.pretrained:
            raise ValueError(f"freeze_bn needs a pretrained model: a randomly initialised {cfg.model}'s BatchNorm "
                             "statistics would stay at their initial 0 and 1")
        if cfg.patience is None:
            cfg.patience = default_patience(cfg.epochs)
        get_selection(cfg.selection)
        if cfg.model not in MODELS:
            raise ValueError(f"unknown model {cfg.model!r} (choose from {', '.join(MODELS)})")
        if cfg.threads is not None and cfg.threads < 1:
            raise ValueError(f"threads must be >= 1, got {cfg.threads}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.image_loader not in IMAGE_LOADERS:
            raise ValueError(f"unknown image loader {cfg.image_loader!r} (choose from {', '.join(IMAGE_LOADERS)})")
        if not (cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.patience >= 0 and cfg.grad_clip >= 0):
            raise ValueError(f"need lr > 0, weight_decay >= 0, patience >= 0, grad_clip >= 0; got {cfg.lr}, "
                             f"{cfg.weight_decay}, {cfg.patience}, {cfg.grad_clip}")
        known = {f.name for f in method_cls.param_fields()}
        unknown = set(cfg.method_params) - known
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} for method {cfg.method!r} "
                             f"(has: {', '.join(sorted(known)) or 'none'})")
        cfg.method_params = asdict(method_cls.Params(**cfg.method_params))
        first = method_cls.first_own_epoch(method_cls.Params(**cfg.method_params))
        if first > cfg.epochs:
            raise ValueError(f"method {cfg.method!r} trains its own epochs from epoch {first} (after its warm-up or "
                             f"first stage), but epochs is {cfg.epochs}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)
