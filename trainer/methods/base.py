"""The method interface: a method defines its loss; the base class owns the optimisation step."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn


@dataclass
class NoParams:
    pass


@dataclass(frozen=True)
class Float:
    """A searched float in [low, high] (log-uniform if log). Specs are plain data: no Optuna import here."""
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name):
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Int:
    low: int
    high: int

    def suggest(self, trial, name):
        return trial.suggest_int(name, self.low, self.high)


@dataclass(frozen=True)
class Choice:
    choices: tuple

    def suggest(self, trial, name):
        return trial.suggest_categorical(name, list(self.choices))


def param(default, help: str, **kw):
    """A method hyperparameter with its default and help text (becomes a kebab-case CLI flag)."""
    return field(default=default, metadata={"help": help, **kw})


class Method(nn.Module):
    """Subclasses set `Params` and implement `loss`. State (GroupDRO weights, multipliers) lives in buffers.

    `train_groups` (group id per training sample) is given to every method for logging; only methods
    with `uses_group_labels = True` receive group ids in `loss`. How a method appears in the report (row label,
    row order, whether it is the proposed method or the control every other is compared with) is said here too:
    adding a method touches only this package.
    """

    Params: ClassVar[type] = NoParams
    SPACE: ClassVar[dict] = {}  # searched parameters: name -> Float/Int/Choice (defaults live in Params)
    uses_group_labels: ClassVar[bool] = False
    label: ClassVar[str] = ""        # the report's row label (default: the registry name)
    order: ClassVar[int] = 100       # row order in the report (lower first)
    proposed: ClassVar[bool] = False  # the paper's method: compared against every other row
    control: ClassVar[bool] = False   # the reference every other method is compared with (ERM)

    def __init__(self, params, *, n_train: int, n_groups: int, train_groups: torch.Tensor, grad_clip: float = 0.0,
                 conflicting: torch.Tensor | None = None):
        super().__init__()
        self.params, self.n_train, self.n_groups = params, n_train, n_groups
        self.grad_clip = grad_clip  # max gradient norm, a training setting shared by every method; 0 = off
        self.register_buffer("train_groups", train_groups.long().clone(), persistent=False)
        # per training sample: bias-conflicting (metrics.bias_conflicting)? For logging only, like train_groups.
        self.register_buffer("conflicting", None if conflicting is None else conflicting.bool().clone(),
                             persistent=False)

    def enrichment(self, weights: torch.Tensor) -> float | None:
        """Share of `weights` (per training sample) on bias-conflicting samples over their share of the training
        set: 1 = no preference, > 1 = the mass goes to the minority groups. None when undefined."""
        if self.conflicting is None or not self.conflicting.any() or self.conflicting.all():
            return None
        total = float(weights.sum())
        if total <= 0:
            return None
        return round(float(weights[self.conflicting].sum()) / total / float(self.conflicting.float().mean()), 4)

    def loss(self, logits, h, y, g, idx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def sampling_weights(self) -> torch.Tensor | None:
        """Per-training-sample sampling weights, or None for uniform shuffling."""
        return None

    def start_epoch(self, epoch: int, model: nn.Module, train_batches) -> None:
        """Called before each training epoch (with a deterministic iterator over the training set)."""

    def epoch_stats(self) -> dict[str, float | list]:
        """Diagnostics for the epoch just finished (read once per epoch: one host-device sync)."""
        return {}

    def training_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x, y, a, idx, n_attr: int,
                      autocast) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits, h = model(x, return_features=True)
        g = y * n_attr + a if self.uses_group_labels else None
        loss, logs = self.loss(logits.float(), h.float(), y, g, idx)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        optimizer.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}

    @classmethod
    def param_fields(cls):
        return fields(cls.Params)

    @classmethod
    def first_own_epoch(cls, params) -> int:
        """The first epoch (1-based) that is this method's own: epochs before it (a warm-up of plain ERM, a first
        stage) never become the selected checkpoint and do not count toward patience."""
        return 1

    @classmethod
    def space_for(cls, epochs: int) -> dict:
        """The search space for runs of `epochs` epochs (a method narrows ranges that need more epochs)."""
        return dict(cls.SPACE)
