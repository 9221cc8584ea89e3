"""Balanced loss reweighting (SubpopBench's ReWeight): cross-entropy weighted per sample by w = N / (K n_k), K the
number of non-empty groups (`reweight`) or classes (`reweight_class`, which reads no group label), n_k the
training count of the sample's group or class. Every group then carries the same total weight, and the mean weight
over the training set is 1, so the loss's scale — hence the effective learning rate — matches ERM's on average.
(SubpopBench normalises the mean over groups to 1 instead, which raises the effective learning rate with the
imbalance.) Uniform shuffling; the batch loss is the plain mean of w_i l_i."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .base import Card, Method


def balanced_weights(keys: torch.Tensor) -> torch.Tensor:
    """Per sample: N / (K n_k) — equal total weight per key, mean 1 over the samples."""
    counts = torch.bincount(keys)
    k = int((counts > 0).sum())
    return len(keys) / (k * counts[keys].float())


class Reweight(Method):
    group_labels = "train"
    card = Card("ReWeight", "rebalancing", "Yang et al., ICML 2023 (SubpopBench)", order=32)
    weight: torch.Tensor

    def __init__(self, params, train, **kw):
        super().__init__(params, train, **kw)
        self.register_buffer("weight", balanced_weights(self.keys()), persistent=False)

    def keys(self) -> torch.Tensor:
        return self.train_group_ids

    def loss(self, logits, h, batch):
        ce = F.cross_entropy(logits, batch.y, reduction="none")
        return (self.weight[batch.idx] * ce).mean(), {"nll": ce.mean()}


class ReweightClass(Reweight):
    group_labels = "none"
    card = dataclasses.replace(Reweight.card, label="ReWeight (class)", order=33)

    def keys(self):
        return self.train_labels
