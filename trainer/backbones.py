"""Backbones pretrained offline for the bundled benchmarks' small CNNs: the paper's regime (a pretrained network
fine-tuned at a small learning rate, as ResNet-50 from ImageNet on Waterbirds) where no ImageNet weights exist.

The source is disjoint from every split of both benchmarks and carries none of their labels or attributes: the
1,797 8 x 8 handwritten digits of the UCI Optical Recognition of Handwritten Digits data (Alpaydin & Kaynak 1998,
43 writers; CC BY 4.0), bundled with scikit-learn — not MNIST, whose digits cmnist and texdigits are drawn from.
The task is the source's own: which of the ten digits. Each digit is drawn several times in the benchmark's input
form, its colour and background independent of the digit (as ImageNet's birds are seen on every background):
- `cmnist` (2 channels): the digit in one colour channel chosen at random, at MNIST's 20-of-28 scale, at a random
  place;
- `texdigits` (3 channels): a coloured digit, as texdigits draws them, on a crop of one of six photographs bundled
  with scikit-image that texdigits does not use (brick, camera, coffee, chelsea: CC0; astronaut, rocket: public
  domain), in a random tint at a random contrast — never grass or gravel, texdigits' two backgrounds.
The backbone (the head is dropped: a fine-tuned model gets a new one) is built deterministically on first use (one
CPU thread, fixed seeds) and cached in DEBIAS_CACHE_DIR like the datasets; its held-out accuracy on the source and
the sha256 of its weights are said when it is built. A user's own backbone: `--weights FILE`.
"""
from __future__ import annotations

import hashlib
import io
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import sha256
from .data.cache import cache_dir, load_verified, save_verified
from .data.texdigits import _colours, render, shift_batch

VERSION = "1"  # bump when the source or the training changes: older cache files are then ignored
SOURCE = ("UCI Optical Recognition of Handwritten Digits (1,797 8 x 8 digits, 43 writers; CC BY 4.0), bundled with "
          "scikit-learn")
PHOTOS = ("brick", "camera", "coffee", "chelsea", "astronaut", "rocket")  # scikit-image's; none is texdigits'
COPIES = 4          # renders of each source digit
HELD_OUT = 0.1      # share of the source digits kept out of training: the backbone's accuracy is measured on them
EPOCHS, LR, BATCH, WEIGHT_DECAY = 15, 0.05, 64, 5e-4  # FAMILY_LR's from-scratch rate; SGD momentum 0.9
SHIFT = 0.1         # random shifts of the training batches, as texdigits' augmentation
SEED = 0


def _source_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.from_numpy(d.images.astype(np.float32) / 16.0), torch.from_numpy(d.target.astype(np.int64))


def _in_channels(digits: torch.Tensor, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """cmnist's form: each digit in one colour channel chosen at random, 20/28 of the side, at a random place."""
    side = max(2, round(size * 20 / 28))
    small = F.interpolate(digits[:, None], size=(side, side), mode="bilinear", antialias=True,
                          align_corners=False)[:, 0].clamp(0, 1)
    x = torch.zeros(len(digits), channels, size, size)
    for i, d in enumerate(small):
        c = int(torch.randint(channels, (), generator=gen))
        top, left = (int(torch.randint(size - side + 1, (), generator=gen)) for _ in range(2))
        x[i, c, top:top + side, left:left + side] = d
    return x


def _on_photos(digits: torch.Tensor, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """texdigits' form: coloured digits on tinted crops of photographs that are not texdigits' backgrounds."""
    if channels != 3:
        raise ValueError(f"texdigits' source draws 3-channel images, the data has {channels}")
    from skimage import color
    from skimage import data as skdata
    photos = []
    for name in PHOTOS:
        img = getattr(skdata, name)()
        img = color.rgb2gray(img[..., :3]) if img.ndim == 3 else img.astype(np.float32) / 255.0
        photos.append(torch.from_numpy(np.asarray(img, dtype=np.float32)))
    colours, tints = _colours(len(digits), gen), 0.25 + 0.5 * torch.rand(len(digits), 3, generator=gen)
    out = []
    for d, colour, tint in zip(digits, colours, tints):
        photo = photos[int(torch.randint(len(photos), (), generator=gen))]
        contrast = 0.15 + 0.85 * float(torch.rand((), generator=gen))
        out.append(render(d, photo, (0.0, 1.0), colour, size, gen, tint, contrast))
    return torch.stack(out)


DRAW = {"cmnist": _in_channels, "texdigits": _on_photos}  # the benchmarks with a source drawn in their form


def source(dataset: str, channels: int, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "held_out"}: (images, digit labels), drawn in `dataset`'s form from the source and the seed alone."""
    digits, labels = _source_digits()
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(labels), generator=gen)
    cut = int(round(HELD_OUT * len(labels)))
    parts = {"held_out": (order[:cut], 1), "train": (order[cut:], COPIES)}
    return {name: (DRAW[dataset](digits[idx].repeat(k, 1, 1), channels, size, gen), labels[idx].repeat(k))
            for name, (idx, k) in parts.items()}


def train_backbone(dataset: str, model: str, channels: int, size: int) -> tuple[dict, float]:
    """(the backbone's state dict, its held-out accuracy on the source): a classifier of the ten digits, trained on
    one thread with fixed seeds, so that every host of one torch build draws the same weights."""
    from .models import build_model
    data = source(dataset, channels, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        net = build_model(model, 10, in_channels=channels)
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
        x, y = data["train"]
        gen = torch.Generator().manual_seed(SEED)
        net.train()
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(y), generator=gen).split(BATCH):
                loss = F.cross_entropy(net(shift_batch(x[idx], SHIFT, gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        hx, hy = data["held_out"]
        with torch.no_grad():
            accuracy = float((net(hx).argmax(1) == hy).float().mean())
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}, accuracy


def _check(stored) -> None:
    state, acc = stored.get("state"), stored.get("held_out_accuracy")
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
            and isinstance(acc, float)):
        raise ValueError("holds no backbone state")


def digest(state: dict) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    return sha256(buf.getvalue())


def pretrained_backbone(dataset: str, model: str, channels: int, size: int) -> dict:
    """The cached backbone of `model` for `dataset`'s inputs (channels x size x size), built on first use."""
    if dataset not in DRAW:
        raise ValueError(f"model {model!r} has pretrained weights only for {', '.join(DRAW)} (built offline: "
                         f"docs/trainer.md); use --no-pretrained, a ResNet, or --weights FILE")
    key = f"backbone {VERSION}:{dataset}:{model}:{channels}:{size}"
    path = cache_dir() / "backbones" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    stored = load_verified(path, key, _check)
    if stored is None:
        start = time.perf_counter()
        state, acc = train_backbone(dataset, model, channels, size)
        stored = {"state": state, "held_out_accuracy": acc}
        save_verified(stored, path, key)  # several workers may build it at once: each writes the same weights
        print(f"pretrained {model} for {dataset} on {SOURCE}: held-out accuracy {100 * acc:.1f}%, sha256 "
              f"{digest(state)[:16]}, built in {time.perf_counter() - start:.0f} s, cached in {path}",
              file=sys.stderr, flush=True)
    return stored["state"]
