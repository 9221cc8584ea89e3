"""Six training images of each texdigits group, one row per group (y=0 a=0, y=0 a=1, y=1 a=0, y=1 a=1).

    python bench/texdigits_samples.py [--out bench/figures/texdigits_groups.png]
"""
from __future__ import annotations

import argparse

import torch
import torchvision

from trainer.data import load_splits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/figures/texdigits_groups.png")
    args = p.parse_args()
    train = load_splits("texdigits").train
    rows = [torch.nonzero(train.g == g)[:6, 0] for g in range(train.n_groups)]
    torchvision.utils.save_image(train.x[torch.cat(rows)], args.out, nrow=6, padding=2)
    print(f"wrote {args.out}: rows y=0 a=0 (grass), y=0 a=1 (gravel), y=1 a=0, y=1 a=1")


if __name__ == "__main__":
    main()
