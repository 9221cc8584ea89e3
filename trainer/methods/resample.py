"""Balanced resampling (SubpopBench's ReSample, BalancingGroups' rwg / rwy): ERM on batches drawn with replacement
with probability proportional to 1 / n_g of each sample's group (`resample`) or 1 / n_y of its class
(`resample_class`, which reads no group label), N draws per epoch."""
from __future__ import annotations

import dataclasses

import torch

from .base import Card, Method


def inverse_frequency(keys: torch.Tensor) -> torch.Tensor:
    """Per sample: 1 / (number of training samples sharing its key)."""
    return 1.0 / torch.bincount(keys)[keys].float()


class Resample(Method):
    group_labels = "train"
    card = Card("ReSample", "rebalancing", "Idrissi et al., CLeaR 2022; Yang et al., ICML 2023 (SubpopBench)",
                order=30)

    def keys(self) -> torch.Tensor:
        """What is balanced: the group of each training sample."""
        return self.train_group_ids

    def sampling_weights(self):
        return inverse_frequency(self.keys())


class ResampleClass(Resample):
    group_labels = "none"
    card = dataclasses.replace(Resample.card, label="ReSample (class)", order=31)

    def keys(self):
        return self.train_labels
