"""Every bench/ script runs: each with its smallest settings, as a user would start it (`python bench/NAME.py`)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"

# the smallest settings of each script: every code path of its default run, on the least data and time
SMALLEST = {
    "decoded_memory.py": ["--sizes", "8", "16", "--image-size", "16"],
    "epoch_cost.py": ["--device", "cpu", "--pil-workers", "0", "--train", "32", "--val", "16"],
    "fim_ablation.py": ["--seeds", "2", "--epochs", "2", "--jobs", "1"],
    "fim_full_probe.py": ["--epochs", "2"],
    "fim_scopes.py": ["--seeds", "2", "--epochs", "2", "--jobs", "1", "--sizes", "7", "--only",
                      "ERM;GroupDRO;Ours (logits)"],
    "latent_aug_pairs.py": ["--pairs", "2", "--gen-epochs", "1", "--out", "{tmp}/pairs.png"],
    "method_fingerprint.py": ["--epochs", "2", "--datasets", "cmnist", "--only", "erm,lff", "--save",
                              "{tmp}/runs.json"],
    "methods_cmnist.py": ["--seeds", "1", "--epochs", "2", "--jobs", "1", "--only", "erm,groupdro"],
    "pruning.py": ["--method", "erm", "--trials", "2", "--epochs", "2"],
    # every method's row (a crash in one row is what this catches), on tiny batches
    "step_cost.py": ["--steps", "1", "--rounds", "1", "--batch", "8", "--image-size", "16", "--n-train", "64"],
    "texdigits_samples.py": ["--out", "{tmp}/groups.png"],
    "trial_cost.py": ["--epochs", "1", "--repeats", "1", "--only", "bundled"],
}


def test_every_bench_script_is_run_here():
    assert {p.name for p in BENCH.glob("*.py")} == set(SMALLEST)


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_bench_script_runs(script, tmp_path):
    args = [a.format(tmp=tmp_path) for a in SMALLEST[script]]
    env = {**os.environ, "DEBIAS_CACHE_DIR": os.environ.get("DEBIAS_CACHE_DIR", str(tmp_path / "cache")),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.strip(), "a bench script prints its result"
