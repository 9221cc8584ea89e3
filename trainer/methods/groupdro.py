"""GroupDRO (Sagawa et al., 2020): exponentiated-gradient ascent on group weights q, loss = sum_g q_g L_g."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Card, Float, Method, param


@dataclass
class GroupDROParams:
    eta_q: float = param(0.01, "step size of the exponentiated-gradient update of the group weights q", gt=0.0)
    adjustment: float = param(0.0, "group size adjustment C: the q update sees L_g + C / sqrt(n_g)", low=0.0)
    balanced: bool = param(True, "sample training batches group-balanced (weight 1/n_g per sample)")


class GroupDRO(Method):
    Params = GroupDROParams
    # buffers (registered in __init__), declared for the type checker
    group_counts: torch.Tensor
    q: torch.Tensor
    SPACE = {
        "eta_q": Float(1e-3, 1.0, log=True),   # default 0.01
        "adjustment": Float(0.0, 4.0),         # default 0 (Sagawa et al. search 0..5)
    }
    group_labels = "train"
    card = Card("DRO", "group robustness", "Sagawa et al., ICLR 2020", order=1, reference=True,
                name_note="DRO is GroupDRO (Sagawa et al., 2020).")

    def __init__(self, params: GroupDROParams, train, **kw):
        super().__init__(params, train, **kw)
        counts = torch.bincount(self.train_group_ids, minlength=self.n_groups).float()
        self.register_buffer("group_counts", counts)
        self.register_buffer("q", torch.full((self.n_groups,), 1.0 / self.n_groups))

    def sampling_weights(self):
        return 1.0 / self.group_counts.clamp(min=1)[self.train_group_ids] if self.params.balanced else None

    def loss(self, logits, h, batch):
        ce, g = F.cross_entropy(logits, batch.y, reduction="none"), batch.g
        assert g is not None  # group_labels = "train"
        zeros = torch.zeros(self.n_groups, device=ce.device)
        n = zeros.scatter_add(0, g, torch.ones_like(ce))  # not bincount: it syncs with the host on CUDA
        group_loss = zeros.scatter_add(0, g, ce) / n.clamp(min=1)
        adjusted = group_loss.detach() + self.params.adjustment / self.group_counts.clamp(min=1).sqrt()
        with torch.no_grad():  # only groups present in the batch move
            self.q.mul_(torch.exp(self.params.eta_q * adjusted * (n > 0)))
            self.q.div_(self.q.sum())
        loss = (self.q * group_loss).sum()
        return loss, {"nll": ce.mean(), "worst_group_loss": group_loss.max()}

    def epoch_stats(self):
        return {"q": [round(v, 4) for v in self.q.tolist()]}

    @classmethod
    def describe(cls, stats):
        return f"q {stats['q']}"
