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

from .base import Float, Method, param


@dataclass
class LfFParams:
    q: float = param(0.7, "GCE exponent of the biased model (larger: more emphasis on easy samples)")
    ema_alpha: float = param(0.7, "per-sample loss EMA decay")


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
    biased_correct: torch.Tensor
    biased_count: torch.Tensor
    SPACE = {"q": Float(0.05, 0.95), "ema_alpha": Float(0.5, 0.99)}  # q: SubpopBench's range; defaults 0.7, 0.7
    label, order = "LfF", 20
    family, cites = "label-free debiasing", "Nam et al., NeurIPS 2020"
    LOGGED = ("weight_enrichment", "biased_acc_aligned", "biased_acc_conflicting")

    def __init__(self, params: LfFParams, **kw):
        super().__init__(params, **kw)
        if not 0 < params.q <= 1:
            raise ValueError(f"q must be in (0, 1], got {params.q}")
        if not 0 <= params.ema_alpha < 1:
            raise ValueError(f"ema_alpha must be in [0, 1), got {params.ema_alpha}")
        for name in ("ema_b", "ema_d", "seen", "weight"):  # per training sample
            self.register_buffer(name, torch.zeros(self.n_train))
        self.register_buffer("biased_correct", torch.zeros(2))  # this epoch: bias-aligned, bias-conflicting
        self.register_buffer("biased_count", torch.zeros(2))
        self.biased: nn.Module | None = None
        self.biased_optimizer: torch.optim.Optimizer | None = None

    def setup(self, ctx):
        if self.train_labels is None:
            raise ValueError("lff needs the training labels (train_labels) for its class-wise normalisation")
        self.n_classes = int(self.train_labels.max()) + 1  # once: no host sync in the step
        self.biased = ctx.new_model()
        self.biased_optimizer = ctx.new_optimizer(self.biased.parameters())

    def relative_difficulty(self, idx: torch.Tensor) -> torch.Tensor:
        """w for the samples `idx` from the current EMAs, each normalised by its class's maximum."""
        y, scores = self.train_labels, []
        assert y is not None, "setup() checks it"
        for ema in (self.ema_b, self.ema_d):
            class_max = torch.zeros(self.n_classes, device=ema.device).scatter_reduce(0, y, ema, "amax")
            scores.append(ema[idx] / class_max[y[idx]].clamp(min=1e-12))
        return scores[0] / (scores[0] + scores[1] + 1e-8)

    def training_step(self, model, optimizer, x, y, a, idx, n_attr, autocast):
        optimizer.zero_grad(set_to_none=True)
        self.biased_optimizer.zero_grad(set_to_none=True)
        self.biased.train()
        with autocast():
            logits_b, logits_d = self.biased(x).float(), model(x).float()
        ce_b = F.cross_entropy(logits_b, y, reduction="none")
        ce_d = F.cross_entropy(logits_d, y, reduction="none")
        with torch.no_grad():
            alpha = self.params.ema_alpha
            for ema, ce in ((self.ema_b, ce_b), (self.ema_d, ce_d)):
                ema[idx] = alpha * ema[idx] + (1 - alpha * self.seen[idx]) * ce.detach()
            self.seen[idx] = 1.0
            w = self.relative_difficulty(idx)
            self.weight[idx] = w
            if self.conflicting is not None:  # logging only: does f_b learn the shortcut?
                c = self.conflicting[idx].long()
                self.biased_correct.scatter_add_(0, c, (logits_b.argmax(1) == y).float())
                self.biased_count.scatter_add_(0, c, torch.ones_like(ce_b))
        loss_b, loss_d = gce(logits_b, y, self.params.q).mean(), (w * ce_d).mean()
        (loss_b + loss_d).backward()
        self.clip(model)
        self.clip(self.biased)
        optimizer.step()
        self.biased_optimizer.step()
        return {"loss": loss_d.detach(), "nll": ce_d.detach().mean(), "loss_biased": loss_b.detach()}

    def start_epoch(self, epoch, model, train_batches):
        self.biased_correct.zero_()
        self.biased_count.zero_()

    def epoch_stats(self):
        acc = (self.biased_correct / self.biased_count.clamp(min=1)).tolist()
        seen = self.seen > 0
        return {"weight_mean": float(self.weight[seen].mean()) if seen.any() else None,
                "weight_enrichment": self.enrichment(self.weight),
                "biased_acc_aligned": round(acc[0], 4), "biased_acc_conflicting": round(acc[1], 4)}

    @classmethod
    def describe(cls, stats):
        enr = stats["weight_enrichment"]
        return (f"f_b acc aligned {stats['biased_acc_aligned']:.3f} conflicting {stats['biased_acc_conflicting']:.3f}"
                f"{'' if enr is None else f' weight enrichment {enr:.1f}x'}")
