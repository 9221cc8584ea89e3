"""The method contract.

A method declares what it trains on (`group_labels`), its parameters (`Params`, each with its limits), its search
space (`SPACE`) and how the report presents it (`card`). It sees the training split through `TrainSplit` and each
step's data through `Batch`: group ids are in them only for a method that declares `group_labels = "train"`, so a
method that promises not to read them cannot. The base class owns the optimisation step (`training_step`: every
optimiser's zero-grad, the gradients, clipping, every optimiser's step); a method overrides only what differs:
- `loss(logits, h, batch)`: the objective on the step's forward (default: mean cross-entropy);
- `penalty(model, logits, h, batch, loss)`: a term added to it (EGR, the Fisher penalty, Ours' cheaper scopes);
- `extend(batch)`: more samples for the step (latent de-biasing's synthetic pairs);
- `auxiliary_loss(batch, autocast)`: the loss of models trained beside the run's (`add_auxiliary`: LfF's and
  fim_relative's biased model), which the base backpropagates, clips and steps with the run's model;
- `gradients(model, batch, autocast)`: the whole forward and backward, for a step that is not one loss's gradient
  (SAM's two passes, the full-scope Fisher constraint's double backprop);
- `setup(ctx)`: once before training, with a model factory, an optimiser factory and the device;
- `sampling_weights()`: re-read before every epoch (group balancing, JTT's up-weighted errors);
- `start_epoch(...)` and `new_stage(epoch)`: per-epoch work, and stage boundaries at which the loop re-initialises
  the model and the optimiser (JTT's second stage);
- `after_fit(...)`: after the selected checkpoint is loaded, before the test pass (DFR re-fits the last layer);
- `resume_state()` / `load_resume_state(state)`: what a stopped run needs to go on (trainer/resume.py): by default
  the module's state_dict (buffers, submodules such as an auxiliary model, and `get_extra_state()`, where a method
  keeps plain attributes such as a stage) and the auxiliary optimisers' states;
- `epoch_stats()` and `per_sample()`: diagnostics; the loop summarises per-sample ones by group (trainer.metrics),
  so that a method can log where its weight goes without reading a group label.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Iterable, Iterator, Sequence, cast

import torch
from torch import nn

from ..fisher import at_least_fp32
from ..metrics import PerSample
from ..settings import check, param  # noqa: F401 (the methods declare their parameters with it)


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


@dataclass(frozen=True)
class Card:
    """How a method is presented: the report's row (label, order), the methods table of docs/methods.md (family,
    cites), the comparisons (the proposal against every row; every row against the control; across benchmarks,
    every method against the references) and the caption's notes."""
    label: str
    family: str
    cites: str
    order: int = 100
    proposed: bool = False   # the paper's method: compared against every other row
    control: bool = False    # the reference every other method is compared with (ERM)
    reference: bool = False  # across benchmarks, every method is judged against these (ERM, GroupDRO)
    name_note: str = ""      # how the literature names the method, when its label is short
    val_note: str = ""       # what the row's val number means, when not the selected epoch's
    named: tuple[str, ...] = ()  # parameters the caption names for the selected configuration (a search over them
    #                              can select a quantity that is not the method's own), and what they mean
    named_note: str = ""


@dataclass(frozen=True)
class Batch:
    """One training step's data, on the device. `g` (group id y * n_attr + a per sample) is filled only for a
    method that declares group_labels = "train". Rows of x and y past len(idx) are a method's own (`extend`)."""
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # dataset indices of the training samples
    g: torch.Tensor | None = None


@dataclass(frozen=True)
class TrainSplit:
    """What a method may know of the training split: its labels, the number of classes and of groups (the dataset's
    shape), and its group ids only for a method that declares group_labels = "train"."""
    labels: torch.Tensor
    n_classes: int
    n_groups: int
    groups: torch.Tensor | None = None

    @classmethod
    def view(cls, method: type["Method"], labels: torch.Tensor, groups: torch.Tensor, n_classes: int,
             n_groups: int) -> "TrainSplit":
        """The split as `method` may see it: its groups are dropped unless it declares it trains on them."""
        return cls(labels, n_classes, n_groups, groups if method.group_labels == "train" else None)


@dataclass(frozen=True)
class HeldOut:
    """A method's predictions on validation samples its change of the model was not fit on (`after_fit`): the loop
    scores them as it scores every split (trainer.metrics.group_metrics)."""
    correct: torch.Tensor
    groups: torch.Tensor
    labels: torch.Tensor


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
    """Subclasses set `Params`, `SPACE`, `card`, and override the hooks they need (the module's docstring). State
    (GroupDRO weights, multipliers, auxiliary models) lives in buffers and submodules."""

    Params: ClassVar[type] = NoParams
    SPACE: ClassVar[dict] = {}  # searched parameters: name -> Float/Int/Choice (defaults live in Params)
    group_labels: ClassVar[str] = "none"  # trains on group labels of: none, val (the validation split), train
    LOGGED: ClassVar[tuple] = ()  # epoch keys the study records per epoch in the trial (dashboard, figures)
    replacement: ClassVar[bool] = True  # sampling_weights: N draws with replacement; False: each sample of
                                        # weight > 0 exactly once per epoch (a subset)
    card: ClassVar[Card]
    train_labels: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    train_groups: torch.Tensor | None

    def __init__(self, params, train: TrainSplit, grad_clip: float = 0.0):
        super().__init__()
        for f in fields(params):  # each parameter's declared type and limits (cross-field checks: the subclass's)
            check(f, getattr(params, f.name))
        self.params, self.n_train, self.n_groups = params, len(train.labels), train.n_groups
        self.n_classes = train.n_classes
        self.grad_clip = grad_clip  # max gradient norm, a training setting shared by every method; 0 = off
        self.register_buffer("train_labels", train.labels.long().clone(), persistent=False)
        self.register_buffer("train_groups", None if train.groups is None else train.groups.long().clone(),
                             persistent=False)
        self._auxiliaries: list[tuple[nn.Module, torch.optim.Optimizer]] = []

    @property
    def train_group_ids(self) -> torch.Tensor:
        """The training split's group id per sample, given only to a method that declares group_labels = "train"."""
        if self.train_groups is None:  # not AttributeError: nn.Module.__getattr__ would replace its message
            raise RuntimeError(f"{type(self).__name__} declares group_labels = {self.group_labels!r}: it is given "
                               "no training group ids")
        return self.train_groups

    def add_auxiliary(self, ctx: RunContext) -> nn.Module:
        """A model like the run's, with its own optimiser, stepped by the base with the run's model (in `setup`)."""
        model = ctx.new_model()
        self._auxiliaries.append((model, ctx.new_optimizer(model.parameters())))
        return model

    # --- the step -------------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                      autocast) -> dict[str, torch.Tensor]:
        """One optimisation step of the run's model and of every auxiliary model; returns the step's logs (detached;
        "loss" is the run model's objective)."""
        optimizers = [optimizer, *(o for _, o in self._auxiliaries)]
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        aux, logs = self.auxiliary_loss(batch, autocast)
        if aux is not None:
            aux.backward()
        logs = {**self.gradients(model, batch, autocast), **logs}
        for m in (model, *(m for m, _ in self._auxiliaries)):
            self.clip(m)
        for o in optimizers:
            o.step()
        return {k: v.detach() for k, v in logs.items()}

    def gradients(self, model: nn.Module, batch: Batch, autocast) -> dict[str, torch.Tensor]:
        """Fills the run model's gradients for the batch: forward, loss + penalty, backward. Returns the logs."""
        batch = self.extend(batch)
        with autocast():
            logits, h = model(batch.x, return_features=True)
        logits, h = logits.float(), h.float()
        loss, logs = self.loss(logits, h, batch)
        extra, extra_logs = self.penalty(model, logits, h, batch, loss)
        total = loss if extra is None else loss + extra
        total.backward()
        return {"loss": total, **logs, **extra_logs}

    def loss(self, logits: torch.Tensor, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The batch's mean cross-entropy (ERM's loss; methods that change the objective override it)."""
        nll = nn.functional.cross_entropy(logits, batch.y)
        return nll, {"nll": nll}

    def penalty(self, model: nn.Module, logits: torch.Tensor, h: torch.Tensor, batch: Batch,
                loss: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """A term added to the loss (None: none this step), with its logs."""
        return None, {}

    def extend(self, batch: Batch) -> Batch:
        """The batch the step trains on (a method may append samples of its own)."""
        return batch

    def auxiliary_loss(self, batch: Batch, autocast) -> tuple[torch.Tensor | None, dict]:
        """The auxiliary models' loss on the batch, computed before the run model's forward, and its logs."""
        return None, {}

    def clip(self, model: nn.Module) -> None:
        """Gradient-norm clipping (the run's grad_clip): rescales, never changes the gradient's direction."""
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)

    # --- a stopped run goes on ---------------------------------------------------------------------------------
    def resume_state(self) -> dict:
        """What the method holds after an epoch (live tensors: the loop copies them): its state_dict — buffers,
        submodules, `get_extra_state()` — and the auxiliary optimisers' states."""
        return {"module": self.state_dict(), "optimizers": [o.state_dict() for _, o in self._auxiliaries]}

    def load_resume_state(self, state: dict) -> None:
        """Back to `resume_state()`'s state, after `setup` (the auxiliary models and optimisers exist)."""
        self.load_state_dict(state["module"])
        for (_, optimizer), saved in zip(self._auxiliaries, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)

    # --- around the steps -----------------------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        """Called once before training: build auxiliary models here (add_auxiliary)."""

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

    def after_fit(self, model: nn.Module, val_batches: Callable[[], Iterator]) -> HeldOut | None:
        """Called with the selected checkpoint loaded, before the test pass; `val_batches()` yields (logits,
        features, y, g) over the validation split in eval mode, g its group ids for a method that declares
        group_labels "val" or "train" (else None). A method that changes the model here returns its predictions on
        validation samples it was not fit on: their metrics replace the selected epoch's val metrics."""
        return None

    def epoch_stats(self) -> dict[str, float | list | None]:
        """Diagnostics for the epoch just finished (read once per epoch: one host-device sync)."""
        return {}

    def per_sample(self) -> dict[str, PerSample]:
        """Per-training-sample diagnostics that the loop summarises by group after each epoch (metrics.by_group):
        the method itself never reads a group label to log them."""
        return {}

    @classmethod
    def describe(cls, stats: dict) -> str:
        """The epoch's diagnostics worth a glance in the per-epoch log line."""
        return ""

    @classmethod
    def param_fields(cls):
        return fields(cls.Params)

    @classmethod
    def first_own_epoch(cls, params) -> int:
        """The first epoch (1-based) that is this method's own: epochs before it (a warm-up of plain ERM, a first
        stage) never become the selected checkpoint and do not count toward patience."""
        return 1

    @classmethod
    def recipe_warning(cls, params: dict[str, tuple], lr: float, grad_clip: float) -> str | None:
        """One line that a run (or a search) should read before it starts, or None: `params` maps each method
        parameter to the values it may take (fixed: one; searched: a Choice's), `lr` is the largest rate it may
        use, `grad_clip` its max gradient norm (0 = none)."""
        return None

    @classmethod
    def space_for(cls, epochs: int) -> dict:
        """The search space for runs of `epochs` epochs (a method narrows ranges that need more epochs)."""
        return dict(cls.SPACE)
