"""Learning from Failure (Nam et al., 2020), as the official code (alinlab/LfF) runs it.

Two models train on the same batches: a biased model f_b with generalized cross-entropy (GCE), which amplifies
its reliance on easy (shortcut) features, and the debiased model f_d — the run's model, the one evaluated — with
cross-entropy weighted by each sample's relative difficulty

    w_i = l~_b,i / (l~_b,i + l~_d,i + 1e-8),  l~_i = EMA_i / max_{j: y_j = y_i} EMA_j

where EMA_i is a per-sample exponential moving average (alpha) of each model's cross-entropy, updated when the
sample is drawn (its first visit sets it), normalised by the class-wise maximum over the whole training set.
GCE is the official `CE * q * p_y^q` (p_y detached), whose gradient is q times that of the paper's
(1 - p_y^q) / q. The biased model has its own optimiser of the run's kind and settings (the official code uses
Adam for both); it learns only through GCE, since the weights are detached. No group labels are used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import PerSample
from .base import Card, Float, Method, param


Q_HELP = "GCE exponent of the biased model (larger: more emphasis on easy samples)"  # fim_relative's q too


@dataclass
class LfFParams:
    q: float = param(0.7, Q_HELP, gt=0.0, high=1.0)
    ema_alpha: float = param(0.7, "per-sample loss EMA decay", low=0.0, lt=1.0)


def gce(logits: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Per-sample generalized cross-entropy as the official code computes it: CE * q * p_y^q, p_y detached."""
    p_y = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    return F.cross_entropy(logits, y, reduction="none") * q * p_y.detach() ** q


class LfF(Method):
    Params = LfFParams
    # buffers (registered in __init__), declared for the type checker
    ema_b: torch.Tensor
    ema_d: torch.Tensor
    seen: torch.Tensor
    weight: torch.Tensor
    biased_hit: torch.Tensor
    SPACE = {"q": Float(0.05, 0.95), "ema_alpha": Float(0.5, 0.99)}  # q: SubpopBench's range; defaults 0.7, 0.7
    card = Card("LfF", "label-free debiasing", "Nam et al., NeurIPS 2020", order=20)
    LOGGED = ("weight_enrichment", "biased_acc_aligned", "biased_acc_conflicting")

    def __init__(self, params: LfFParams, train, **kw):
        super().__init__(params, train, **kw)
        for name in ("ema_b", "ema_d", "seen", "weight"):  # per training sample
            self.register_buffer(name, torch.zeros(self.n_train))
        # this epoch: whether f_b got the sample right (NaN: not drawn yet), to log whether it learns the shortcut
        self.register_buffer("biased_hit", torch.full((self.n_train,), float("nan")))
        self.biased: nn.Module | None = None
        self._ce_b: torch.Tensor | None = None

    def setup(self, ctx):
        self.biased = self.add_auxiliary(ctx)

    def relative_difficulty(self, idx: torch.Tensor) -> torch.Tensor:
        """w for the samples `idx` from the current EMAs, each normalised by its class's maximum."""
        y, scores = self.train_labels, []
        for ema in (self.ema_b, self.ema_d):
            class_max = torch.zeros(self.n_classes, device=ema.device).scatter_reduce(0, y, ema, "amax")
            scores.append(ema[idx] / class_max[y[idx]].clamp(min=1e-12))
        return scores[0] / (scores[0] + scores[1] + 1e-8)

    def auxiliary_loss(self, batch, autocast):
        assert self.biased is not None, "setup() builds it"
        self.biased.train()
        with autocast():
            logits_b = self.biased(batch.x).float()
        self._ce_b = F.cross_entropy(logits_b, batch.y, reduction="none")
        with torch.no_grad():
            self.biased_hit[batch.idx] = (logits_b.argmax(1) == batch.y).float()
        loss_b = gce(logits_b, batch.y, self.params.q).mean()
        return loss_b, {"loss_biased": loss_b}

    def loss(self, logits, h, batch):
        idx, ce_b = batch.idx, self._ce_b
        assert ce_b is not None, "auxiliary_loss() runs first"
        ce_d = F.cross_entropy(logits, batch.y, reduction="none")
        with torch.no_grad():
            alpha = self.params.ema_alpha
            for ema, ce in ((self.ema_b, ce_b), (self.ema_d, ce_d)):
                ema[idx] = alpha * ema[idx] + (1 - alpha * self.seen[idx]) * ce.detach()
            self.seen[idx] = 1.0
            w = self.relative_difficulty(idx)
            self.weight[idx] = w
        return (w * ce_d).mean(), {"nll": ce_d.mean()}

    def start_epoch(self, epoch, model, train_batches):
        self.biased_hit.fill_(float("nan"))

    def epoch_stats(self):
        seen = self.seen > 0
        return {"weight_mean": float(self.weight[seen].mean()) if seen.any() else None}

    def per_sample(self):
        return {"weight": PerSample(self.weight), "biased_acc": PerSample(self.biased_hit, "rate")}

    @classmethod
    def describe(cls, stats):
        enr, aligned, conflicting = (stats.get(k) for k in ("weight_enrichment", "biased_acc_aligned",
                                                             "biased_acc_conflicting"))
        return ("" if aligned is None or conflicting is None else
                f"f_b acc aligned {aligned:.3f} conflicting {conflicting:.3f}") + \
            ("" if enr is None else f" weight enrichment {enr:.1f}x")
