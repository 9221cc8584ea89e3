"""The method interface.

A method defines its loss; the base class owns the optimisation step. A method that needs more overrides hooks,
never the loop:
- `training_step`: its own step (SAM's two passes on one batch, a double-backprop penalty);
- `setup(ctx)`: once before training, with a model factory, an optimiser factory and the device (LfF's biased
  model and its optimiser);
- `sampling_weights()`: re-read before every epoch (group balancing, JTT's up-weighted errors);
- `start_epoch(...)` and `new_stage(epoch)`: per-epoch work, and stage boundaries at which the loop re-initialises
  the model and the optimiser (JTT's second stage);
- `after_fit(...)`: after the selected checkpoint is loaded, before the test pass (DFR re-fits the last layer).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Iterable, Iterator, Sequence, cast

import torch
from torch import nn

from ..fisher import at_least_fp32
from ..settings import param  # noqa: F401 (the methods declare their parameters with it)


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


@dataclass
class RunContext:
    """What a method may build with in `setup`: models and optimisers exactly like the run's own."""
    new_model: Callable[[], nn.Module]  # a freshly initialised model of the run's architecture, on the device
    new_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]  # the run's optimiser and settings
    device: torch.device
    autocast: Callable  # the run's autocast context factory (bf16 on CUDA, a no-op on the CPU)


def grad_sq_norm(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """||d loss / d params||^2 as a differentiable function of the parameters (double backprop)."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return cast(torch.Tensor, sum(at_least_fp32(g).pow(2).sum() for g in grads if g is not None))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Method(nn.Module):
    """Subclasses set `Params` and override `loss` (default: mean cross-entropy) or own `training_step`. State
    (GroupDRO weights, multipliers, auxiliary models) lives in buffers and submodules.

    `train_groups` (group id per training sample) and `conflicting` are given to every method for logging only;
    `train_labels` (class per training sample) may be used by any method. Only methods with
    `group_labels = "train"` receive group ids in `loss`. How a method appears in the report (row label, row
    order, whether it is the proposed method or the control every other is compared with) is said here too:
    adding a method touches only this package.
    """

    Params: ClassVar[type] = NoParams
    SPACE: ClassVar[dict] = {}  # searched parameters: name -> Float/Int/Choice (defaults live in Params)
    group_labels: ClassVar[str] = "none"  # trains on group labels of: none, val (the validation split), train
    LOGGED: ClassVar[tuple] = ()  # epoch_stats keys the study records per epoch in the trial (dashboard, figures)
    replacement: ClassVar[bool] = True  # sampling_weights: N draws with replacement; False: each sample of
                                        # weight > 0 exactly once per epoch (a subset)
    name_note: ClassVar[str] = ""  # how the literature names the method, when its label is short (the caption)
    val_note: ClassVar[str] = ""  # what the row's val number means, when not the selected epoch's (the caption)
    label: ClassVar[str] = ""        # the report's row label (default: the registry name)
    order: ClassVar[int] = 100       # row order in the report (lower first)
    proposed: ClassVar[bool] = False  # the paper's method: compared against every other row
    control: ClassVar[bool] = False   # the reference every other method is compared with (ERM)
    reference: ClassVar[bool] = False  # across benchmarks, every method is judged against these (ERM, GroupDRO)
    family: ClassVar[str] = ""         # the README's methods table: the kind of method ...
    cites: ClassVar[str] = ""          # ... and where it comes from
    train_groups: torch.Tensor         # buffers (registered in __init__), declared for the type checker
    train_labels: torch.Tensor | None
    conflicting: torch.Tensor | None

    def __init__(self, params, *, n_train: int, n_groups: int, train_groups: torch.Tensor, grad_clip: float = 0.0,
                 conflicting: torch.Tensor | None = None, train_labels: torch.Tensor | None = None):
        super().__init__()
        self.params, self.n_train, self.n_groups = params, n_train, n_groups
        self.grad_clip = grad_clip  # max gradient norm, a training setting shared by every method; 0 = off
        self.register_buffer("train_groups", train_groups.long().clone(), persistent=False)
        self.register_buffer("train_labels", None if train_labels is None else train_labels.long().clone(),
                             persistent=False)
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
        """The batch's mean cross-entropy (ERM's loss; methods that change the objective override it)."""
        nll = nn.functional.cross_entropy(logits, y)
        return nll, {"nll": nll}

    def setup(self, ctx: RunContext) -> None:
        """Called once before training: build auxiliary models and their optimisers here."""

    def sampling_weights(self) -> torch.Tensor | None:
        """Per-training-sample sampling weights, or None for uniform shuffling. Re-read before every epoch."""
        return None

    def start_epoch(self, epoch: int, model: nn.Module, train_batches) -> None:
        """Called before each training epoch (0-based), with `train_batches(eval=False)`: (logits, features, y, idx)
        over the training set as a training step sees it (loop.training_view), or with eval=True in eval mode,
        un-augmented and in order — for methods that calibrate on, or select from, the training set;
        `train_batches(inputs=True)` gives the training step's inputs (x, y, idx) for a method's own passes."""

    def new_stage(self, epoch: int) -> bool:
        """True before the (0-based) epoch that starts a new stage: the loop then re-initialises the model and the
        optimiser. Called after `start_epoch`, so a method can first read what the previous stage learned."""
        return False

    def after_fit(self, model: nn.Module, val_batches: Callable[[], Iterator]) -> dict | None:
        """Called with the selected checkpoint loaded, before the test pass; `val_batches()` yields (logits,
        features, y, a) over the validation split in eval mode. A method that changes the model here returns the
        validation metrics (trainer.metrics.group_metrics) of the changed model, measured on data it was not fit
        on; they replace the selected epoch's in the result."""
        return None

    def epoch_stats(self) -> dict[str, float | list]:
        """Diagnostics for the epoch just finished (read once per epoch: one host-device sync)."""
        return {}

    @classmethod
    def describe(cls, stats: dict) -> str:
        """The epoch_stats worth a glance in the per-epoch log line."""
        return ""

    def training_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x, y, a, idx, n_attr: int,
                      autocast) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits, h = model(x, return_features=True)
        g = y * n_attr + a if self.group_labels == "train" else None
        loss, logs = self.loss(logits.float(), h.float(), y, g, idx)
        loss.backward()
        self.clip(model)
        optimizer.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}

    def clip(self, model: nn.Module) -> None:
        """Gradient-norm clipping (the run's grad_clip): rescales, never changes the gradient's direction."""
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)

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
