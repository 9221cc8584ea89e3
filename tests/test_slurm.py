"""`python -m study slurm` on a real one-node SLURM cluster (slurm-wlm + munge daemons started here)."""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import study_main
from test_study import init, storage_for

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")
pytestmark = pytest.mark.skipif(not all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS),
                                reason="slurm-wlm and munge are not installed (.ci/run installs them)")


def _run(*cmd, env=None, check=True):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster: this host, its CPUs, no GPU; daemons stopped afterwards."""
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=debiastest
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ReturnToService=2
MpiDefault=none
KillWait=30
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _run("/usr/sbin/slurmctld", "-f", str(conf), env=env)
    _run("/usr/sbin/slurmd", "-f", str(conf), env=env)
    deadline = time.time() + 60
    while "idle" not in _run("sinfo", "-h", "-o", "%t", env=env, check=False) and time.time() < deadline:
        time.sleep(0.5)
    yield env
    _run("scancel", "--full", "-u", "root", env=env, check=False)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((root / pid_file).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def test_job_array_of_two_workers_meets_the_budget_and_scancel_loses_nothing(slurm, pg_url, tmp_path, monkeypatch):
    trials = 3
    init(pg_url, "--experiment", "slurm", "--datasets", "cmnist", "--methods", "erm", "--trials", str(trials),
         "--epochs", "20", "--patience", "0", "--pruner", "none", "--artifacts", str(tmp_path / "models"))
    secret = tmp_path / "storage-url"
    secret.write_text(pg_url + "\n")
    secret.chmod(0o644)
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    logs = tmp_path / "logs"
    args = ["slurm", "--experiment", "slurm", "--workers", "2", "--gpus", "0", "--cpus", "1",
            "--storage-file", str(secret), "--log-dir", str(logs)]
    refused = study_main(*args)  # the file holds a password: refused while others can read it
    assert refused.returncode == 2 and "readable by other users (mode 644): chmod 600" in refused.stderr
    secret.chmod(0o600)
    done = study_main(*args)
    assert done.returncode == 0, done.stderr
    job = done.stdout.split("submitted job array ")[1].split(":")[0]
    script = next(logs.glob("*.sbatch")).read_text()
    assert "--array=0-1" in script and "--requeue" in script and "--gres" not in script
    assert pg_url.split("@")[0] not in script  # no credential in the script

    study = optuna.load_study(study_name="slurm/cmnist/erm", storage=storage_for(pg_url))
    deadline = time.time() + 240
    while time.time() < deadline:  # both array tasks mid-trial: some epochs reported, none finished
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if len(running) == 2 and all(len(t.intermediate_values) >= 2 for t in running):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"two running trials never seen: {study.get_trials(deepcopy=False)}")
    _run("scancel", f"{job}_0")  # SIGTERM to array task 0 in the middle of its trial

    deadline = time.time() + 300
    while _run("squeue", "-h", "-j", job, check=False).strip() and time.time() < deadline:
        time.sleep(1)
    assert not _run("squeue", "-h", "-j", job, check=False).strip(), "the array did not finish"
    trials_now = study.get_trials(deepcopy=False)
    states = [t.state for t in trials_now]
    # the cancelled worker's trial failed with the reason, and its re-queued copy completed in task 1
    failed = [t for t in trials_now if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == "worker stopped by signal"
    retry = [t for t in trials_now if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == failed[0].params
    # ... going on from the state the cancelled task wrote before it exited, in the shared artifact folder
    state = failed[0].user_attrs["resume_state"]
    assert state and retry[0].user_attrs["resumed_from"] == {"trial": failed[0].number, "epoch": state["epoch"]}
    assert sorted(retry[0].intermediate_values) == list(range(1, 21))
    assert states.count(TrialState.COMPLETE) == trials and TrialState.RUNNING not in states
    assert TrialState.WAITING not in states
    log1 = next(logs.glob(f"*-{job}_1.out")).read_text()
    assert "all budgets met" in log1
    log0 = next(logs.glob(f"*-{job}_0.out")).read_text()
    assert "stopped by signal" in log0
