"""Fisher-information-constrained training ("Ours").

    min_theta mean_i l_i   s.t.  T_i(theta) <= eps  for the samples with the largest trace,

solved through L = mean_i l_i + mean_{i in K} lambda_i (T_i - eps), one multiplier lambda_i >= 0 per training
sample (indexed by dataset index), primal descent on theta and projected dual ascent on the batch's
active set K = top-ceil(rho * B) samples by T:  lambda_i <- clip(lambda_i + eta (T_i - eps) / eps, 0, lambda_max).
eps is a quantile of the training-set traces after `warmup_epochs` of plain ERM. No group labels are used;
the per-group share of lambda is logged only to show where the constraint mass goes.
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
    rho: float = param(0.25, "fraction of each batch, by largest trace, that is constrained (active set)")
    eps_quantile: float = param(0.3, "eps = this quantile of the training-set traces after warm-up")
    dual_lr: float = param(10.0, "dual ascent step on the normalised slack (T - eps) / eps")
    warmup_epochs: int = param(1, "epochs of plain ERM before eps is set and the constraints start")
    lambda_max: float = param(10.0, "upper bound on each multiplier (guards against divergence)")


class FisherConstrained(Method):
    Params = FIMParams
    SPACE = {
        "scope": Choice(SCOPES),                # default logits
        "rho": Float(0.05, 0.5),                # default 0.25
        "eps_quantile": Float(0.1, 0.9),        # default 0.3
        "dual_lr": Float(1e-2, 20.0, log=True),  # default 10
        "warmup_epochs": Int(0, 3),             # default 1
    }
    uses_group_labels = False
    label, order, proposed = "Ours", 2, True
    FEATURE_EMA = 0.1  # weight of the newest batch in the running mean of ||h||^2 + 1

    def __init__(self, params: FIMParams, **kw):
        super().__init__(params, **kw)
        p = params
        if p.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {p.scope!r}")
        for name, value, lo, hi in (("rho", p.rho, 0.0, 1.0), ("eps_quantile", p.eps_quantile, 0.0, 1.0)):
            if not lo < value <= hi:
                raise ValueError(f"{name} must be in ({lo}, {hi}], got {value}")
        for name, value in (("dual_lr", p.dual_lr), ("lambda_max", p.lambda_max)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if p.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {p.warmup_epochs}")
        self.register_buffer("lam", torch.zeros(self.n_train))
        self.register_buffer("eps", torch.tensor(float("nan")))
        self.register_buffer("feature_scale", torch.tensor(1.0))
        self.register_buffer("n_active", torch.zeros(()))
        self.register_buffer("n_violated", torch.zeros(()))
        self._eps_value = float("nan")  # host copy of eps: no device sync per step

    @classmethod
    def first_own_epoch(cls, params) -> int:
        return params.warmup_epochs + 1  # the ERM warm-up is not this method

    @classmethod
    def space_for(cls, epochs: int) -> dict:
        w = cls.SPACE["warmup_epochs"]  # leave at least one constrained epoch
        return {**cls.SPACE, "warmup_epochs": Int(min(w.low, epochs - 1), max(min(w.high, epochs - 1), 0))}

    @property
    def constrained(self) -> bool:
        return not math.isnan(self._eps_value)

    def trace(self, logits, h, y, update_scale: bool = False):
        if self.params.scope == "logits":
            return logit_trace(logits, y)
        sq = h.detach().float().pow(2).sum(1) + 1.0
        if update_scale:
            self.feature_scale.lerp_(sq.mean(), self.FEATURE_EMA)
        return last_layer_trace(logits, h, y) / self.feature_scale

    @torch.no_grad()
    def start_epoch(self, epoch, model, train_batches):
        self.n_active.zero_()
        self.n_violated.zero_()
        self._eps_value = float(self.eps)
        if epoch != self.params.warmup_epochs or self.constrained:
            return
        # Calibrate eps on the whole training set with the warmed-up model.
        was_training = model.training
        model.eval()
        raw, sq = [], []
        for logits, h, y in train_batches():
            raw.append(logit_trace(logits, y) if self.params.scope == "logits" else last_layer_trace(logits, h, y))
            sq.append(h.float().pow(2).sum(1) + 1.0)
        model.train(was_training)
        traces = torch.cat(raw)
        if self.params.scope == "last_layer":
            self.feature_scale.fill_(torch.cat(sq).mean())
            traces = traces / self.feature_scale
        self.eps.fill_(torch.quantile(traces.float(), self.params.eps_quantile).clamp(min=1e-8))
        self._eps_value = float(self.eps)

    def loss(self, logits, h, y, g, idx):
        nll = F.cross_entropy(logits, y)
        if not self.constrained:
            return nll, {"nll": nll}
        trace = self.trace(logits, h, y, update_scale=True)
        k = max(1, math.ceil(self.params.rho * len(y)))
        top = trace.detach().topk(k).indices
        t_k, i_k = trace[top], idx[top]
        lam = self.lam[i_k]
        penalty = (lam * (t_k - self.eps)).mean()
        with torch.no_grad():  # projected dual ascent on the normalised slack, active samples only
            slack = (t_k.detach() - self.eps) / self.eps
            self.lam[i_k] = (lam + self.params.dual_lr * slack).clamp(0.0, self.params.lambda_max)
            self.n_active += k
            self.n_violated += (slack > 0).sum()
        return nll + penalty, {"nll": nll, "penalty": penalty, "trace_active": t_k.detach().mean()}

    def epoch_stats(self):
        if not self.constrained:
            return {"constrained": False}
        share = torch.zeros(self.n_groups, device=self.lam.device).scatter_add(0, self.train_groups, self.lam)
        total = float(self.lam.sum())
        return {
            "constrained": True,
            "eps": float(self.eps),
            "violated_frac": float(self.n_violated / self.n_active.clamp(min=1)),
            "lambda_mean": float(self.lam.mean()),
            "lambda_max": float(self.lam.max()),
            "lambda_share": [round(v, 4) for v in (share / total if total > 0 else share).tolist()],
        }
