"""Explicit gradient regularisation (Barrett & Dherin, 2021): loss = L_B + mu ||grad L_B||^2, true labels.

The penalty is the squared norm of the batch-mean gradient (not the mean of per-sample squared norms: it includes
how the samples' gradients align), in the ||grad L||^2 convention: mu is not divided by the number of parameters.
Its gradient, 2 mu H grad L_B, comes from double backprop. With BatchNorm in train mode the penalty depends on the
batch statistics, like the loss itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import Float, Method, grad_sq_norm, param, trainable


@dataclass
class EGRParams:
    mu: float = param(0.01, "coefficient of ||grad L_B||^2")


class EGR(Method):
    Params = EGRParams
    SPACE = {"mu": Float(1e-4, 1.0, log=True)}  # our own range (no anchor suite runs EGR); default 0.01
    label, order = "EGR", 12
    family, cites = "flatness", "Barrett & Dherin, ICLR 2021"

    def __init__(self, params: EGRParams, **kw):
        super().__init__(params, **kw)
        if not params.mu >= 0:
            raise ValueError(f"mu must be >= 0, got {params.mu}")

    def training_step(self, model, optimizer, x, y, a, idx, n_attr, autocast):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
        nll = F.cross_entropy(logits.float(), y)
        penalty = grad_sq_norm(nll, trainable(model))
        loss = nll + self.params.mu * penalty
        loss.backward()
        self.clip(model)
        optimizer.step()
        return {"loss": loss.detach(), "nll": nll.detach(), "grad_sq_norm": penalty.detach()}
