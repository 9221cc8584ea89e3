"""Sharpness-aware minimisation (Foret et al., 2021) and adaptive SAM (Kwon et al., 2021).

    g = grad L_B(w);  eps = r T^2 g / ||T g||  (SAM: T = I; ASAM: T = diag|w|);  g' = grad L_B(w + eps)
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
from .base import Card, Float, Method, param


@dataclass
class SAMParams:
    # the papers call it rho; named radius here, since Ours' rho is its active fraction
    radius: float = param(0.05, "radius of the weight perturbation (ASAM needs ~10x larger, e.g. 0.5-2)", gt=0.0)
    adaptive: bool = param(False, "adaptive SAM: perturbation scaled by |w| (scale-invariant sharpness)")


def perturbation(params: list[torch.Tensor], radius: float, adaptive: bool) -> list[torch.Tensor]:
    """eps for each parameter from its .grad: ||eps|| = radius (ASAM: ||eps / |w| || = radius)."""
    grads = [cast(torch.Tensor, p.grad) for p in params]  # the caller's backward filled them
    scaled = [at_least_fp32(p.abs() * g if adaptive else g) for p, g in zip(params, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = radius / (norm + 1e-12)
    return [((p.abs() if adaptive else 1.0) * s * scale).to(p.dtype) for p, s in zip(params, scaled)]


class SAM(Method):
    Params = SAMParams
    SPACE = {"radius": Float(0.01, 0.5, log=True)}  # our own range (no anchor suite runs SAM); default 0.05
    card = Card("SAM", "flatness", "Foret et al., ICLR 2021; ASAM: Kwon et al., ICML 2021", order=10)

    def gradients(self, model, batch, autocast):  # two passes on one batch: the step is not one loss's gradient
        x, y = batch.x, batch.y
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            eps = perturbation(params, self.params.radius, self.params.adaptive)
            w = [p.detach().clone() for p in params]  # restored exactly: (w + eps) - eps is not w in floating point
            torch._foreach_add_(params, eps)
        model.zero_grad(set_to_none=True)
        with buffers_kept(model):  # BatchNorm statistics from the first pass only (restored after the backward,
            with autocast():       # which reads the running-statistic tensors' versions)
                perturbed = F.cross_entropy(model(x).float(), y)
            perturbed.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, w)  # back at w: the base optimiser steps from w with grad L(w + eps)
        # the loop averages every step log over the epoch (train_sharpness, train_loss_perturbed in the history)
        return {"loss": loss, "nll": loss, "loss_perturbed": perturbed, "sharpness": perturbed.detach() - loss.detach()}

    @classmethod
    def describe(cls, stats):
        return f"L(w+eps)-L(w) {stats['train_sharpness']:.4f}"
