"""Deep Feature Reweighting, DFR^Val_Tr (Kirichenko et al., 2023), as the reference script runs it.

Stage 1 is the trial's own ERM run, its checkpoint selected by the experiment's rule (the reference takes the
final ERM checkpoint; selection here reads only what the experiment's selection metric reads). Then the last layer
is re-fit on the validation split's features (eval mode), with its group labels:
- tune: the validation set is split in halves by the training seed; on half A, a group-balanced subsample (every
  group cut to the smallest), standardised by a scaler fit on it; an L1 logistic regression (liblinear) for each
  C of the grid; C = the one with the best worst-group accuracy on half B;
- refit: `refits` times, an L1 logistic regression with that C on a group-balanced subsample of the whole
  validation set (scaler fit on the validation features, as the newer reference repository does); coefficients
  and intercepts averaged, and written into the model's head (the scaler folded in).
The val metrics DFR reports to the study (objective, table) are those of the half-A head on half B, which that head
never saw: the head that is tested was fit on all of val, so its own val accuracy would be a training accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import Card, HeldOut, Method, param


@dataclass
class DFRParams:
    c_grid: str = param("1,0.7,0.3,0.1,0.07,0.03,0.01", "comma-separated inverse L1 strengths C tried on the "
                        "held-out half (the reference script's Waterbirds grid)", validate=lambda t: parse_grid(t))
    refits: int = param(20, "group-balanced refits on the whole validation set, averaged", low=1)


def parse_grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(c) for c in str(text).split(","))
    except ValueError:
        grid = ()
    if not grid or not all(c > 0 for c in grid):
        raise ValueError(f"must be comma-separated numbers > 0, got {text!r}")
    return grid


def balanced(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a group-balanced subsample: every group present cut to the smallest one's size."""
    groups = np.unique(g)
    n = min(int((g == k).sum()) for k in groups)
    return np.concatenate([rng.choice(np.flatnonzero(g == k), n, replace=False) for k in groups])


def fit_head(h: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(h)
    lr = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", random_state=seed).fit(scaler.transform(h), y)
    return scaler, lr


def tune(h: np.ndarray, y: np.ndarray, g: np.ndarray, a_half: np.ndarray, b_half: np.ndarray, c_grid, seed: int):
    """For each C: the head fit on a balanced subsample of half A, and its worst-group accuracy on half B.
    Returns (best C, its B-half predictions, {C: worst-group accuracy})."""
    rng = np.random.default_rng(seed)
    fit_idx = a_half[balanced(g[a_half], rng)]
    scores, preds = {}, {}
    for c in c_grid:
        scaler, lr = fit_head(h[fit_idx], y[fit_idx], c, seed)
        preds[c] = lr.predict(scaler.transform(h[b_half]))
        correct = preds[c] == y[b_half]
        scores[c] = min(correct[g[b_half] == k].mean() for k in np.unique(g[b_half]))
    best = max(c_grid, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    return best, preds[best], scores


class DFR(Method):
    Params = DFRParams
    group_labels = "val"
    card = Card("DFR", "last-layer retraining", "Kirichenko et al., ICLR 2023", order=50,
                val_note="DFR: its val is the worst-group accuracy on a held-out half of val of the head fit on the "
                         "other half; the tested head is re-fit on all of val.")

    def __init__(self, params: DFRParams, train, **kw):
        super().__init__(params, train, **kw)
        self.c_grid = parse_grid(params.c_grid)
        self.chosen_c = None

    @torch.no_grad()
    def after_fit(self, model, val_batches):
        batches = list(val_batches())
        h = torch.cat([b[1] for b in batches]).double().cpu().numpy()
        y = torch.cat([b[2] for b in batches]).cpu().numpy()
        g = torch.cat([b[3] for b in batches]).cpu().numpy()  # group_labels = "val": the val split's groups
        n_classes = batches[0][0].shape[1]
        seed = int(torch.randint(2**31, ()))  # from the training seed (the loop seeds the global generator)
        order = np.random.default_rng(seed).permutation(len(y))
        a_half, b_half = order[len(y) // 2:], order[:len(y) // 2]
        self.chosen_c, pred_b, self.scores = tune(h, y, g, a_half, b_half, self.c_grid, seed)
        # the tested head: refits on balanced subsamples of all of val, averaged, the scaler folded in
        rng = np.random.default_rng(seed + 1)
        from sklearn.preprocessing import StandardScaler
        scaler = StandardScaler().fit(h)
        coefs, intercepts = [], []
        for _ in range(self.params.refits):
            idx = balanced(g, rng)
            _, lr = fit_head(h[idx], y[idx], self.chosen_c, seed)
            coefs.append(lr.coef_)
            intercepts.append(lr.intercept_)
        w, b = np.mean(coefs, 0) / scaler.scale_, np.mean(intercepts, 0)
        b = b - w @ scaler.mean_
        if n_classes == 2:  # one decision function: logit of class 1 against a zero for class 0
            w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
        head = model.head
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
        return HeldOut(torch.as_tensor(pred_b == y[b_half]), torch.as_tensor(g[b_half]), torch.as_tensor(y[b_half]))

