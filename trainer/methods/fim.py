"""Fisher-information-constrained training ("Ours").

    min_theta mean_i l_i   s.t.  T_i(theta) <= eps  for the samples with the largest trace,

solved through L = mean_i l_i + mean_{i in K} lambda_i (T_i - eps), one multiplier lambda_i >= 0 per training
sample (indexed by dataset index), primal descent on theta and projected dual ascent on the batch's
active set K = top-ceil(rho * B) samples by T:  lambda_i <- clip(lambda_i + eta min((T_i - eps) / eps, 1), 0, lambda_max).

eps is well defined by construction: after `warmup_epochs` (>= 1) of plain ERM, one pass over the training set as the
training step sees it (augmented batches of the training size, BatchNorm in train mode; loop.py restores the
BatchNorm statistics afterwards) takes each batch's active set exactly as training will, and eps is the
`eps_quantile` of those active traces. At the median, half the active samples start feasible and half violated, so
multipliers move both ways from the first constrained step; the normalised slack (T - eps) / eps is then O(1) and
`dual_lr` means the same on every dataset and scope. (The first design set eps to a quantile of *all* traces while
constraining only the top quarter, so nearly every active constraint was violated for good and the multipliers sat
at lambda_max: a fixed penalty in disguise. bench/fim_ablation.py keeps that fixed penalty as a baseline.)

No group labels are used: the per-group share of lambda and its enrichment on bias-conflicting samples are logged
only to show where the constraint mass goes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fisher import SCOPES, last_layer_trace, logit_trace
from .base import Choice, Float, Int, Method, param


@dataclass
class FIMParams:
    scope: str = param("logits", "per-sample Fisher trace: logits = ||p-e_y||^2, last_layer = "
                       "||p-e_y||^2 (||h||^2+1) scaled by the running mean of ||h||^2+1", choices=SCOPES)
    rho: float = param(0.1, "fraction of each batch, by largest trace, that is constrained (active set)")
    eps_quantile: float = param(0.5, "eps = this quantile of the active-set traces after warm-up")
    dual_lr: float = param(1.0, "dual ascent step on the normalised slack (T - eps) / eps")
    warmup_epochs: int = param(1, "epochs of plain ERM before eps is set and the constraints start (>= 1: "
                               "an untrained model's traces say nothing)")
    lambda_max: float = param(10.0, "upper bound on each multiplier (a guard; the share at the cap is logged)")
    fixed_penalty: bool = param(False, "ablation: no dual ascent, every active sample gets lambda_max")


class FisherConstrained(Method):
    Params = FIMParams
    SPACE = {
        "scope": Choice(SCOPES),                 # default logits
        "rho": Float(0.05, 0.5),                 # default 0.1
        "eps_quantile": Float(0.25, 0.75),       # default 0.5: active samples on both sides of eps
        "dual_lr": Float(0.05, 5.0, log=True),   # default 1
        "warmup_epochs": Int(1, 3),              # default 1
    }
    LOGGED = ("lambda_share", "lambda_enrichment", "at_cap_frac", "at_zero_frac", "violated_frac")
    label, order, proposed = "Ours", 2, True
    FEATURE_EMA = 0.1  # weight of the newest batch in the running mean of ||h||^2 + 1
    COUNTERS = ("n_active", "n_violated", "n_at_cap", "n_at_zero")

    def __init__(self, params: FIMParams, **kw):
        super().__init__(params, **kw)
        p = params
        if p.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {p.scope!r}")
        for name, value in (("rho", p.rho), ("eps_quantile", p.eps_quantile)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0.0, 1.0], got {value}")
        for name, value in (("dual_lr", p.dual_lr), ("lambda_max", p.lambda_max)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if p.warmup_epochs < 1:
            raise ValueError(f"warmup_epochs must be >= 1 (eps is calibrated on a trained model), "
                             f"got {p.warmup_epochs}")
        self.register_buffer("lam", torch.zeros(self.n_train))
        self.register_buffer("eps", torch.tensor(float("nan")))
        self.register_buffer("feature_scale", torch.tensor(1.0))
        for name in self.COUNTERS:
            self.register_buffer(name, torch.zeros(()))
        self._eps_value = float("nan")  # host copy of eps: no device sync per step

    @classmethod
    def first_own_epoch(cls, params) -> int:
        return params.warmup_epochs + 1  # the ERM warm-up is not this method

    @classmethod
    def space_for(cls, epochs: int) -> dict:
        w = cls.SPACE["warmup_epochs"]  # leave at least one constrained epoch
        return {**cls.SPACE, "warmup_epochs": Int(w.low, max(min(w.high, epochs - 1), w.low))}

    @property
    def constrained(self) -> bool:
        return not math.isnan(self._eps_value)

    def trace(self, logits, h, y):
        if self.params.scope == "logits":
            return logit_trace(logits, y)
        return last_layer_trace(logits, h, y) / self.feature_scale

    def active(self, trace: torch.Tensor) -> torch.Tensor:
        """Indices (into the batch) of the active set: the top-ceil(rho * B) traces."""
        return trace.detach().topk(max(1, math.ceil(self.params.rho * len(trace)))).indices

    @torch.no_grad()
    def start_epoch(self, epoch, model, train_batches):
        for name in self.COUNTERS:
            getattr(self, name).zero_()
        if epoch != self.params.warmup_epochs or self.constrained:
            return
        # Calibrate on the view the constraint uses: train_batches() is the training step's view of the data.
        batches = list(train_batches())
        if self.params.scope == "last_layer":
            self.feature_scale.fill_(torch.cat([h.float().pow(2).sum(1) + 1.0 for _, h, _, _ in batches]).mean())
        active = [t[self.active(t)] for t in (self.trace(logits, h, y) for logits, h, y, _ in batches)]
        self.eps.fill_(torch.quantile(torch.cat(active).float(), self.params.eps_quantile).clamp(min=1e-8))
        self._eps_value = float(self.eps)

    def loss(self, logits, h, y, g, idx):
        nll = F.cross_entropy(logits, y)
        if not self.constrained:
            return nll, {"nll": nll}
        if self.params.scope == "last_layer":
            self.feature_scale.lerp_(h.detach().float().pow(2).sum(1).mean() + 1.0, self.FEATURE_EMA)
        trace = self.trace(logits, h, y)
        top = self.active(trace)
        t_k, i_k = trace[top], idx[top]
        with torch.no_grad():  # projected dual ascent on the normalised slack, active samples only
            slack = ((t_k.detach() - self.eps) / self.eps).clamp(max=1.0)
            if self.params.fixed_penalty:
                lam = torch.full_like(slack, self.params.lambda_max)
            else:
                lam = (self.lam[i_k] + self.params.dual_lr * slack).clamp(0.0, self.params.lambda_max)
            self.lam[i_k] = lam.to(self.lam.dtype)
            self.n_active += len(top)
            self.n_violated += (slack > 0).sum()
            self.n_at_cap += (lam >= self.params.lambda_max).sum()
            self.n_at_zero += (lam <= 0).sum()
        # Dual step first: a multiplier moves only when its sample is drawn (once per epoch), so a primal step with
        # the old value would always lag an epoch behind.
        penalty = (lam * (t_k - self.eps)).mean()
        return nll + penalty, {"nll": nll, "penalty": penalty, "trace_active": t_k.detach().mean()}

    def epoch_stats(self):
        if not self.constrained:
            return {"constrained": False}
        n = self.n_active.clamp(min=1)
        share = torch.zeros(self.n_groups, device=self.lam.device).scatter_add(0, self.train_groups, self.lam)
        total = float(self.lam.sum())
        return {
            "constrained": True,
            "eps": float(self.eps),
            "violated_frac": float(self.n_violated / n),
            "at_cap_frac": float(self.n_at_cap / n),
            "at_zero_frac": float(self.n_at_zero / n),
            "lambda_mean": float(self.lam.mean()),
            "lambda_max": float(self.lam.max()),
            "lambda_share": [round(v, 4) for v in (share / total if total > 0 else share).tolist()],
            "lambda_enrichment": self.enrichment(self.lam),
        }

    @classmethod
    def describe(cls, r):
        if not r.get("constrained"):
            return ""
        enr = r.get("lambda_enrichment")
        return (f"violated {r['violated_frac']:.2f} lam mean {r['lambda_mean']:.3f} max {r['lambda_max']:.2f} "
                f"at cap {r['at_cap_frac']:.2f} at 0 {r['at_zero_frac']:.2f}"
                f"{'' if enr is None else f' enrichment {enr:.1f}x'}")
