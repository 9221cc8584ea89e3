"""What the full-scope penalty does to a training step: one cmnist run of `fim --scope full`, default recipe.

    python bench/fim_full_probe.py [--seed 0] [--epochs 5] [--lambda-max 10]

Per constrained epoch (medians over its steps): the gradient norm of the step's NLL, of NLL + penalty (before
clipping), the cosine between the gradient of sum_K T_k and that of sum_K nll_k over the active set K (> 0:
descending the traces also fits the active samples), the share of bias-conflicting samples in K, and val WGA and
average at the epoch's end. The step is the method's own; this only measures around it.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from trainer import TrainConfig, fit
from trainer.methods.fim import FisherConstrained
from trainer.metrics import bias_conflicting
from trainer.models import buffers_kept


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lambda-max", type=float, default=10.0)
    args = p.parse_args()
    rows, step = [], FisherConstrained.training_step
    cfg = TrainConfig(dataset="cmnist", method="fim", seed=args.seed, epochs=args.epochs, patience=0,
                      method_params={"scope": "full", "lambda_max": args.lambda_max})
    splits = cfg.resolved().load_splits()
    conflicting = bias_conflicting(splits.train.y, splits.train.a)  # the probe's, not the method's: it reads none

    def norm(model):
        return float(torch.sqrt(sum(q.grad.pow(2).sum() for q in model.parameters() if q.grad is not None)))

    def probed(self, model, optimizer, batch, autocast):
        if not self.constrained:
            return step(self, model, optimizer, batch, autocast)
        x, y, idx = batch.x, batch.y, batch.idx
        tracer, params = self.tracer(model), [q for q in model.parameters() if q.requires_grad]
        with buffers_kept(model):  # the probe's own passes leave the run as it was
            with tracer.recording() as (stats, saved):
                logits = tracer.model(x)
            trace = tracer.recorded_traces(logits, y, saved, retain_graph=True) / self.trace_scale
            top = trace.topk(self.per_batch(len(y))).indices
            nll = F.cross_entropy(logits, y)
            g_nll = torch.autograd.grad(nll, params)
            with tracer._frozen(stats):
                g_fit = torch.autograd.grad(F.cross_entropy(tracer.model(x[top]), y[top], reduction="sum"), params)
            g_tr = torch.autograd.grad(self.full_trace(model, x[top], y[top], stats, create_graph=True).sum(), params)
        flat = [torch.cat([g.flatten() for g in gs]) for gs in (g_nll, g_fit, g_tr)]
        out = step(self, model, optimizer, batch, autocast)
        rows.append({"nll_grad": float(flat[0].norm()), "total_grad": total[0],
                     "cos": float(flat[1] @ flat[2] / (flat[1].norm() * flat[2].norm())),
                     "conflicting": float(conflicting[idx[top].cpu()].float().mean())})
        return out

    total = [0.0]
    clip = FisherConstrained.clip

    def clip_probe(self, model):
        total[0] = norm(model)  # NLL + penalty, before clipping
        return clip(self, model)

    FisherConstrained.training_step, FisherConstrained.clip = probed, clip_probe
    torch.set_num_threads(1)
    epochs = []
    r = fit(cfg, splits=splits,
            callback=lambda e, rec: epochs.append((e, len(rows), rec)), log=None)
    start = 0
    print(f"\nfim --scope full, cmnist seed {args.seed}, lambda_max {args.lambda_max}; medians over each epoch's "
          "steps\n")
    print("| epoch | NLL grad norm | NLL + penalty grad norm | cos(∇Σ_K T, ∇Σ_K nll) | conflicting in K | val WGA "
          "| val avg |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for e, end, rec in epochs:
        seg = rows[start:end]
        start = end
        if not seg:
            print(f"| {e} (warm-up) | | | | | {rec['val_wga']:.3f} | {rec['val_avg_plain']:.3f} |")
            continue
        med = {k: np.median([s[k] for s in seg]) for k in seg[0]}
        print(f"| {e} | {med['nll_grad']:.2f} | {med['total_grad']:.2f} | {med['cos']:+.2f} | "
              f"{np.mean([s['conflicting'] for s in seg]):.2f} | {rec['val_wga']:.3f} | {rec['val_avg_plain']:.3f} |")
    print(f"\ntest WGA {r.test['wga']:.3f}")


if __name__ == "__main__":
    main()
