"""Dataset registry: name -> (loader, training defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import DataError, GroupDataset, Splits, TensorGroupDataset, make_loader
from .cmnist import load_cmnist
from .images import load_celeba, load_folder, load_waterbirds
from .synthetic import load_synthetic


@dataclass(frozen=True)
class DatasetDefaults:
    """Per-dataset recipe used where the user sets nothing."""
    model: str
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    image_size: int
    pretrained: bool
    grad_clip: float  # max gradient norm (0 = off), the same for every method


DATASETS = {
    # name: (loader, defaults)
    # cmnist: IRM's 2 x 14 x 14 form and an 8-16-32 CNN (README: benchmark); clips at 5 for every method, as the
    # Fisher method's last-layer scope trained stably only with it
    "cmnist": (load_cmnist, DatasetDefaults("cnn_narrow", 20, 0.01, 1e-4, 64, 14, False, 5.0)),
    "synthetic": (load_synthetic, DatasetDefaults("cnn", 3, 0.05, 1e-4, 32, 16, False, 5.0)),
    # Sagawa et al. 2020 (GroupDRO) recipe: ResNet-50, SGD momentum 0.9, batch 128, no clipping.
    "waterbirds": (load_waterbirds, DatasetDefaults("resnet50", 300, 1e-3, 1e-4, 128, 224, True, 0.0)),
    "celeba": (load_celeba, DatasetDefaults("resnet50", 50, 1e-4, 1e-4, 128, 224, True, 0.0)),
    "folder": (load_folder, DatasetDefaults("resnet50", 50, 1e-3, 1e-4, 64, 224, True, 0.0)),
}


def get_dataset(name: str):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    return DATASETS[name]


def load_splits(name: str, **kwargs) -> Splits:
    return get_dataset(name)[0](**kwargs)


__all__ = ["DATASETS", "DataError", "DatasetDefaults", "GroupDataset", "Splits", "TensorGroupDataset",
           "get_dataset", "load_splits", "make_loader"]
