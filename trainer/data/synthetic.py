"""A tiny synthetic spurious-correlation set (random textures + a coloured patch) for fast smoke tests."""
from __future__ import annotations

import hashlib

import torch

from .base import Splits, TensorGroupDataset


def load_synthetic(data_seed: int = 0, train_agreement: float = 0.9, **_) -> Splits:
    gen = torch.Generator().manual_seed(data_seed)
    splits, h = {}, hashlib.sha256()
    for name, n, agree_p in (("train", 256, train_agreement), ("val", 128, 0.5), ("test", 128, 0.5)):
        y = torch.randint(0, 2, (n,), generator=gen)
        a = torch.where(torch.rand(n, generator=gen) < agree_p, y, 1 - y)
        x = 0.3 * torch.rand(n, 3, 16, 16, generator=gen)
        x[:, 2, 4:12, 4:12] += y.view(-1, 1, 1).float() * 0.4  # weak core signal
        x[torch.arange(n), a, :4, :4] += 1.0  # strong spurious patch
        splits[name] = TensorGroupDataset(x, y, a, n_classes=2, n_attr=2)
        h.update(x.numpy().tobytes())
    return Splits(**splits, name="synthetic", checksum=h.hexdigest()[:16])
