"""Fisher penalty (Jastrzebski et al., 2021): loss = L_B + alpha ||(1/B) sum_i grad CE(f(x_i), yhat_i)||^2 with
yhat_i drawn from the model's own predictive distribution (no gradient through the draw).

Since E_yhat[grad log p(yhat | x)] = 0, the penalty's expectation is mean_i Tr F_i / B: a true-Fisher trace
estimate divided by the batch size, so alpha scales with B. It differs from "Ours", which constrains the
per-sample *empirical* Fisher trace (true labels) of the hardest samples. Computed every `every_k` steps (the paper
saves compute this way); its gradient is a Hessian-vector product through double backprop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fisher import at_least_fp32
from .base import Card, Choice, Float, Method, grad_sq_norm, param, trainable


@dataclass
class FisherPenaltyParams:
    alpha: float = param(0.1, "coefficient of the Fisher penalty", low=0.0)
    every_k: int = param(1, "compute the penalty every k-th step (the others are plain ERM steps)", low=1)


def sampled_label_penalty(logits: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(||grad of the batch-mean CE at labels drawn from softmax(logits)||^2, the drawn labels)."""
    with torch.no_grad():  # Gumbel-max: an exact draw from softmax(logits), with no host sync on CUDA
        u = torch.rand_like(logits, dtype=at_least_fp32(logits).dtype).clamp_(min=1e-12)
        yhat = (at_least_fp32(logits.detach()) - torch.log(-torch.log(u))).argmax(1)
    return grad_sq_norm(F.cross_entropy(at_least_fp32(logits), yhat), params), yhat


class FisherPenalty(Method):
    Params = FisherPenaltyParams
    # buffers (registered in __init__), declared for the type checker
    penalty_sum: torch.Tensor
    penalised: torch.Tensor
    SPACE = {"alpha": Float(1e-3, 10.0, log=True), "every_k": Choice((1, 10))}  # our own ranges; defaults 0.1, 1
    card = Card("Fisher penalty", "flatness", "Jastrzebski et al., ICML 2021", order=11)

    def __init__(self, params: FisherPenaltyParams, train, **kw):
        super().__init__(params, train, **kw)
        self.step = 0
        self.register_buffer("penalty_sum", torch.zeros(()))  # over the epoch's penalised steps
        self.register_buffer("penalised", torch.zeros(()))

    def penalty(self, model, logits, h, batch, loss):
        self.step += 1
        if (self.step - 1) % self.params.every_k:
            return None, {}
        penalty, _ = sampled_label_penalty(logits, trainable(model))
        with torch.no_grad():
            self.penalty_sum += penalty.detach()
            self.penalised += 1
        return self.params.alpha * penalty, {}

    def get_extra_state(self):  # in the state_dict: a resumed run penalises the same steps
        return {"step": self.step}

    def set_extra_state(self, state):
        self.step = state["step"]

    def start_epoch(self, epoch, model, train_batches):
        self.penalty_sum.zero_()
        self.penalised.zero_()

    def epoch_stats(self):
        return {"fisher_penalty": float(self.penalty_sum / self.penalised.clamp(min=1))}

    @classmethod
    def describe(cls, stats):
        return f"penalty {stats['fisher_penalty']:.4f}"
