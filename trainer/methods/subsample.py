"""Balanced subsampling (BalancingGroups' subg / suby): every group (`subsample`) or class (`subsample_class`, which
reads no group label) is cut to the size of the smallest one; each epoch is that subset, reshuffled. The subset is
drawn once per run from the training seed and kept for every epoch, as BalancingGroups does (a fixed permutation),
so an epoch is K x min_k n_k samples: on Waterbirds 4 x 56 = 224 images — give it many epochs."""
from __future__ import annotations

import dataclasses

import torch

from .base import Card, Method


def balanced_subset(keys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask keeping min_k n_k random samples of every key present."""
    counts = torch.bincount(keys)
    smallest = int(counts[counts > 0].min())
    keep = torch.zeros(len(keys))
    for k in torch.nonzero(counts).flatten().tolist():
        members = torch.nonzero(keys.cpu() == k).flatten()
        keep[members[torch.randperm(len(members), generator=generator)[:smallest]]] = 1.0
    return keep


class Subsample(Method):
    group_labels = "train"
    card = Card("Subsample", "rebalancing", "Idrissi et al., CLeaR 2022 (BalancingGroups)", order=34)
    replacement = False  # each kept sample once per epoch

    def __init__(self, params, train, **kw):
        super().__init__(params, train, **kw)
        self.mask = None

    def keys(self) -> torch.Tensor:
        return self.train_group_ids

    def setup(self, ctx):
        # drawn from the global generator, which the loop seeds with the training seed before setup
        self.mask = balanced_subset(self.keys(), torch.Generator().manual_seed(int(torch.randint(2**31, ()))))

    def sampling_weights(self):
        return self.mask


class SubsampleClass(Subsample):
    group_labels = "none"
    card = dataclasses.replace(Subsample.card, label="Subsample (class)", order=35)

    def keys(self):
        return self.train_labels
