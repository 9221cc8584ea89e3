"""Classifiers split into a feature backbone and a linear head (the Fisher trace needs the features)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

MODELS = ("cnn", "cnn_narrow", "cnn_stem", "resnet18", "resnet50")
CNN_WIDTHS = {"cnn": (32, 64, 128), "cnn_narrow": (8, 16, 32), "cnn_stem": (16, 32, 64)}
STRIDED_STEM = ("cnn_stem",)  # first convolution 5 x 5 with stride 2: 64-px inputs at a 28-px input's cost


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: AdaptiveAvgPool2d(1)'s value, but its CUDA backward is deterministic
    (AdaptiveAvgPool2d's is refused under torch.use_deterministic_algorithms)."""

    def __init__(self, flatten: bool = True):
        super().__init__()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=not self.flatten)


class Classifier(nn.Module):
    """`freeze_bn`: BatchNorm layers stay in eval mode (running statistics fixed, affine weights still trained) even
    while the model trains — SubpopBench's pretrained-ResNet convention; group_DRO, JTT and DFR train them."""

    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int, freeze_bn: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(n_features, n_classes)
        self.freeze_bn = freeze_bn

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = self.backbone(x)
        logits = self.head(h)
        return (logits, h) if return_features else logits


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """Forwards inside change no buffer (BatchNorm running statistics): they are restored on exit."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def small_cnn(in_channels: int = 3, widths: tuple[int, int, int] = CNN_WIDTHS["cnn"],
              stem: bool = False) -> tuple[nn.Module, int]:
    """A small CNN for small inputs (any size works thanks to the global pooling). `cnn_narrow` (8-16-32) is the
    cmnist default: with less capacity for the digit's shape, ERM keeps the colour shortcut. `stem`: the first
    convolution is 5 x 5 with stride 2 (`cnn_stem`, texdigits' default at 64 px): a receptive field of 34 px, the
    size of an object there, where the plain 3 x 3 stack sees 18 px and learned no object in a probe (test average
    49%, chance)."""
    def block(cin, cout, k=3, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))
    a, b, c = widths
    first = block(in_channels, a, 5, 2) if stem else block(in_channels, a)
    body = nn.Sequential(first, nn.MaxPool2d(2), block(a, b), nn.MaxPool2d(2), block(b, c), GlobalAvgPool())
    return body, c


MAX_WEIGHTS_BYTES = 2 * 2**30


def pretrained_weights_path(arch: str, weights_path: str | None) -> Path:
    """The file of --weights, else of torchvision's local cache; ValueError (with the fix) when there is none."""
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise ValueError(f"--weights {weights_path}: file not found")
        return path
    import torchvision  # its import costs ~2 s: only ResNets pay it
    enum = torchvision.models.get_model_weights(arch)
    names = [Path(w.url).name for w in (enum.IMAGENET1K_V1, getattr(enum, "IMAGENET1K_V2", None)) if w]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    found = [cache / n for n in names if (cache / n).is_file()]
    if not found:
        raise ValueError(f"pretrained {arch} weights not found: copy {names[0]} into {cache}/ or pass "
                         f"--weights PATH (or --no-pretrained to train from random init)")
    return found[0]


def _pretrained_state(arch: str, weights_path: str | None) -> dict:
    """Weights from --weights, else torchvision's local cache; never a silent random init."""
    return read_weights(pretrained_weights_path(arch, weights_path))


def read_weights(path: Path) -> dict:
    """A backbone's named tensors from a weights file: a state dict (or {"state_dict": ...}) of a torchvision ResNet
    or of this project's Classifier; the head's ("fc.", "head.") dropped, "module." and "backbone." prefixes too."""
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:  # ResNet-50's ImageNet file is 98 MB; a huge (or sparse) file is not weights
        raise ValueError(f"--weights {path}: {size / 2**30:.1f} GiB, larger than any weights file of these models "
                         f"({MAX_WEIGHTS_BYTES // 2**30} GiB)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--weights {path}: cannot load ({why})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise ValueError(f"--weights {path}: holds a {type(state).__name__}, not a state dict of named tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith(("fc.", "head."))}


def _load_backbone(backbone: nn.Module, state: dict, name: str, allowed_missing: tuple[str, ...] = ()) -> None:
    """`state` into `backbone`, or ValueError naming what does not match (never a partly random backbone)."""
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"weights for {name} do not match the architecture "
                         f"({str(e).splitlines()[1].strip()})") from None
    if unexpected or [k for k in missing if not any(k.startswith(p) for p in allowed_missing)]:
        raise ValueError(f"weights for {name} do not match the architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def build_model(name: str, n_classes: int, pretrained: bool = False, weights_path: str | None = None,
                in_channels: int = 3, freeze_bn: bool = False,
                source: tuple[str, int | None] | None = None) -> Classifier:
    """`source`: (dataset, image size) whose offline backbone a pretrained small CNN starts from
    (trainer/backbones.py); a `weights_path` takes its place."""
    if name in CNN_WIDTHS:
        backbone, dim = small_cnn(in_channels, CNN_WIDTHS[name], stem=name in STRIDED_STEM)
        if weights_path:
            _load_backbone(backbone, read_weights(pretrained_weights_path(name, weights_path)), name)
        elif pretrained:
            from .backbones import pretrained_backbone
            if source is None or source[1] is None:
                raise ValueError(f"a pretrained {name} needs the dataset and image size its backbone is drawn for")
            _load_backbone(backbone, pretrained_backbone(source[0], name, in_channels, source[1]), name)
    elif name in ("resnet18", "resnet50"):
        if in_channels != 3:
            raise ValueError(f"{name} takes 3-channel images, the data has {in_channels} channels")
        import torchvision
        backbone = getattr(torchvision.models, name)(weights=None)
        if pretrained or weights_path:
            _load_backbone(backbone, _pretrained_state(name, weights_path), name, ("fc.",))
        dim = backbone.fc.in_features
        backbone.fc, backbone.avgpool = nn.Identity(), GlobalAvgPool(flatten=False)
    else:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    return Classifier(backbone, dim, n_classes, freeze_bn)
