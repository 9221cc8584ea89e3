"""Just Train Twice (Liu et al., 2021).

Stage 1: ERM for `stage1_epochs` (T) epochs. The error set E = the training samples the stage-1 model gets wrong,
read in one pass over the training set as evaluation sees it (eval mode, no augmentation) after epoch T. (The
original reads the training pass of epoch T — train mode, augmented, each batch before its own update — because it
is free; that is a mix of T's moving in-epoch models and random crops. Ours is the stage-1 model's own errors, at
the cost of one forward pass over the training set.)
Stage 2: a fresh model and optimiser (the loop re-initialises both), trained on batches drawn with replacement in
which every error is `up` times as likely as any other sample (BalancingGroups' `up` copies per error; N draws per
epoch, where the original's duplication lengthens the epoch to N + (up - 1)|E|). Model selection, early stopping
and pruning see stage-2 epochs only (first_own_epoch). No group labels in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..metrics import PerSample
from .base import Card, Float, Int, Method, param


@dataclass
class JTTParams:
    stage1_epochs: int = param(5, "epochs of stage-1 ERM whose errors are up-weighted in stage 2 (T)", low=1)
    up: float = param(20.0, "how many times as likely an error is drawn as any other sample in stage 2 (lambda_up)",
                      low=1.0)


class JTT(Method):
    Params = JTTParams
    SPACE = {"stage1_epochs": Int(1, 10), "up": Float(4.0, 100.0, log=True)}  # BalancingGroups' up grid 4...100
    card = Card("JTT", "label-free debiasing", "Liu et al., ICML 2021", order=40)
    LOGGED = ("error_frac", "error_enrichment")
    errors: torch.Tensor

    def __init__(self, params: JTTParams, train, **kw):
        super().__init__(params, train, **kw)
        self.register_buffer("errors", torch.zeros(self.n_train, dtype=torch.bool))
        self.stage = 1

    @classmethod
    def first_own_epoch(cls, params) -> int:
        return params.stage1_epochs + 1

    @classmethod
    def space_for(cls, epochs: int) -> dict:
        t = cls.SPACE["stage1_epochs"]  # leave at least one stage-2 epoch
        return {**cls.SPACE, "stage1_epochs": Int(t.low, max(min(t.high, epochs - 1), t.low))}

    @torch.no_grad()
    def start_epoch(self, epoch, model, train_batches):
        if epoch != self.params.stage1_epochs:
            return
        for logits, _, y, idx in train_batches(eval=True):
            self.errors[idx] = logits.argmax(1) != y
        self.stage = 2

    def get_extra_state(self):  # in the state_dict: a resumed run knows its stage
        return {"stage": self.stage}

    def set_extra_state(self, state):
        self.stage = state["stage"]

    def new_stage(self, epoch):
        return epoch == self.params.stage1_epochs

    def sampling_weights(self):
        if self.stage == 1:
            return None
        return 1.0 + (self.params.up - 1.0) * self.errors.float()

    def epoch_stats(self):
        return {"error_frac": None if self.stage == 1 else round(float(self.errors.float().mean()), 4)}

    def per_sample(self):
        return {} if self.stage == 1 else {"error": PerSample(self.errors.float())}

    @classmethod
    def describe(cls, stats):
        if stats["error_frac"] is None:
            return "(stage 1)"
        enr = stats.get("error_enrichment")
        return f"errors {stats['error_frac']:.3f}{'' if enr is None else f' enrichment {enr:.1f}x'}"
