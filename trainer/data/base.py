"""Group-annotated datasets: every item is (x, y, a, idx), group id g = y * n_attr + a."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, WeightedRandomSampler


class DataError(ValueError):
    """Malformed or missing data; the message names the file and the problem."""


class GroupDataset(Dataset):
    """One split. Subclasses set `y`, `a` (long tensors) and implement `load(idx)` -> x."""

    y: torch.Tensor
    a: torch.Tensor
    n_classes: int
    n_attr: int
    in_channels: int = 3  # image channels of the model input

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attr

    @property
    def g(self) -> torch.Tensor:
        return self.y * self.n_attr + self.a

    def group_counts(self) -> torch.Tensor:
        return torch.bincount(self.g, minlength=self.n_groups)

    def load(self, idx: int) -> torch.Tensor:
        raise NotImplementedError

    def batch_transform(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None):
        """Batch -> model input, on the batch's device (decoded images augment here; others are ready)."""
        return x

    def __getitem__(self, idx: int):
        return self.load(idx), self.y[idx], self.a[idx], idx


class TensorGroupDataset(GroupDataset):
    """A split held in memory as one tensor: batches are sliced directly, no per-item collation."""

    pin_batches: bool = False  # batches are gathered on the host and pinned one at a time (see on())

    def __init__(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, n_classes: int, n_attr: int):
        self.x, self.y, self.a = x, y.long(), a.long()
        self.n_classes, self.n_attr = n_classes, n_attr
        self.in_channels = x.shape[1]
        self._placed: dict[str, torch.Tensor] = {}

    def load(self, idx: int) -> torch.Tensor:
        return self.x[idx]

    def on(self, device: torch.device, max_fraction: float = 0.25) -> "TensorGroupDataset":
        """A view of this split with x on `device` when it fits in `max_fraction` of the free GPU memory, else
        left where it is (a memory-mapped cache stays shared) with each batch pinned, so that it travels
        asynchronously: a pinned copy of the whole split would be private memory per worker. Placed once, reused
        by later runs."""
        if device.type != "cuda":
            return self
        key = str(device)
        if key not in self._placed:
            free, _ = torch.cuda.mem_get_info(device)
            fits = self.x.numel() * self.x.element_size() <= max_fraction * free
            self._placed[key] = self.x.to(device) if fits else self.x
        view = copy.copy(self)
        view.x = self._placed[key]
        view.pin_batches = view.x.device.type == "cpu"
        view.y, view.a = (self.y, self.a) if view.pin_batches else (self.y.to(device), self.a.to(device))
        return view


@dataclass
class Splits:
    train: GroupDataset
    val: GroupDataset
    test: GroupDataset
    name: str
    checksum: str  # identifies exactly which data was read (for reproducibility records)

    @property
    def n_classes(self) -> int:
        return self.train.n_classes

    @property
    def n_groups(self) -> int:
        return self.train.n_groups

    @property
    def in_channels(self) -> int:
        return self.train.in_channels


class _TensorBatches:
    """Iterates index batches of an in-memory split; same sampling semantics as a DataLoader."""

    def __init__(self, ds: TensorGroupDataset, sampler, batch_size: int):
        self.ds, self.sampler, self.batch_size = ds, sampler, batch_size

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        x, y, a = self.ds.x, self.ds.y, self.ds.a
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(x.device, non_blocking=True)
        for idx in order.split(self.batch_size):
            xb = x[idx]
            yield (xb.pin_memory() if self.ds.pin_batches else xb), y[idx], a[idx], idx


def make_loader(ds: GroupDataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                weights: torch.Tensor | None = None, replacement: bool = True, num_workers: int = 0,
                pin_memory: bool = False):
    """Batches of (x, y, a, idx). `weights` draws a weighted sample of len(ds) with replacement (group balancing);
    with replacement=False every sample of weight > 0 is drawn exactly once, in a random order (a subset)."""
    sampler: Sampler
    if weights is not None:
        n = len(ds) if replacement else int((weights > 0).sum())
        sampler = WeightedRandomSampler(weights.double(), num_samples=n,  # type: ignore[arg-type]  # takes a tensor
                                        replacement=replacement, generator=generator)
    elif shuffle:
        sampler = RandomSampler(ds, generator=generator)
    else:
        sampler = SequentialSampler(ds)
    if isinstance(ds, TensorGroupDataset):
        return _TensorBatches(ds, sampler, batch_size)
    # the loader workers' seeds come from a generator of their own: not from the global stream, which a resumed
    # run (trainer/resume.py) must find where the uninterrupted run had it
    seeds = torch.Generator().manual_seed(generator.initial_seed() if generator is not None else 0)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=seeds)
