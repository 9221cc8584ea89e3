"""fit(): one training run of one method — epochs, evaluation on val, early stopping on val WGA, test at best."""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import COMPILE_MIN_STEPS, TrainConfig
from .data import Splits, TensorGroupDataset, make_loader
from .methods import Batch, Method, RunContext, TrainSplit, get_method
from .metrics import bias_conflicting, by_group, get_selection, group_metrics, selection_key
from .models import buffers_kept, build_model
from .resume import ResumeError, ResumeState, cpu_copy, fingerprint, rng_states, set_rng_states

EpochCallback = Callable[[int, dict], None]  # (epoch, history record); may raise to stop the run
StateCallback = Callable[[int, Callable[[], ResumeState]], None]  # (epoch, take): take() snapshots the run


@dataclass
class FitResult:
    """One run's result; `python -m trainer --output` writes `to_dict()` as JSON. Metrics are fractions in [0, 1]."""
    method: str
    dataset: str
    seed: int
    hparams: dict[str, Any]       # every effective setting: the resolved TrainConfig
    group_labels: str             # the labels the method trains on: none, val or train
    selection: str                # the model-selection metric (trainer/metrics.py)
    objective: float              # that metric at the selected epoch: what a study maximises
    best_epoch: int
    first_own_epoch: int          # earlier epochs (a warm-up, a first stage) are never selected
    epochs_run: int
    seconds: float
    compiled: bool
    device: str
    data_checksum: str
    val: dict[str, Any]           # at the selected epoch: wga, worst_class, avg_plain, avg_train_weighted, groups
    test: dict[str, Any]          # the same keys, at the selected epoch
    history: list[dict[str, Any]]  # per epoch: epoch, own, train_*, val_*, seconds and the method's diagnostics
    refit: bool = False           # the method changed the selected model after training (DFR's head): its val
    #                               metrics are on val samples it was not fit on, not the whole val split
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # fit(keep_state=True): the weights
    #                               the test pass used, on the CPU (never in to_dict)

    @property
    def uses_group_labels(self) -> bool:
        return self.group_labels == "train"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, state=None))  # the weights never go into the JSON
        del out["state"]
        return {**out, "uses_group_labels": self.uses_group_labels}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run is a failure, not a result."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this host has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (auto, cpu, cuda, cuda:N)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """torch's deterministic algorithms and cuDNN's deterministic, non-benchmarked kernels for the run; restored
    afterwards (a worker's next trial may not ask for them). cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first
    handle: set here if unset, and in the Dockerfile."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _batch(device, x, *rest, transform=None, channels_last=False):
    """Moves a batch to the device (a no-op for device-resident data) and makes the model input there."""
    x = x.to(device, non_blocking=True)
    if transform is not None:
        x = transform(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *(t.to(device, non_blocking=True) for t in rest))


def _place(ds, device):
    return ds.on(device) if isinstance(ds, TensorGroupDataset) else ds


@torch.no_grad()
def predict(model, loader, device, autocast, channels_last=False, transform=None):
    """Yields (logits, features, y, a, idx) batch by batch in eval mode."""
    model.eval()
    for x, y, a, idx in loader:
        x, y, a, idx = _batch(device, x, y, a, idx, transform=transform, channels_last=channels_last)
        with autocast():
            logits, h = model(x, return_features=True)
        yield logits.float(), h.float(), y, a, idx


@torch.no_grad()
def training_view(net, model, loader, device, autocast, channels_last, transform, inputs=False):
    """Yields (logits, features, y, idx) as a training step sees them — augmented inputs, BatchNorm in train mode
    (batch statistics) — without gradients, and restores the BatchNorm running statistics afterwards: looking does
    not change the model. inputs=True yields the step's inputs (x, y, idx) instead, the model in train mode, for a
    method that runs its own passes (gradients are the caller's choice: the generator's no_grad stops at yield)."""
    with buffers_kept(model):
        net.train()
        for x, y, _, idx in loader:
            x, y, idx = _batch(device, x, y, idx, transform=transform, channels_last=channels_last)
            if inputs:
                yield x, y, idx
                continue
            with autocast():
                logits, h = net(x, return_features=True)
            yield logits.float(), h.float(), y, idx


def evaluate(model, ds, n_attr, train_counts, device, batch_size, autocast, channels_last=False, num_workers=0):
    ds = _place(ds, device)
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    correct, groups, labels, predicted, norms = [], [], [], [], []
    transform = functools.partial(ds.batch_transform, train=False)
    for logits, h, y, a, _ in predict(model, loader, device, autocast, channels_last, transform):
        predicted.append(logits.argmax(1))
        correct.append(predicted[-1] == y)
        groups.append(y * n_attr + a)
        labels.append(y)
        norms.append(h.flatten(1).norm(dim=1))
    out = group_metrics(torch.cat(correct), torch.cat(groups), ds.n_groups, train_counts, y=torch.cat(labels),
                        n_attr=n_attr)
    # what tells fitting from flattening: a collapsed model's penultimate features vanish in eval mode and it
    # predicts one class (the share of its most predicted class goes to 1)
    out["feature_norm"] = float(torch.cat(norms).mean())
    out["top_class_share"] = float(torch.bincount(torch.cat(predicted)).max() / len(ds))
    return out


def train_one_epoch(method: Method, net: nn.Module, optimizer: torch.optim.Optimizer, loader, device, n_attr: int,
                    autocast, augment, channels_last: bool, progress: str | None = None) -> dict[str, float]:
    """One pass over the training loader, a training step per batch; returns the epoch's mean of every step log
    (train_loss, train_nll, ...). Group ids go into the batch only for a method that trains on them."""
    net.train()
    with_groups = method.train_groups is not None  # the method was given the training groups (TrainSplit.view)
    sums: dict[str, torch.Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=device)
    n_steps = 0
    for x, y, a, idx in tqdm(loader, desc=progress, leave=False, disable=progress is None):
        x, y, a, idx = _batch(device, x, y, a, idx, transform=augment, channels_last=channels_last)
        logs = method.training_step(net, optimizer, Batch(x, y, idx, y * n_attr + a if with_groups else None),
                                    autocast)
        finite &= torch.isfinite(logs["loss"])  # checked once per epoch: no per-step host sync
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps += 1
    if not bool(finite):
        raise NonFiniteLossError("training loss became non-finite")
    return {f"train_{k}": float(v) / max(n_steps, 1) for k, v in sums.items()}


def fit(cfg: TrainConfig, callback: EpochCallback | None = None, splits: Splits | None = None,
        progress: bool = False, log: Callable[[str], None] | None = print, keep_state: bool = False,
        resume: ResumeState | None = None, on_state: StateCallback | None = None) -> FitResult:
    """Train one model with one method; return its result (with keep_state, the tested weights in `state`).
    `on_state(epoch, take)` is called after every epoch: `take()` snapshots the run (trainer/resume.py; taken once
    however often it is called); `resume` goes on from such a snapshot, after its epoch (ResumeError: not this
    run's)."""
    cfg = cfg.resolved()
    with deterministic_mode(cfg.deterministic):
        return _fit(cfg, callback, splits, progress, log, keep_state, resume, on_state)


def _fit(cfg: TrainConfig, callback, splits, progress, log, keep_state=False, resume=None, on_state=None) -> FitResult:
    t_start = time.time()
    # resolved() filled every recipe setting
    assert cfg.epochs is not None and cfg.batch_size is not None and cfg.grad_clip is not None
    epochs, batch_size, grad_clip = cfg.epochs, cfg.batch_size, cfg.grad_clip
    selection = get_selection(cfg.selection)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # before anything runs: reductions on a CPU depend on the thread count
    seed_everything(cfg.seed)
    if splits is None:
        splits = cfg.load_splits()
    train, n_attr = _place(splits.train, device), splits.train.n_attr
    train_counts = train.group_counts()
    cuda = device.type == "cuda"
    autocast = _autocast(device)

    def new_model():
        m = build_model(cfg.model, splits.n_classes, cfg.pretrained, cfg.weights, splits.in_channels,
                        cfg.freeze_bn, source=(cfg.dataset, cfg.image_size)).to(device)
        return m.to(memory_format=torch.channels_last) if cuda else m

    def new_optimizer(parameters):
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    model = new_model()
    method_cls = get_method(cfg.method)
    params = method_cls.Params(**cfg.method_params)
    method = method_cls(params, TrainSplit.view(method_cls, train.y, train.g, splits.n_classes, splits.n_groups),
                        grad_clip=grad_clip).to(device)
    # the loop's own view, for the method's per-sample diagnostics by group (metrics.by_group)
    train_groups, conflicting = train.g.to(device), bias_conflicting(train.y, train.a).to(device)
    method.setup(RunContext(new_model, new_optimizer, device, autocast))
    first_own = method_cls.first_own_epoch(params)  # earlier epochs (a warm-up, a first stage) are never selected
    optimizer = new_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(cfg.seed)
    workers = 0 if isinstance(train, TensorGroupDataset) else cfg.num_workers
    loader_kw: dict[str, Any] = dict(num_workers=workers, pin_memory=cuda)

    def epoch_loader(weights):  # one generator for every epoch's sampler: one reproducible stream
        return make_loader(train, batch_size, shuffle=True, generator=gen, replacement=method.replacement,
                           weights=None if weights is None else weights.cpu(), **loader_kw)

    weights = method.sampling_weights()
    train_loader = epoch_loader(weights)
    steps = epochs * len(train_loader)
    compiled = cfg.compile if cfg.compile is not None else cuda and steps >= COMPILE_MIN_STEPS
    net = cast(nn.Module, torch.compile(model)) if compiled else model  # `model` keeps the plain state_dict keys
    augment_gen = torch.Generator(device=device).manual_seed(cfg.seed)  # crops and flips, drawn on the device
    augment = functools.partial(train.batch_transform, train=cfg.augment, generator=augment_gen)
    evaluate_split = functools.partial(evaluate, net, n_attr=n_attr, train_counts=train_counts, device=device,
                                       batch_size=batch_size * 2, autocast=autocast, channels_last=cuda,
                                       num_workers=workers)

    def train_batches(eval: bool = False, inputs: bool = False):
        """(logits, features, y, idx) over the training set as a training step sees it (shuffled batches of the
        training size, augmented, BatchNorm in train mode), or with eval=True as evaluation sees it (in order,
        not augmented, eval mode): for methods that calibrate on, or select from, the training set. inputs=True:
        the training step's (x, y, idx) instead, for a method's own passes (BatchNorm statistics restored after)."""
        if eval:
            loader = make_loader(train, batch_size * 2, shuffle=False, **loader_kw)
            plain = functools.partial(train.batch_transform, train=False)
            return ((lo, h, y, i) for lo, h, y, _, i in predict(net, loader, device, autocast, cuda, plain))
        gen_view = torch.Generator().manual_seed(cfg.seed + 1)  # its own draws: the training stream is untouched
        loader = make_loader(train, batch_size, shuffle=True, generator=gen_view, **loader_kw)
        view = functools.partial(train.batch_transform, train=cfg.augment,
                                 generator=torch.Generator(device=device).manual_seed(cfg.seed + 1))
        return training_view(net, model, loader, device, autocast, cuda, view, inputs)

    history, best, best_state, stale, start = [], None, None, 0, 1
    if resume is not None:  # everything as it was after the state's epoch; the run goes on from the next one
        resume.check(cfg.to_dict(), splits.checksum, device.type)
        try:  # a state written by another version of a method (a buffer added since) does not load
            model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            method.load_resume_state(resume.method)
            set_rng_states(resume.rng, device, gen, augment_gen)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise ResumeError(f"the state does not fit this run ({str(e).strip().splitlines()[0]})") from None
        history, stale, start = copy.deepcopy(resume.history), resume.stale, resume.epoch + 1
        if resume.best_epoch is not None:
            best = (resume.best_epoch, resume.best_val)
            best_state = resume.best_state if resume.best_state is not None else cpu_copy(model.state_dict())
        weights = method.sampling_weights()
        train_loader = epoch_loader(weights)
        if cfg.patience and stale >= cfg.patience:  # the state's epoch stopped the run early: straight to the test
            start = epochs + 1
        if log:
            log(f"resumed after epoch {resume.epoch}/{epochs}")

    run_fingerprint = fingerprint(cfg.to_dict())

    def snapshot(epoch: int) -> ResumeState:
        current = best is not None and best[0] == epoch  # its weights are the model's: not stored twice
        return ResumeState(
            run_fingerprint, splits.checksum, epoch, cpu_copy(model.state_dict()),
            cpu_copy(optimizer.state_dict()), cpu_copy(method.resume_state()), rng_states(device, gen, augment_gen),
            copy.deepcopy(history), None if best is None else best[0], copy.deepcopy(None if best is None else best[1]),
            None if current else best_state, stale)

    for epoch in range(start, epochs + 1):
        t_epoch = time.time()
        method.start_epoch(epoch - 1, net, train_batches)
        if method.new_stage(epoch - 1):  # a fresh model and optimiser; the method keeps what it learned
            model.load_state_dict(new_model().state_dict())
            optimizer = new_optimizer(model.parameters())
        now = method.sampling_weights()  # re-read every epoch; the loader is rebuilt only when they change
        if not (now is weights or (now is not None and weights is not None and torch.equal(now, weights))):
            weights, train_loader = now, epoch_loader(now)
        try:
            train_logs = train_one_epoch(method, net, optimizer, train_loader, device, n_attr, autocast, augment,
                                         cuda, f"epoch {epoch}" if progress else None)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e} in epoch {epoch} (method {cfg.method}, lr {cfg.lr}, "
                                     f"{cfg.method_params})") from None
        val = evaluate_split(splits.val)
        record = {"epoch": epoch, **train_logs,
                  "val_wga": val["wga"], "val_worst_class": val["worst_class"], "val_avg_plain": val["avg_plain"],
                  "val_avg_train_weighted": val["avg_train_weighted"], "val_feature_norm": val["feature_norm"],
                  "val_top_class_share": val["top_class_share"], "own": epoch >= first_own,
                  "val_selection": val[selection.key], **method.epoch_stats(),
                  **by_group(method.per_sample(), train_groups, conflicting, splits.n_groups),
                  "seconds": round(time.time() - t_epoch, 3)}
        history.append(record)
        improved = epoch >= first_own and (best is None or selection_key(val, cfg.selection) >
                                           selection_key(best[1], cfg.selection))
        if improved:
            best, stale = (epoch, val), 0
            best_state = cpu_copy(model.state_dict())
        elif epoch >= first_own:
            stale += 1
        if log:
            log(_epoch_line(record, epochs, improved, method_cls.describe(record)))
        if callback:
            callback(epoch, record)
        if on_state:
            on_state(epoch, functools.cache(functools.partial(snapshot, epoch)))
        if cfg.patience and stale >= cfg.patience:
            if log:
                log(f"early stop: no {cfg.selection} improvement for {cfg.patience} epochs")
            break

    assert best is not None, "resolved() checks that the method's first own epoch is within the epochs"
    model.load_state_dict(best_state)
    val_loader = make_loader(_place(splits.val, device), batch_size * 2, shuffle=False, **loader_kw)
    val_transform = functools.partial(splits.val.batch_transform, train=False)
    val_groups = method_cls.group_labels in ("val", "train")  # what the method may read of the val split
    refit = method.after_fit(net, lambda: ((lo, h, y, y * n_attr + a if val_groups else None) for lo, h, y, a, _ in
                                           predict(net, val_loader, device, autocast, cuda, val_transform)))
    if refit is not None:  # the method changed the model: its val metrics, on val samples it was not fit on
        best = (best[0], group_metrics(refit.correct, refit.groups, splits.n_groups, train_counts, y=refit.labels,
                                       n_attr=n_attr))
    test = evaluate_split(splits.test)
    state = cpu_copy(model.state_dict()) if keep_state else None
    return FitResult(
        method=cfg.method, dataset=cfg.dataset, seed=cfg.seed, hparams=cfg.to_dict(),
        group_labels=method_cls.group_labels, selection=cfg.selection, objective=best[1][selection.key],
        best_epoch=best[0], first_own_epoch=first_own, epochs_run=len(history),
        seconds=round(time.time() - t_start, 2), compiled=compiled,
        device=str(device) if not cuda else torch.cuda.get_device_name(device),
        data_checksum=splits.checksum, val=best[1], test=test, history=history, refit=refit is not None, state=state)


def _epoch_line(r: dict, epochs: int, improved: bool, extra: str) -> str:
    return (f"epoch {r['epoch']:3d}/{epochs}{'' if r['own'] else ' (warm-up)'}  loss {r['train_loss']:.4f}  "
            f"val wga {r['val_wga']:.4f} worst class {r['val_worst_class']:.4f} avg {r['val_avg_plain']:.4f}"
            f"{' *' if improved else '  '}{'  ' + extra if extra else ''}  {r['seconds']:.1f}s")
