"""Dataset registry: name -> (loader, training defaults)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .base import DataError, GroupDataset, Splits, TensorGroupDataset, make_loader
from .cmnist import load_cmnist
from .images import load_celeba, load_folder, load_waterbirds
from .synthetic import load_synthetic
from .texdigits import load_texdigits


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
    augment: bool     # random resized crop + flip of training images (image datasets only)
    freeze_bn: bool   # BatchNorm statistics frozen while training (pretrained models only)
    source: str = ""  # where the recipe comes from (the recipe table of docs/trainer.md)
    finetune: tuple[float, int] | None = None  # (lr, epochs) of its small CNN from a backbone of trainer/backbones.py


# A model trained from scratch needs a learning rate two orders above fine-tuning a pretrained one: on a held-out
# folder benchmark (1,000 small images, `cnn`) the pretrained recipe's 1e-3 left ERM at 0% worst-group accuracy in
# every trial, lr 0.05 reached 73%. A recipe is published for a dataset's own model; the other kind of model gets
# these learning rates instead (and the search range around them).
FAMILY_LR = {"scratch": 0.05, "pretrained": 1e-3}
SCRATCH_MODELS = ("cnn", "cnn_narrow", "cnn_stem")  # no ImageNet weights: pretrained offline for BACKBONE_DATASETS
BACKBONE_DATASETS = ("cmnist", "texdigits")  # trainer/backbones.py draws its source in their form (its DRAW)
# Fine-tuning a backbone of trainer/backbones.py: Waterbirds' published rate (1e-3, Sagawa et al. 2020) and 30 epochs,
# about 1,400 steps on cmnist; fixed before any run of the regime, never searched on its test split.
FINETUNE = (1e-3, 30)
IMAGE_DATASETS = ("waterbirds", "celeba", "folder", "texdigits")  # the ones with an augmentation (texdigits: shifts)

SAGAWA = "Sagawa et al. 2020 (group_DRO): SGD momentum 0.9, no augmentation, BatchNorm trained"

DATASETS = {
    # name: (loader, defaults)
    # cmnist: IRM's colour digits at 2 x 7 x 7 (there the shape predicts the label less well than the colour) and an
    # 8-16-32 CNN (bench/README.md: methods on cmnist); clips at 5 for every method, as the Fisher method's
    # last-layer scope trained stably only with it
    "cmnist": (load_cmnist, DatasetDefaults("cnn_narrow", 20, 0.01, 1e-4, 64, 7, False, 5.0, False, False,
                                            "ours (bench/README.md); IRM's construction has no augmentation",
                                            FINETUNE)),
    # texdigits: Waterbirds-shaped, digits on textures at 64 x 64 (trainer/data/texdigits.py); a strided stem gives
    # the small CNN an object-sized receptive field at a 28-px input's cost; lr 0.05, FAMILY_LR's scratch rate;
    # random shifts of the training batches (GroupDRO 71-73% worst-group with them, 52-55% without, 2 seeds)
    "texdigits": (load_texdigits, DatasetDefaults("cnn_stem", 20, 0.05, 1e-4, 64, 64, False, 5.0, True, False,
                                                  "ours (docs/datasets.md)", FINETUNE)),
    "synthetic": (load_synthetic, DatasetDefaults("cnn", 3, 0.05, 1e-4, 32, 16, False, 5.0, False, False, "ours")),
    # Sagawa et al. 2020 (GroupDRO) recipe: ResNet-50, SGD momentum 0.9, batch 128, no clipping; their commands have
    # no --augment_data (SubpopBench also trains both without augmentation, but freezes BatchNorm).
    "waterbirds": (load_waterbirds, DatasetDefaults("resnet50", 300, 1e-3, 1e-4, 128, 224, True, 0.0, False, False,
                                                    SAGAWA)),
    "celeba": (load_celeba, DatasetDefaults("resnet50", 50, 1e-4, 1e-4, 128, 224, True, 0.0, False, False, SAGAWA)),
    # users' own data: no published recipe; crop + flip for small from-scratch or fine-tuned sets
    "folder": (load_folder, DatasetDefaults("resnet50", 50, 1e-3, 1e-4, 64, 224, True, 0.0, True, False, "ours")),
}


def get_dataset(name: str):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    return DATASETS[name]


def is_pretrained(model: str, pretrained: bool, dataset: str | None = None) -> bool:
    return pretrained and (model not in SCRATCH_MODELS or dataset in BACKBONE_DATASETS)


def recipe(name: str, model: str | None = None, pretrained: bool | None = None) -> DatasetDefaults:
    """The dataset's recipe for this model (None = the dataset's own): the published one when the model is of the
    recipe's kind (pretrained or from scratch); a small CNN from its offline backbone: the dataset's `finetune` rate
    and epochs; else with the learning rate of the model's kind (FAMILY_LR)."""
    d = get_dataset(name)[1]
    model = model or d.model
    pretrained = is_pretrained(model, d.pretrained if pretrained is None else pretrained, name)
    out = replace(d, model=model, pretrained=pretrained)
    if pretrained and model in SCRATCH_MODELS and d.finetune:
        lr, epochs = d.finetune
        return replace(out, lr=lr, epochs=epochs, source=f"{d.source}; fine-tuning an offline backbone: ours "
                       "(trainer/backbones.py)")
    if pretrained != is_pretrained(d.model, d.pretrained, name):
        kind = "pretrained" if pretrained else "scratch"
        out = replace(out, lr=FAMILY_LR[kind], freeze_bn=d.freeze_bn and pretrained,
                      source=f"{d.source}; lr of a {'pretrained' if pretrained else 'from-scratch'} model: ours")
    return out


def load_splits(name: str, **kwargs) -> Splits:
    return get_dataset(name)[0](**kwargs)


__all__ = ["BACKBONE_DATASETS", "DATASETS", "DataError", "DatasetDefaults", "GroupDataset", "IMAGE_DATASETS",
           "SCRATCH_MODELS", "Splits",
           "TensorGroupDataset", "get_dataset", "is_pretrained", "load_splits", "make_loader", "recipe"]
