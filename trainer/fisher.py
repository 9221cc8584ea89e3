"""Per-sample traces of the empirical Fisher information, T_i = ||grad_theta l_i||^2 for cross-entropy l_i.

For the logits z: dl/dz = p - e_y, so T_i = ||p_i - e_{y_i}||^2.
For the last linear layer (W, b) on features h: dl/dW = (p - e_y) h^T and dl/db = p - e_y, so
T_i = ||p_i - e_{y_i}||^2 * (||h_i||^2 + 1), exact and differentiable by plain autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCOPES = ("logits", "last_layer")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # bf16 activations -> fp32, fp64 stays fp64


def logit_trace(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = at_least_fp32(logits).softmax(1)
    return (p - F.one_hot(y, logits.shape[1]).to(p.dtype)).pow(2).sum(1)


def last_layer_trace(logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logit_trace(logits, y) * (at_least_fp32(h).pow(2).sum(1) + 1.0)
