"""Workers on one host share the decoded cache: built once on a cold start, mapped (not copied) by every process."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import write_image

# Both processes wait for a go file (a simultaneous cold start), count the images they decode themselves, touch
# every pixel of the training split, and read their own memory once both have touched it.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
here, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def rss_anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))

def wait_for(name):
    while not (here / name).exists():
        time.sleep(0.01)

import pandas, torchvision  # imported where metadata is read and an image decoded: their memory is not the split's
import trainer.data.decoded as decoded
from trainer.data import load_splits
calls = []
real = decoded.decode_one
def counting(path, size):
    calls.append(path)
    time.sleep(0.005)  # widen the window in which the other process could start a second decode
    return real(path, size)
decoded.decode_one = counting
(here / f"started_{me}").touch()
wait_for("go")
before = rss_anon()
s = load_splits("folder", data_dir=str(here / "data"), image_size=224)
total = int(s.train.x.sum())  # every page of the training split read
(here / f"ready_{me}").touch()
wait_for(f"ready_{other}")
cache = Path(os.environ["DEBIAS_CACHE_DIR"])
mapping, key = {}, None
for line in open("/proc/self/smaps"):
    parts = line.split()
    if not parts[0].endswith(":"):
        key = parts[-1] if len(parts) >= 6 else None
    elif key and key.startswith(str(cache)) and parts[0] in ("Rss:", "Shared_Clean:", "Shared_Dirty:"):
        mapping.setdefault(key, {}).setdefault(parts[0][:-1], 0)
        mapping[key][parts[0][:-1]] += int(parts[1]) * 1024
print(json.dumps({"decoded": [str(c) for c in calls], "anon_growth": rss_anon() - before, "nbytes": s.train.x.numel(),
                  "train_file_maps": mapping, "sum": total}))
(here / f"done_{me}").touch()
wait_for(f"done_{other}")
"""


def test_two_workers_build_the_cache_once_and_share_it(tmp_path):
    rng = np.random.default_rng(0)
    n_train, lines = 400, ["filename,y,a,split"]
    for i in range(n_train + 20):
        write_image(tmp_path / "data" / "images" / f"{i}.png", rng, size=32)
        split = "train" if i < n_train else ("val" if i < n_train + 10 else "test")
        lines.append(f"images/{i}.png,{i % 2},{(i // 2) % 2},{split}")
    (tmp_path / "data" / "metadata.csv").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "DEBIAS_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), me, other], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for me, other in (("a", "b"), ("b", "a"))]
    import time
    deadline = time.time() + 120
    while not all((tmp_path / f"started_{m}").exists() for m in "ab") and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    # every image decoded exactly once on the host: for each split one process decoded, the other waited on the
    # split's lock and mapped the result
    decoded = out[0]["decoded"] + out[1]["decoded"]
    assert len(decoded) == len(set(decoded)) == n_train + 20
    nbytes = out[0]["nbytes"]
    assert nbytes == n_train * 3 * 256 * 256 and out[0]["sum"] == out[1]["sum"]
    for o in out:
        train_map = max(o["train_file_maps"].values(), key=lambda m: m["Rss"])  # the training split's file
        # its pages are resident and mapped by both processes (page-cache pages: "dirty" until written back to the
        # disk, never copied), and the process's private (anonymous) memory did not grow by a copy of the split
        assert train_map["Shared_Clean"] + train_map["Shared_Dirty"] >= 0.9 * nbytes, o
        assert o["anon_growth"] < 0.25 * nbytes, o


def test_a_cache_folder_that_cannot_be_written_costs_a_private_decode_only(tmp_path, folder_dir, monkeypatch):
    from trainer.data import load_splits
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(blocker / "cache"))  # cannot be created, even by root
    s = load_splits("folder", data_dir=str(folder_dir), image_size=16)
    assert len(s.train) == 8 and s.train.x.shape == (8, 3, 18, 18) and int(s.train.x.sum()) > 0
