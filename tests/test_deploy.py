"""The deployment files: Dockerfile (hadolint), docker-compose.yml (structure), and what the stack runs, as real
local processes against the test PostgreSQL (no Docker engine runs here)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import study_main


ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def interpolate(value, env: dict):
    """Compose variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, and $$ for a literal $."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value.replace("$$", "\0")).replace("\0", "$")


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    p = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base)  # pinned, CUDA runtime
    assert text.index("requirements.txt") < text.index("COPY trainer")  # dependency layer before the source
    assert re.search(r"^USER 1000", text, re.M) and 'ENTRYPOINT ["python", "-m", "study"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "*.db"} <= set(ignored)


def test_compose_services_and_their_wiring():
    assert {"db", "init", "worker", "dashboard", "report"} <= set(SERVICES)
    db = SERVICES["db"]
    assert re.fullmatch(r"postgres:\d+", db["image"]) and "ports" not in db  # pinned major; never published
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(v.startswith("pgdata:") for v in db["volumes"]) and "pgdata" in COMPOSE["volumes"]
    assert ":?" in db["environment"]["POSTGRES_PASSWORD"]  # no default password: it must come from .env
    assert SERVICES["init"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    worker = SERVICES["worker"]
    assert worker["depends_on"] == {"db": {"condition": "service_healthy"},
                                    "init": {"condition": "service_completed_successfully"}}
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and worker["restart"] == "on-failure"
    assert any(v.endswith(":/data:ro") for v in worker["volumes"])  # data read-only
    assert SERVICES["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    assert SERVICES["report"]["profiles"] == ["report"] and any(":/reports" in v for v in SERVICES["report"]["volumes"])
    for name in ("init", "worker", "dashboard", "report"):  # the password as libpq's PGPASSWORD, not in the URL
        assert SERVICES[name]["environment"]["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
        assert "POSTGRES_PASSWORD" not in SERVICES[name]["environment"]["OPTUNA_STORAGE"]
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text())) - {"REPORT_USER"}
    assert used <= set(example), used - set(example)  # every variable is documented
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert interpolate(SERVICES["worker"]["environment"]["OPTUNA_STORAGE"], {"POSTGRES_PASSWORD": "p"}) == \
        "postgresql://optuna@db:5432/optuna"  # the stack's own database unless DB_HOST says otherwise
    public = yaml.safe_load((ROOT / "deploy" / "compose" / "db-public.yml").read_text())
    # published on loopback unless DB_BIND names the address the GPU hosts reach
    assert interpolate(public["services"]["db"]["ports"], {}) == ["127.0.0.1:5432:5432"]
    assert set(public["services"]) == {"db"}
    used |= set(re.findall(r"\$\{(\w+)", (ROOT / "deploy" / "compose" / "db-public.yml").read_text()))
    assert used <= set(example), used - set(example)


@pytest.mark.parametrize("service", ["init", "worker", "dashboard", "report"])
def test_every_service_command_is_a_real_entry_point(service):
    command = interpolate(SERVICES[service]["command"], {"POSTGRES_PASSWORD": "x"})
    p = study_main(*command, "--help")  # the parser `python -m study` runs, in this process
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compose_env(database: str, **extra) -> dict:
    """The environment of the app services with the compose variables set, `db` pointed at the test server."""
    env = {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "unused-by-trust-auth", "POSTGRES_DB": database,
           "DB_HOST": "127.0.0.1",  # a GPU host's setting in a multi-host setup: the database is elsewhere
           "EXPERIMENT": "stack", "DATASETS": "synthetic", "METHODS": "erm,fim", "TRIALS": "3", "EPOCHS": "2",
           **extra}
    app = interpolate(SERVICES["worker"]["environment"], env)
    return env, {**os.environ, **app, "STUDY_GPUS": "", "PYTHONUNBUFFERED": "1"}  # this machine has no GPU


def test_the_placeholder_password_is_refused_and_any_other_password_travels_whole(pg_databases, monkeypatch):
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    url = pg_databases()
    for password, ok in ((example["POSTGRES_PASSWORD"], False), ("p@ss#w/rd:?%", True)):
        env, proc_env = _compose_env(url.rsplit("/", 1)[1], POSTGRES_PASSWORD=password)
        assert proc_env["PGPASSWORD"] == password
        for name in ("PGPASSWORD", "OPTUNA_STORAGE"):  # the init service's environment, in this process
            monkeypatch.setenv(name, proc_env[name])
        init = study_main(*interpolate(SERVICES["init"]["command"], env))
        if ok:  # trust auth here ignores it; what matters is that no character breaks the URL
            assert init.returncode == 0, init.stderr
        else:
            assert init.returncode == 2 and init.stderr.count("\n") == 1, init.stderr
            assert "the password is the placeholder 'change-me'" in init.stderr, init.stderr


def test_stack_runs_as_local_processes(pg_databases, tmp_path):
    url = pg_databases()
    env, proc_env = _compose_env(url.rsplit("/", 1)[1], DEBIAS_CACHE_DIR=str(tmp_path / "cache"))
    proc_env["DEBIAS_CACHE_DIR"] = str(tmp_path / "cache")  # /cache exists only in the container
    models = str(tmp_path / "models")  # the models volume, here a folder
    run = lambda name: [sys.executable, "-m", "study",  # noqa: E731
                        *(models if c == "/models" else c for c in interpolate(SERVICES[name]["command"], env))]
    init = subprocess.run(run("init"), capture_output=True, text=True, env=proc_env, timeout=300)
    assert init.returncode == 0, init.stderr
    port = _free_port()
    dash_cmd = [c if c != "8080" else str(port) for c in run("dashboard")]
    dashboard = subprocess.Popen(dash_cmd, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = [subprocess.Popen(run("worker") + ["--threads", "1"], env=proc_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    try:
        outs = [w.communicate(timeout=600)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0, 0], outs
        studies = None
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                time.sleep(1)
        assert sorted(s["study_name"] for s in studies) == ["stack/synthetic/erm", "stack/synthetic/erm/seeds",
                                                            "stack/synthetic/fim", "stack/synthetic/fim/seeds"]
        report_cmd = [c.replace("/reports", str(tmp_path)) for c in run("report")]
        rep = subprocess.run(report_cmd, capture_output=True, text=True, env=proc_env, timeout=300)
        assert rep.returncode == 0, rep.stderr
        assert "Ours" in (tmp_path / "stack.md").read_text() and "plotly" in (tmp_path / "stack.html").read_text()
        # every COMPLETE trial kept its model in the models volume: a model file and a manifest each
        complete = sum(t["state"] == "Complete" for s in studies for t in _trials(port, s["study_id"]))
        assert complete and len(list((tmp_path / "models").iterdir())) == 2 * complete
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
        for w in workers:
            w.kill()


def _trials(port: int, study_id: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=5) as r:
        return json.load(r)["trials"]


def _lines_until(proc, pattern, timeout=120):
    """Reads the process's output until a line matches; returns the match."""
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        m = re.search(pattern, line)
        if m:
            return m
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line matching {pattern!r}")


def test_three_workers_share_two_gpus_one_each(pg_databases, tmp_path):
    url = pg_databases()
    env, proc_env = _compose_env(url.rsplit("/", 1)[1], TRIALS="200", EPOCHS="3")
    proc_env.update(STUDY_GPUS="0,1", DEBIAS_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "study", *interpolate(SERVICES["init"]["command"], env)]
    assert subprocess.run(cmd, capture_output=True, text=True, env=proc_env, timeout=300).returncode == 0
    worker = [sys.executable, "-m", "study", *interpolate(SERVICES["worker"]["command"], env), "--threads", "1"]
    start = lambda: subprocess.Popen(worker, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # noqa: E731
                                     text=True)
    procs = [start() for _ in range(2)]
    try:
        # (not paused to save the CPU: a worker paused while it holds a study's claim lock would stall the others)
        claimed = {int(_lines_until(p, r"claimed GPU (\d)").group(1)): p for p in procs}
        assert sorted(claimed) == [0, 1]
        third = start()
        _lines_until(third, r"all GPUs \[0, 1\] are claimed by other workers; waiting")
        locks = _advisory_locks(url)
        assert locks == [0, 1]  # one GPU claim per worker, each held by its session
        claimed[1].send_signal(signal.SIGTERM)  # a worker leaves: its GPU is released with its connection
        assert claimed[1].wait(timeout=120) == 0
        assert int(_lines_until(third, r"claimed GPU (\d)").group(1)) == 1
        assert _lines_until(third, r"experiment 'stack'")
    finally:
        for p in procs + [locals().get("third")]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _advisory_locks(url: str, host: str = "gpu-host") -> list:
    import psycopg2
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            # this database's GPU claims only: pg_locks lists every database's locks, and workers also take
            # short transaction-level advisory locks while they claim a trial
            cur.execute("SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
            held = {(c << 32) | o for c, o in cur.fetchall()}
            from study.gpu import _key
            return [i for i in range(8) if _key(host, i) & (2**64 - 1) in held]  # host: the compose file's
    finally:
        conn.close()


def test_file_locks_claim_each_gpu_once_without_postgres(tmp_path):
    from study.gpu import FileGpuLock
    host = f"test-{os.getpid()}-{time.time_ns()}"
    a, b = FileGpuLock(host), FileGpuLock(host)
    assert a.try_claim(0) and not b.try_claim(0) and b.try_claim(1)
    a.held[0].close()  # the holder goes away
    assert b.try_claim(0)
