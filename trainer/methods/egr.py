"""Explicit gradient regularisation (Barrett & Dherin, 2021): loss = L_B + mu ||grad L_B||^2, true labels.

The penalty is the squared norm of the batch-mean gradient (not the mean of per-sample squared norms: it includes
how the samples' gradients align), in the ||grad L||^2 convention: mu is not divided by the number of parameters.
Its gradient, 2 mu H grad L_B, comes from double backprop. With BatchNorm in train mode the penalty depends on the
batch statistics, like the loss itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Card, Float, Method, grad_sq_norm, param, trainable


@dataclass
class EGRParams:
    mu: float = param(0.01, "coefficient of ||grad L_B||^2", low=0.0)


class EGR(Method):
    Params = EGRParams
    SPACE = {"mu": Float(1e-4, 1.0, log=True)}  # our own range (no anchor suite runs EGR); default 0.01
    card = Card("EGR", "flatness", "Barrett & Dherin, ICLR 2021", order=12)

    def penalty(self, model, logits, h, batch, loss):
        norm = grad_sq_norm(loss, trainable(model))
        return self.params.mu * norm, {"grad_sq_norm": norm}
