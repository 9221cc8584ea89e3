"""Sharpness-aware minimisation (Foret et al., 2021) and adaptive SAM (Kwon et al., 2021).

    g = grad L_B(w);  eps = rho T^2 g / ||T g||  (SAM: T = I; ASAM: T = diag|w|);  g' = grad L_B(w + eps)
    w <- base_optimizer(w, g')

as davda54/sam runs it: two forward/backward passes on the same batch; weight decay stays in the base optimiser
(SGD's weight_decay), so it is not part of the perturbation (google-research/sam puts L2 in the loss instead).
BatchNorm's running statistics come from the first pass only (the second pass normalises with its own batch
statistics, as any train-mode forward does, and its running-statistic update is undone), as in google-research/sam.
No GradScaler: on CUDA the run's autocast is bf16, whose range needs no loss scaling.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import cast

import torch
import torch.nn.functional as F

from ..fisher import at_least_fp32
from ..models import buffers_kept
from .base import Float, Method, param


@dataclass
class SAMParams:
    rho: float = param(0.05, "radius of the weight perturbation (ASAM needs ~10x larger, e.g. 0.5-2)")
    adaptive: bool = param(False, "adaptive SAM: perturbation scaled by |w| (scale-invariant sharpness)")


def perturbation(params: list[torch.Tensor], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """eps for each parameter from its .grad: ||eps|| = rho (ASAM: ||eps / |w| || = rho)."""
    grads = [cast(torch.Tensor, p.grad) for p in params]  # the caller's backward filled them
    scaled = [at_least_fp32(p.abs() * g if adaptive else g) for p, g in zip(params, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = rho / (norm + 1e-12)
    return [((p.abs() if adaptive else 1.0) * s * scale).to(p.dtype) for p, s in zip(params, scaled)]


class SAM(Method):
    Params = SAMParams
    SPACE = {"rho": Float(0.01, 0.5, log=True)}  # our own range (no anchor suite runs SAM); default 0.05
    label, order = "SAM", 10
    family, cites = "flatness", "Foret et al., ICLR 2021; ASAM: Kwon et al., ICML 2021"

    def __init__(self, params: SAMParams, **kw):
        super().__init__(params, **kw)
        if not params.rho > 0:
            raise ValueError(f"rho must be > 0, got {params.rho}")

    def training_step(self, model, optimizer, x, y, a, idx, n_attr, autocast):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            eps = perturbation(params, self.params.rho, self.params.adaptive)
            w = [p.detach().clone() for p in params]  # restored exactly: (w + eps) - eps is not w in floating point
            torch._foreach_add_(params, eps)
        optimizer.zero_grad(set_to_none=True)
        with buffers_kept(model):  # BatchNorm statistics from the first pass only (restored after the backward,
            with autocast():       # which reads the running-statistic tensors' versions)
                perturbed = F.cross_entropy(model(x).float(), y)
            perturbed.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, w)  # back at w: the base optimiser steps from w with grad L(w + eps)
        self.clip(model)
        optimizer.step()
        # the loop averages every step log over the epoch (train_sharpness, train_loss_perturbed in the history)
        return {"loss": loss.detach(), "nll": loss.detach(), "loss_perturbed": perturbed.detach(),
                "sharpness": perturbed.detach() - loss.detach()}

    @classmethod
    def describe(cls, stats):
        return f"L(w+eps)-L(w) {stats['train_sharpness']:.4f}"
