"""Decoded pairs of latent-space de-biasing on cmnist: originals (top row) and their complements (bottom row).

    python bench/latent_aug_pairs.py [--pairs 10] [--gen-epochs 30] [--out bench/figures/latent_aug_pairs.png]

Runs the method's generator stage (trainer/methods/latent_aug.py, default settings) on cmnist's training split
and writes a PNG: each column one sampled latent z and its complement z' (the attribute score negated, the target
score kept), the two colour channels drawn as red and green; the label both carry is printed per column, with
the hyperplanes' accuracies and the cosine between their normals.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.data import load_splits
from trainer.methods.latent_aug import LatentAugParams, generator_stage


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--out", default="bench/figures/latent_aug_pairs.png")
    p.add_argument("--gen-epochs", type=int, default=LatentAugParams.gen_epochs, help="epochs of VAE training")
    args = p.parse_args()
    torch.set_num_threads(2)
    train = load_splits("cmnist").train
    x, y, a = train.x.float(), train.y.long(), train.a.long()
    stage = generator_stage(x, y, a, LatentAugParams(gen_epochs=args.gen_epochs))
    n, scale = len(stage["y"]) // 2, 8
    cols = range(args.pairs)
    img = Image.new("RGB", (args.pairs * (7 * scale + 6), 2 * (7 * scale + 6) + 16), "white")
    lo, hi = float(stage["x"].min()), float(stage["x"].max())
    for col in cols:
        for row, i in enumerate((col, n + col)):
            v = ((stage["x"][i] - lo) / (hi - lo)).clamp(0, 1)  # channel 0 red, 1 green
            rgb = torch.stack([v[0], v[1], torch.zeros_like(v[0])]).mul(255).byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(rgb).resize((7 * scale, 7 * scale), Image.NEAREST)
            img.paste(tile, (col * (7 * scale + 6) + 3, row * (7 * scale + 6) + 3))
        ImageDraw.Draw(img).text((col * (7 * scale + 6) + 3, 2 * (7 * scale + 6)), f"y={int(stage['y'][col])}",
                                 fill="black")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}: {args.pairs} pairs; latent hyperplanes: target acc {stage['plane_acc_target']:.3f}, "
          f"attribute acc {stage['plane_acc_attribute']:.3f}, cos(w_t, w_a) {stage['planes_cos']:+.3f}; attribute "
          f"score of originals > 0 for {float((stage['a_score'][:n] > 0).float().mean()):.0%}, of complements "
          f"{float((stage['a_score'][n:] > 0).float().mean()):.0%}")


if __name__ == "__main__":
    main()
