"""Every bench/ script runs: each with its smallest settings, as `python bench/NAME.py ARGS` runs it (`runpy` with the
script as `__main__` and bench/ on the path), several in one process so that torch is imported once per group."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"

# the smallest settings of each script: every code path of its default run, on the least data and time
SMALLEST = {
    "artifact_cost.py": ["--epochs", "1", "--repeats", "1", "--datasets", "cmnist", "--no-resnet"],
    "decoded_memory.py": ["--sizes", "8", "16", "--image-size", "16"],
    "epoch_cost.py": ["--device", "cpu", "--pil-workers", "0", "--train", "32", "--val", "16"],
    "fim_ablation.py": ["--seeds", "2", "--epochs", "2", "--jobs", "1"],
    "fim_collapse.py": ["--seeds", "1", "--jobs", "1", "--caps", "1e-30", "--epochs", "2"],
    "fim_full_probe.py": ["--epochs", "2"],
    "fim_scopes.py": ["--seeds", "2", "--epochs", "2", "--jobs", "1", "--sizes", "7", "--only",
                      "ERM;GroupDRO;Ours (logits)"],
    "latent_aug_pairs.py": ["--pairs", "2", "--gen-epochs", "1", "--out", "{tmp}/pairs.png"],
    "method_fingerprint.py": ["--epochs", "2", "--datasets", "cmnist", "--only", "erm,lff", "--save",
                              "{tmp}/runs.json"],
    "methods_cmnist.py": ["--seeds", "1", "--epochs", "2", "--jobs", "1", "--only", "erm,groupdro"],
    "pretrained.py": ["--datasets", "cmnist", "--trials", "1", "--top-k", "1", "--seeds", "2", "--workers", "0",
                      "--epochs", "2", "--methods", "erm,groupdro", "--scopes", "logits", "--dir",
                      "{tmp}/pretrained"],
    "pruning.py": ["--method", "erm", "--trials", "2", "--epochs", "2"],
    # every method's row (a crash in one row is what this catches), on tiny batches
    "step_cost.py": ["--steps", "1", "--rounds", "1", "--batch", "8", "--image-size", "16", "--n-train", "64"],
    "texdigits_samples.py": ["--out", "{tmp}/groups.png"],
    "trial_cost.py": ["--epochs", "1", "--repeats", "1", "--only", "bundled"],
}
# two groups of about equal time, one process each; fim_full_probe patches the method class it probes: last
GROUPS = {"training": ["fim_ablation.py", "fim_scopes.py", "methods_cmnist.py", "method_fingerprint.py", "pruning.py",
                       "fim_collapse.py", "fim_full_probe.py"],
          "cost and figures": ["artifact_cost.py", "decoded_memory.py", "epoch_cost.py", "latent_aug_pairs.py",
                               "step_cost.py", "texdigits_samples.py", "trial_cost.py", "pretrained.py"]}

# Runs each script as its own command line would, one after another; what a script changes in the process (the
# environment, torch's thread count) is put back before the next. One JSON line per script on the real stdout.
RUNNER = r"""
import contextlib, io, json, os, runpy, sys, time, traceback
import torch
bench, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, bench)
real_stdout = sys.stdout
for script, args in jobs:
    env, threads, out, t0 = dict(os.environ), torch.get_num_threads(), io.StringIO(), time.perf_counter()
    sys.argv = [os.path.join(bench, script), *args]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if rc:
            print(f"{script}: {e.code}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    print(json.dumps({"script": script, "rc": rc, "stdout": out.getvalue()[-2000:],
                      "seconds": round(time.perf_counter() - t0, 1)}), file=real_stdout, flush=True)
"""


def test_every_bench_script_is_run_here():
    assert {p.name for p in BENCH.glob("*.py")} == set(SMALLEST) == {s for g in GROUPS.values() for s in g}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_bench_scripts_run(group, tmp_path):
    jobs = [(s, [a.format(tmp=tmp_path) for a in SMALLEST[s]]) for s in GROUPS[group]]
    env = {**os.environ, "DEBIAS_CACHE_DIR": os.environ.get("DEBIAS_CACHE_DIR", str(tmp_path / "cache")),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH.parent)}
    p = subprocess.run([sys.executable, "-c", RUNNER, str(BENCH), json.dumps(jobs)], capture_output=True, text=True,
                       env=env, timeout=900, cwd=tmp_path)
    done = {r["script"]: r for r in map(json.loads, (line for line in p.stdout.splitlines() if line.startswith("{")))}
    for script in GROUPS[group]:
        assert script in done, f"{script} did not finish: {p.stderr[-4000:]}"
        assert done[script]["rc"] == 0, f"{script} exited {done[script]['rc']}: {p.stderr[-4000:]}"
        assert done[script]["stdout"].strip(), f"{script} printed no result"
