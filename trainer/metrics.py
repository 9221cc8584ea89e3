"""Per-group accuracy, worst group, and the two definitions of average accuracy."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_metrics(correct: torch.Tensor, g: torch.Tensor, n_groups: int, train_counts: torch.Tensor,
                  y: torch.Tensor | None = None, n_attr: int | None = None) -> dict:
    """`correct` and `g` per sample. Empty groups are skipped (they have no accuracy). With `n_attr`, each group
    also names its label and attribute (g = y * n_attr + a), so that reports say "y=1, a=0", not "group 2".

    worst_class: the lowest per-class accuracy, from the labels `y` alone (no group label): the attribute-free
    selection metric of SubpopBench.

    avg_plain: plain accuracy over all samples.
    avg_train_weighted: group accuracies weighted by training-set group proportions (Waterbirds convention).
    """
    correct, g = correct.detach().float().cpu(), g.detach().long().cpu()
    counts = torch.bincount(g, minlength=n_groups)
    hits = torch.bincount(g, weights=correct, minlength=n_groups)
    present = counts > 0
    acc = torch.where(present, hits / counts.clamp(min=1), torch.zeros_like(hits))
    w = train_counts.float().cpu() * present
    out = {
        "wga": float(acc[present].min()) if present.any() else float("nan"),
        "avg_plain": float(correct.mean()) if len(correct) else float("nan"),
        "avg_train_weighted": float((acc * w).sum() / w.sum()) if w.sum() > 0 else float("nan"),
        "groups": [{"group": int(i), "acc": float(acc[i]), "count": int(counts[i]),
                    **({"y": int(i) // n_attr, "a": int(i) % n_attr} if n_attr else {})}
                   for i in range(n_groups) if present[i]],
    }
    if y is not None:
        y = y.detach().long().cpu()
        n_y = torch.bincount(y)
        hits_y = torch.bincount(y, weights=correct, minlength=len(n_y))
        out["worst_class"] = float((hits_y[n_y > 0] / n_y[n_y > 0]).min()) if len(y) else float("nan")
    return out


def bias_conflicting(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per sample: is its group bias-conflicting, i.e. does its attribute make its label rarer than the base rate,
    P(y | a) < P(y)? Waterbirds: waterbirds on land, landbirds on water; cmnist: colour disagreeing with the label."""
    y, a = y.long().cpu(), a.long().cpu()
    n_y, n_a = torch.bincount(y), torch.bincount(a)
    n_ya = torch.bincount(y * len(n_a) + a, minlength=len(n_y) * len(n_a)).view(len(n_y), len(n_a))
    return (n_ya[y, a] * len(y) < n_y[y] * n_a[a])


@dataclass(frozen=True)
class PerSample:
    """A method's per-training-sample diagnostic. kind "weight" (non-negative mass: multipliers, sampling or loss
    weights, error indicators): logged as `<name>_share` (its share per group) and `<name>_enrichment` (the share on
    bias-conflicting samples over their share of the training set: 1 = no preference, > 1 = the mass goes to the
    minority groups). kind "rate" (a per-sample mean, NaN where undefined): logged as `<name>_aligned` and
    `<name>_conflicting`, its mean over bias-aligned and over bias-conflicting samples."""
    values: torch.Tensor
    kind: str = "weight"


def enrichment(weights: torch.Tensor, conflicting: torch.Tensor) -> float | None:
    """Share of `weights` on the `conflicting` samples over their share of the samples; None when undefined."""
    if not conflicting.any() or conflicting.all():
        return None
    total = float(weights.sum())
    if total <= 0:
        return None
    return round(float(weights[conflicting].sum()) / total / float(conflicting.float().mean()), 4)


def by_group(stats: dict[str, PerSample], groups: torch.Tensor, conflicting: torch.Tensor,
             n_groups: int) -> dict[str, float | list | None]:
    """The loop's summary of a method's per-sample diagnostics (PerSample) by the training split's groups."""
    out: dict[str, float | list | None] = {}
    for name, s in stats.items():
        v = s.values.detach().float()
        if s.kind == "rate":
            for side, mask in (("aligned", ~conflicting), ("conflicting", conflicting)):
                seen = mask & ~v.isnan()
                out[f"{name}_{side}"] = round(float(v[seen].mean()), 4) if seen.any() else None
            continue
        share = torch.zeros(n_groups, device=v.device).scatter_add(0, groups, v)
        total = float(v.sum())
        out[f"{name}_share"] = [round(x, 4) for x in (share / total if total > 0 else share).tolist()]
        out[f"{name}_enrichment"] = enrichment(v, conflicting)
    return out


@dataclass(frozen=True)
class Selection:
    """A model-selection metric: early stopping, best epoch, pruning, the search objective and the seed phase."""
    key: str                  # key in a split's metrics dict
    uses_group_labels: bool   # whether it reads the val set's group labels
    text: str                 # how captions name it


SELECTIONS = {
    "val_wga": Selection("wga", True, "val worst-group accuracy"),
    "val_worst_class": Selection("worst_class", False, "val worst-class accuracy (no group labels)"),
    "val_avg": Selection("avg_plain", False, "val average accuracy (no group labels)"),
}


def get_selection(name: str) -> Selection:
    if name not in SELECTIONS:
        raise ValueError(f"unknown selection {name!r} (choose from {', '.join(SELECTIONS)})")
    return SELECTIONS[name]


def selection_key(metrics: dict, selection: str) -> tuple[float, float]:
    """What 'better' means, the same rule everywhere: the selection metric, ties broken by plain val average
    (which reads no group label)."""
    return metrics[SELECTIONS[selection].key], metrics["avg_plain"]
