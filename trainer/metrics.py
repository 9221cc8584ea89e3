"""Per-group accuracy, worst group, and the two definitions of average accuracy."""
from __future__ import annotations

import torch


def group_metrics(correct: torch.Tensor, g: torch.Tensor, n_groups: int, train_counts: torch.Tensor) -> dict:
    """`correct` and `g` per sample. Empty groups are skipped (they have no accuracy).

    avg_plain: plain accuracy over all samples.
    avg_train_weighted: group accuracies weighted by training-set group proportions (Waterbirds convention).
    """
    correct, g = correct.detach().float().cpu(), g.detach().long().cpu()
    counts = torch.bincount(g, minlength=n_groups)
    hits = torch.bincount(g, weights=correct, minlength=n_groups)
    present = counts > 0
    acc = torch.where(present, hits / counts.clamp(min=1), torch.zeros_like(hits))
    w = train_counts.float().cpu() * present
    return {
        "wga": float(acc[present].min()) if present.any() else float("nan"),
        "avg_plain": float(correct.mean()) if len(correct) else float("nan"),
        "avg_train_weighted": float((acc * w).sum() / w.sum()) if w.sum() > 0 else float("nan"),
        "groups": [{"group": int(i), "acc": float(acc[i]), "count": int(counts[i])}
                   for i in range(n_groups) if present[i]],
    }
