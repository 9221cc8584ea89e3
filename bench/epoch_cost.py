"""Epoch wall time of the training data paths, side by side, on a Waterbirds-size JPEG set written to a temp dir.

    python bench/epoch_cost.py [--device auto] [--pil-workers 4,8]

(a) ours: images decoded once into cached uint8 tensors on the device, crop/flip/normalise batched there;
(b) the reference: a torchvision ImageFolder-style PIL DataLoader (decode + RandomResizedCrop + flip + ToTensor +
    Normalize per item) with N worker processes, pinned memory;
(c) pure forward/backward: the same number of ERM steps on a batch already on the device.
Every path runs the same ERM step (bf16 autocast + channels_last on CUDA); a training epoch is timed after one
warm-up epoch. CUDA: ResNet-50, 4,795 train / 1,199 val images, 224 px, batch 128. CPU: ResNet-18, 480 / 120,
64 px, batch 32. Printed: seconds per epoch and the ratio to (c). Goal: (a) <= 1.15x (c).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from step_cost import sync  # bench/ is on sys.path when a script here runs


def write_image(job):
    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(300, 500)), int(rng.integers(250, 400))  # CUB photos: a few hundred pixels a side
    base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    Image.fromarray(np.clip(np.asarray(base) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_waterbirds(root: Path, n_train: int, n_val: int, n_test: int) -> None:
    """The official layout: metadata.csv (img_id,img_filename,y,split,place,place_filename) + class folders."""
    rows, jobs = ["img_id,img_filename,y,split,place,place_filename"], []
    for i in range(n_train + n_val + n_test):
        split = 0 if i < n_train else 1 if i < n_train + n_val else 2
        y, place = i % 2, (i // 2) % 2
        rel = f"{'001.Black_footed_Albatross' if y else '002.Laysan_Albatross'}/img_{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        jobs.append((root / rel, i))
        rows.append(f"{i + 1},{rel},{y},{split},{place},x/{i}.jpg")
    with Pool(os.cpu_count()) as pool:
        pool.map(write_image, jobs, chunksize=64)
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--pil-workers", default=None, help="comma-separated DataLoader worker counts (default 8; CPU 2)")
    p.add_argument("--train", type=int)
    p.add_argument("--val", type=int)
    args = p.parse_args()

    from trainer.data import load_splits, make_loader
    from trainer.loop import _autocast, _batch, resolve_device
    from trainer.methods import Batch, TrainSplit, get_method
    from trainer.models import build_model

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    model_name, n_train, n_val, size, batch, workers = (
        ("resnet50", 4795, 1199, 224, 128, "8") if cuda else ("resnet18", 480, 120, 64, 32, "2"))
    n_train, n_val = args.train or n_train, args.val or n_val
    workers = [int(w) for w in (args.pil_workers or workers).split(",")]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    autocast = _autocast(device)

    with tempfile.TemporaryDirectory() as tmp:
        root, os.environ["DEBIAS_CACHE_DIR"] = Path(tmp) / "waterbirds", str(Path(tmp) / "cache")
        t0 = time.time()
        write_waterbirds(root, n_train, n_val, n_test=128)
        print(f"wrote {n_train + n_val + 128} JPEGs in {time.time() - t0:.1f}s", flush=True)
        t0 = time.time()
        ours = load_splits("waterbirds", data_dir=str(root), image_size=size)
        decode_s = time.time() - t0
        t0 = time.time()
        load_splits("waterbirds", data_dir=str(root), image_size=size)
        cached_s = time.time() - t0
        print(f"decoded once in {decode_s:.1f}s; loading from the cache {cached_s:.1f}s", flush=True)
        reference = load_splits("waterbirds", data_dir=str(root), image_size=size, decoded=False)

        torch.manual_seed(0)
        model = build_model(model_name, 2, pretrained=False).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        erm = get_method("erm")(get_method("erm").Params(), TrainSplit(ours.train.y, 2, 4)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(x, y, a, idx):
            return erm.training_step(model, opt, Batch(x, y, idx), autocast)

        def timed_epochs(batches, n=2):
            """Seconds of the last of n epochs (the first warms up cudnn and the loader)."""
            for _ in range(n):
                sync(device)
                t0 = time.perf_counter()
                for b in batches():
                    step(*b)
                sync(device)
                seconds = time.perf_counter() - t0
            return seconds

        gen = torch.Generator().manual_seed(0)
        aug = torch.Generator(device=device).manual_seed(0)
        train = ours.train.on(device)
        rows = []

        def ours_batches():
            for x, y, a, idx in make_loader(train, batch, shuffle=True, generator=gen):
                yield _batch(device, x, y, a, idx, channels_last=cuda,
                             transform=lambda t: train.batch_transform(t, train=True, generator=aug))
        rows.append(("(a) ours: decoded, on-device augmentation", timed_epochs(ours_batches)))
        for w in workers:
            loader = make_loader(reference.train, batch, shuffle=True, generator=gen, num_workers=w, pin_memory=cuda)

            def pil_batches(loader=loader):
                for x, y, a, idx in loader:
                    yield _batch(device, x, y, a, idx, channels_last=cuda)
            rows.append((f"(b) PIL DataLoader, {w} workers", timed_epochs(pil_batches)))
            del loader
        x0, y0, a0, i0 = next(iter(ours_batches()))
        steps = math.ceil(n_train / batch)
        rows.append(("(c) forward/backward only", timed_epochs(lambda: ((x0, y0, a0, i0) for _ in range(steps)))))

    pure = rows[-1][1]
    table = pd.DataFrame([{"data path": label, "epoch (s)": round(s, 2), "img/s": round(n_train / s),
                           "ratio to (c)": round(s / pure, 2)} for label, s in rows])
    print(f"\n{name}: {model_name}, {n_train} train images, {size} px, batch {batch}"
          f"{', bf16 autocast, channels_last' if cuda else ''}; one-time decode {decode_s:.1f}s "
          f"(cache hit {cached_s:.1f}s)\n")
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
