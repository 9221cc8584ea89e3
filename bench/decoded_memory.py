"""Private memory of a worker training over a decoded image split, against the split's size.

For each N, writes a folder dataset of N training images, decodes it once into the cache, then runs
`python -m trainer` for one epoch over it and samples the process's RssAnon (private memory) and RssFile (mapped
files, shared with other processes on the host) every 10 ms. Beside it, the reference: a process that np.loads the
same cache file into private memory (what every worker did before the cache was memory-mapped).

    python bench/decoded_memory.py [--sizes 300 1500] [--image-size 224]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, n_train: int, rng) -> None:
    (root / "images").mkdir(parents=True)
    lines = ["filename,y,a,split"]
    for i in range(n_train + 64):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        split = "train" if i < n_train else ("val" if i < n_train + 32 else "test")
        lines.append(f"images/{i}.png,{i % 2},{(i // 2) % 2},{split}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


def peak_memory(cmd: list[str], env: dict) -> dict:
    """Runs cmd; the peaks of RssAnon and RssFile (MB) sampled from /proc every 10 ms."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}

    def sample():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) // 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{err}")
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 1500])
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()
    if len(args.sizes) < 2:
        raise SystemExit(f"error: --sizes needs two sizes or more (memory growth between them), got {args.sizes}")
    from trainer.data import load_splits
    from trainer.data.decoded import cache_dir

    rows, work = [], Path(tempfile.mkdtemp(prefix="decoded-memory-"))
    env = {**os.environ, "DEBIAS_CACHE_DIR": str(work / "cache"), "PYTHONPATH": str(REPO)}
    os.environ["DEBIAS_CACHE_DIR"] = env["DEBIAS_CACHE_DIR"]
    rng = np.random.default_rng(0)
    for n in args.sizes:
        root = work / f"n{n}"
        write_folder(root, n, rng)
        split = load_splits("folder", data_dir=str(root), image_size=args.image_size).train.x  # warm the cache
        mb = split.numel() / 2**20
        cache_file = max(cache_dir().glob("*.npy"), key=lambda f: f.stat().st_size)
        train = peak_memory([sys.executable, "-m", "trainer", "--dataset", "folder", "--data-dir", str(root),
                             "--model", "cnn_narrow", "--image-size", str(args.image_size), "--epochs", "1",
                             "--batch-size", "64", "--device", "cpu"], env)
        private = peak_memory([sys.executable, "-c", "import numpy as np, sys; "
                               "a = np.load(sys.argv[1]); print(int(a.sum(dtype=np.int64)))", str(cache_file)], env)
        rows.append((n, mb, train, private))
        del split
    print(f"\none epoch of `python -m trainer --dataset folder --model cnn_narrow --image-size {args.image_size}` "
          f"over a warm decoded cache; peaks in MB\n")
    print(f"{'N train':>8} {'split MB':>9} {'trainer RssAnon':>16} {'trainer RssFile':>16} "
          f"{'np.load RssAnon':>16}")
    for n, mb, train, private in rows:
        print(f"{n:>8} {mb:>9.0f} {train['RssAnon']:>16} {train['RssFile']:>16} {private['RssAnon']:>16}")
    (n0, mb0, t0, p0), (n1, mb1, t1, p1) = rows[0], rows[-1]
    print(f"\nfrom N={n0} to N={n1} the split grows {mb1 - mb0:.0f} MB; private memory grows "
          f"{t1['RssAnon'] - t0['RssAnon']} MB in the trainer ({(t1['RssAnon'] - t0['RssAnon']) / (mb1 - mb0):.2f}x "
          f"the split) against {p1['RssAnon'] - p0['RssAnon']} MB with a private np.load "
          f"({(p1['RssAnon'] - p0['RssAnon']) / (mb1 - mb0):.2f}x)")


if __name__ == "__main__":
    main()
