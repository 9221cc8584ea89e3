"""Fisher-information-constrained training ("Ours").

    min_theta mean_i l_i   s.t.  T_i(theta) <= eps  for the samples with the largest trace,

solved through L = mean_i l_i + mean_{i in K} lambda_i (T_i - eps), one multiplier lambda_i >= 0 per training
sample (indexed by dataset index), primal descent on theta and projected dual ascent on the active samples:
lambda_i <- clip(lambda_i + eta min((T_i - eps) / eps, 1), 0, lambda_max). T_i is the per-sample Fisher trace of
`trainer.fisher` (scope `full`: over every parameter, the paper's quantity; `logits`, `last_layer`: proxies). Each
scope is an object of the table SCOPES: where its traces come from at calibration and at each step.

The active set K. `global` (the paper's): a sample is constrained when its trace is in the top rho of the whole
training set. Every sample's trace from its last visit is kept (filled for all of them by the calibration pass); at
each step the batch's traces are written in and K is the batch's samples at or above the set's (1 - rho)-quantile.
At most ceil(2 rho B) samples of a batch are constrained (a static shape: no host sync on a GPU); the excess is
counted in `overflow_frac`. `batch`: the top-ceil(rho B) of each batch. Either way the penalty is divided by
ceil(rho B), so a constrained sample weighs the same whatever the rest of its batch.

eps is well defined by construction: after `warmup_epochs` (>= 1) of plain ERM, one pass over the training set as
the training step sees it (augmented batches of the training size, BatchNorm in train mode; loop.py restores the
BatchNorm statistics afterwards) takes every sample's trace, and eps is the `eps_quantile` of the traces of the
active set as training will take it (the global top rho, or each batch's top rho). At the median, half the active
samples start feasible and half violated, so multipliers move both ways from the first constrained step; the
normalised slack (T - eps) / eps is then O(1) and `dual_lr` means the same on every dataset and scope. The full
scope's traces are divided by their mean over the training set at calibration (a constant: the constraint is the
same, in units where the penalty is O(1) like the logits scope's). bench/fim_ablation.py keeps a fixed penalty
(no dual ascent) as a baseline.

Cost of the full scope per constrained step: the step's forward and backward, one more backward of that forward for
every sample's trace (trainer.fisher.ParameterTrace.recording), and a double backprop on the active samples only.

No group labels are used (group_labels = "none": the method is never given them). The per-group share of lambda and
its enrichment on bias-conflicting samples are logged by the loop from the per-sample multipliers (`per_sample`),
to show where the constraint mass goes.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..fisher import FISHERS, ParameterTrace, last_layer_trace, logit_trace
from ..metrics import PerSample
from .base import Card, Choice, Float, Int, Method, param

ACTIVE_SETS = ("global", "batch")
Traces = list[tuple[torch.Tensor, torch.Tensor]]  # (traces, dataset indices) batch by batch


class Scope:
    """Where per-sample Fisher traces are taken, for a method `m` of this module."""
    name: str
    own_pass = False   # the traces need a backward of their own: the method then owns the step's gradients
    unit_mean = False  # the traces are divided by their mean over the training set at calibration

    def step_traces(self, m: "FisherConstrained", logits, h, y) -> torch.Tensor:
        """Differentiable traces from the training step's own forward (scopes without a pass of their own)."""
        raise NotImplementedError(self.name)

    def observe(self, m: "FisherConstrained", h: torch.Tensor) -> None:
        """Called with each constrained step's features before its traces."""

    def calibrate(self, m: "FisherConstrained", model, train_batches) -> Traces:
        """Every training sample's trace, as the training step sees it, in the units the constraint uses."""
        raise NotImplementedError(self.name)

    def model_traces(self, m: "FisherConstrained", model: nn.Module, tracer: Callable[[], ParameterTrace], x,
                     y) -> torch.Tensor:
        """The traces of any model (fim_relative's f_b too) on inputs x, without a graph to its parameters."""
        raise NotImplementedError(self.name)

    def recording(self, tracer: ParameterTrace):
        """Context around a forward whose traces `recorded_traces` then reads."""
        return contextlib.nullcontext((None, None))

    def recorded_traces(self, m: "FisherConstrained", tracer: ParameterTrace, logits, y, saved) -> torch.Tensor:
        """The traces of a forward run inside `recording` (its logits), without a graph to the parameters."""
        raise NotImplementedError(self.name)


class Logits(Scope):
    name = "logits"

    def step_traces(self, m, logits, h, y):
        return logit_trace(logits, y, m.params.fisher)

    def calibrate(self, m, model, train_batches):
        return [(self.step_traces(m, logits, h, y), idx) for logits, h, y, idx in train_batches()]

    def model_traces(self, m, model, tracer, x, y):
        with torch.no_grad():
            return logit_trace(model(x).float(), y, m.params.fisher)

    def recorded_traces(self, m, tracer, logits, y, saved):
        return logit_trace(logits.detach(), y, m.params.fisher)


class LastLayer(Scope):
    name = "last_layer"

    def observe(self, m, h):
        m.feature_scale.lerp_(h.detach().float().pow(2).sum(1).mean() + 1.0, m.FEATURE_EMA)

    def step_traces(self, m, logits, h, y):
        return last_layer_trace(logits, h, y, m.params.fisher) / m.feature_scale

    def calibrate(self, m, model, train_batches):
        batches = list(train_batches())
        m.feature_scale.fill_(torch.cat([h.float().pow(2).sum(1) + 1.0 for _, h, _, _ in batches]).mean())
        return [(self.step_traces(m, logits, h, y), idx) for logits, h, y, idx in batches]


class Full(Scope):
    name, own_pass, unit_mean = "full", True, True

    def calibrate(self, m, model, train_batches):
        traces = [(m.full_trace(model, x, y), idx) for x, y, idx in train_batches(inputs=True)]
        m.trace_scale.fill_(torch.cat([t for t, _ in traces]).mean().clamp(min=1e-12))
        return [(t / m.trace_scale, idx) for t, idx in traces]

    def model_traces(self, m, model, tracer, x, y):
        return tracer().batch_traces(x, y, m.params.fisher)

    def recording(self, tracer):
        return tracer.recording()

    def recorded_traces(self, m, tracer, logits, y, saved):
        return tracer.recorded_traces(logits, y, saved, m.params.fisher, retain_graph=True)


SCOPES: dict[str, Scope] = {s.name: s for s in (Logits(), LastLayer(), Full())}
SCOPE_HELP = ("per-sample Fisher trace over: full = every parameter (the paper's), logits = ||p-e_y||^2, last_layer "
              "= ||p-e_y||^2 (||h||^2+1) scaled by the running mean of ||h||^2+1")


@dataclass
class FIMParams:
    scope: str = param("logits", SCOPE_HELP, choices=tuple(SCOPES))
    fisher: str = param("empirical", "empirical = the label's log-likelihood gradient; expected = averaged over the "
                        "model's own predictive distribution", choices=FISHERS)
    active_set: str = param("batch", "global = the top rho of the training set by each sample's last trace (the "
                            "paper's); batch = the top rho of each batch", choices=ACTIVE_SETS)
    rho: float = param(0.1, "fraction of the samples, by largest trace, that is constrained (active set)", gt=0.0,
                       high=1.0)
    eps_quantile: float = param(0.5, "eps = this quantile of the active-set traces after warm-up", gt=0.0, high=1.0)
    dual_lr: float = param(1.0, "dual ascent step on the normalised slack (T - eps) / eps", gt=0.0)
    warmup_epochs: int = param(1, "epochs of plain ERM before eps is set and the constraints start (>= 1: "
                               "an untrained model's traces say nothing)", low=1)
    lambda_max: float = param(10.0, "upper bound on each multiplier (a guard; the share at the cap is logged)",
                              gt=0.0, high=1e6)  # larger: lambda * T overflows float32 and every trial fails
    fixed_penalty: bool = param(False, "ablation: no dual ascent, every active sample gets lambda_max")


class FisherConstrained(Method):
    Params = FIMParams
    SPACE = {
        "scope": Choice(tuple(SCOPES)),          # default logits
        "rho": Float(0.05, 0.5),                 # default 0.1
        "eps_quantile": Float(0.25, 0.75),       # default 0.5: active samples on both sides of eps
        "dual_lr": Float(0.05, 5.0, log=True),   # default 1
        "warmup_epochs": Int(1, 3),              # default 1
    }
    LOGGED = ("lambda_share", "lambda_enrichment", "at_cap_frac", "at_zero_frac", "violated_frac", "active_accuracy",
              "val_feature_norm", "val_top_class_share")  # the last two: the loop's, collapse shows in them
    card = Card("Ours", "Fisher constraint (the paper)", "the paper", order=2, proposed=True, named=("scope",),
                named_note="(the paper's quantity is the full scope, the trace over every parameter; logits and "
                           "last_layer are cheaper proxies of it)")
    FEATURE_EMA = 0.1  # weight of the newest batch in the running mean of ||h||^2 + 1
    COUNTERS = ("n_active", "n_violated", "n_at_cap", "n_at_zero", "n_overflow", "n_steps", "n_active_correct")
    # buffers (registered in __init__), declared for the type checker
    lam: torch.Tensor
    memory: torch.Tensor
    eps: torch.Tensor
    feature_scale: torch.Tensor
    trace_scale: torch.Tensor
    n_active: torch.Tensor
    n_violated: torch.Tensor
    n_at_cap: torch.Tensor
    n_at_zero: torch.Tensor
    n_overflow: torch.Tensor
    n_steps: torch.Tensor
    n_active_correct: torch.Tensor

    def __init__(self, params: FIMParams, train, **kw):
        super().__init__(params, train, **kw)
        self.scope = SCOPES[params.scope]
        self.register_buffer("lam", torch.zeros(self.n_train))
        self.register_buffer("memory", torch.zeros(self.n_train))  # each sample's trace at its last visit
        self.register_buffer("eps", torch.tensor(float("nan")))
        self.register_buffer("feature_scale", torch.tensor(1.0))
        self.register_buffer("trace_scale", torch.tensor(1.0))  # full scope: mean trace at calibration
        for name in self.COUNTERS:
            self.register_buffer(name, torch.zeros(()))
        self._eps_value = float("nan")  # host copy of eps: no device sync per step
        self._tracer: ParameterTrace | None = None

    @classmethod
    def first_own_epoch(cls, params) -> int:
        return params.warmup_epochs + 1  # the ERM warm-up is not this method

    @classmethod
    def space_for(cls, epochs: int) -> dict:
        w = cls.SPACE["warmup_epochs"]  # leave at least one constrained epoch
        return {**cls.SPACE, "warmup_epochs": Int(w.low, max(min(w.high, epochs - 1), w.low))}

    def load_resume_state(self, state):
        super().load_resume_state(state)
        self._eps_value = float(self.eps)  # the host copy of the restored eps

    @property
    def constrained(self) -> bool:
        return not math.isnan(self._eps_value)

    def tracer(self, model) -> ParameterTrace:
        if self._tracer is None or self._tracer.model is not getattr(model, "_orig_mod", model):
            self._tracer = ParameterTrace(model)
        return self._tracer

    def full_trace(self, model, x, y, stats=None, create_graph=False):
        """Full-scope traces of the batch in calibrated units; stats=None: run the training step's forward
        (train-mode BatchNorm) to take the batch statistics first."""
        tracer = self.tracer(model)
        if stats is None:
            return tracer.batch_traces(x, y, self.params.fisher, create_graph) / self.trace_scale
        return tracer.traces(x, y, stats, self.params.fisher, create_graph) / self.trace_scale

    def per_batch(self, n: int) -> int:
        return max(1, math.ceil(self.params.rho * n))

    def score(self, trace: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """What the active set ranks samples by: the trace itself (a subclass may rank otherwise)."""
        return trace

    def calibration_traces(self, model, train_batches) -> Traces:
        """(traces, dataset indices) over the training set as the training step sees it."""
        return self.scope.calibrate(self, model, train_batches)

    @torch.no_grad()
    def start_epoch(self, epoch, model, train_batches):
        for name in self.COUNTERS:
            getattr(self, name).zero_()
        if epoch != self.params.warmup_epochs or self.constrained:
            return
        # Calibrate on the view the constraint uses: train_batches() is the training step's view of the data.
        traces = self.calibration_traces(model, train_batches)
        every = torch.zeros_like(self.memory)
        for t, idx in traces:
            every[idx] = t.to(every.dtype)
            self.memory[idx] = self.score(t, idx).to(self.memory.dtype)
        if self.params.active_set == "global":
            active = every[self.memory.topk(self.per_batch(self.n_train)).indices]
        else:
            active = torch.cat([t[self.score(t, idx).topk(self.per_batch(len(t))).indices] for t, idx in traces])
        self.eps.fill_(torch.quantile(active.float(), self.params.eps_quantile).clamp(min=1e-8))
        self._eps_value = float(self.eps)

    @torch.no_grad()
    def select(self, trace: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in the batch of the candidates, which of them are active): the active set of the batch."""
        n = len(trace)
        score = self.score(trace, idx).to(self.memory.dtype)  # compared with the memory in its own precision
        self.memory[idx] = score
        if self.params.active_set == "batch":
            top = score.topk(self.per_batch(n)).indices
            return top, torch.ones_like(top, dtype=torch.bool)
        k = self.per_batch(self.n_train)  # the set's threshold: its k-th largest last-visit score
        threshold = self.memory.kthvalue(self.n_train - k + 1).values
        above = score >= threshold
        top = score.topk(min(n, 2 * self.per_batch(n))).indices
        self.n_overflow += (above.sum() - len(top)).clamp(min=0)
        return top, above[top]

    @torch.no_grad()
    def dual_step(self, t_k: torch.Tensor, i_k: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Projected dual ascent on the active samples' multipliers; returns them (0 where inactive)."""
        slack = ((t_k - self.eps) / self.eps).clamp(max=1.0)
        if self.params.fixed_penalty:
            lam = torch.full_like(slack, self.params.lambda_max)
        else:
            lam = (self.lam[i_k] + self.params.dual_lr * slack).clamp(0.0, self.params.lambda_max)
        lam = torch.where(active, lam, self.lam[i_k])
        self.lam[i_k] = lam.to(self.lam.dtype)
        self.n_active += active.sum()
        self.n_violated += (active & (slack > 0)).sum()
        self.n_at_cap += (active & (lam >= self.params.lambda_max)).sum()
        self.n_at_zero += (active & (lam <= 0)).sum()
        self.n_steps += 1
        return torch.where(active, lam, torch.zeros_like(lam))

    def constraint(self, lam, t_k, n: int):
        """The Lagrangian's constraint term of a batch of n samples (t_k: its active samples' traces)."""
        return (lam * (t_k - self.eps)).sum() / self.per_batch(n)

    def penalty(self, model, logits, h, batch, loss):
        if not self.constrained:
            return None, {}
        self.scope.observe(self, h)
        trace = self.scope.step_traces(self, logits, h, batch.y)
        top, active = self.select(trace.detach(), batch.idx)
        t_k = trace[top]
        # Dual step first: a multiplier moves only when its sample is drawn (once per epoch), so a primal step with
        # the old value would always lag an epoch behind.
        lam = self.dual_step(t_k.detach(), batch.idx[top], active)
        self.count_correct(logits, batch.y, top, active)
        penalty = self.constraint(lam, t_k, len(batch.y))
        return penalty, {"penalty": penalty, "trace_active": t_k.detach().mean()}

    def gradients(self, model, batch, autocast):
        if not (self.scope.own_pass and self.constrained):
            return super().gradients(model, batch, autocast)
        x, y, idx = batch.x, batch.y, batch.idx
        tracer = self.tracer(model)
        with tracer.recording() as (stats, saved), autocast():  # the step's own forward, on the eager model
            logits = tracer.model(x)
        nll = F.cross_entropy(logits.float(), y)
        # every sample's trace from the step's forward: one more backward (BatchNorm statistics as constants)
        trace = tracer.recorded_traces(logits, y, saved, self.params.fisher, retain_graph=True) / self.trace_scale
        nll.backward()  # the step's own gradient (train-mode BatchNorm)
        top, active = self.select(trace, idx)
        lam = self.dual_step(trace[top], idx[top], active)
        self.count_correct(logits, y, top, active)
        t_k = self.full_trace(model, x[top], y[top], stats, create_graph=True)  # double backprop on K only
        penalty = self.constraint(lam, t_k, len(y))
        penalty.backward()
        return {"loss": (nll + penalty).detach(), "nll": nll, "penalty": penalty, "trace_active": trace[top].mean()}

    # Without gradient clipping the full scope's first constrained steps (its trace gradient is ~100x the loss's)
    # turned the loss non-finite in epoch 2 at lr 0.05 on 64-px images (a folder of texdigits' images, `cnn`, 2 of 2
    # seeds); at lr 0.005, or clipped at norm 5, it stayed finite (bench/README.md, "numerical safety")
    FULL_SAFE_LR = 0.005

    @classmethod
    def recipe_warning(cls, params, lr, grad_clip):
        if "full" in params.get("scope", ()) and not grad_clip and lr > cls.FULL_SAFE_LR:
            return (f"fim --scope full without gradient clipping at lr up to {lr:g}: its loss turned non-finite at lr "
                    f"0.05 on 64-px images; use --lr {cls.FULL_SAFE_LR:g} or lower, or --grad-clip 5")
        return None

    @torch.no_grad()
    def count_correct(self, logits, y, top, active) -> None:
        """The constrained samples the step's model classifies right: does the constraint fit them or flatten?"""
        self.n_active_correct += ((logits.detach()[top].argmax(1) == y[top]) & active).sum()

    def epoch_stats(self):
        if not self.constrained:
            return {"constrained": False}
        n = self.n_active.clamp(min=1)
        return {
            "constrained": True,
            "eps": float(self.eps),
            "violated_frac": float(self.n_violated / n),
            "at_cap_frac": float(self.n_at_cap / n),
            "at_zero_frac": float(self.n_at_zero / n),
            "active_accuracy": float(self.n_active_correct / n),  # train-mode accuracy of the constrained samples
            "active_per_step": float(self.n_active / self.n_steps.clamp(min=1)),
            "overflow_frac": float(self.n_overflow / (self.n_active + self.n_overflow).clamp(min=1)),
            "lambda_mean": float(self.lam.mean()),
            "lambda_max": float(self.lam.max()),
        }

    def per_sample(self):
        return {"lambda": PerSample(self.lam), "trace": PerSample(self.memory)} if self.constrained else {}

    @classmethod
    def describe(cls, r):
        if not r.get("constrained"):
            return ""
        enr = r.get("lambda_enrichment")
        return (f"violated {r['violated_frac']:.2f} lam mean {r['lambda_mean']:.3f} max {r['lambda_max']:.2f} "
                f"at cap {r['at_cap_frac']:.2f} at 0 {r['at_zero_frac']:.2f} acc {r['active_accuracy']:.2f}"
                f"{'' if enr is None else f' enrichment {enr:.1f}x'}")
