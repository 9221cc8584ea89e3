"""Faults survived and bad inputs refused, against the real PostgreSQL: a database restart mid-study, a database
that stays down, and every bad input answered by one line, a non-zero exit and nothing half-created."""
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from conftest import start_worker, study_main
from test_study import FAST_HEARTBEAT, _running_with_progress, _wait_for, init, storage_for, studies_of

def assert_complete(url, experiment, budget, outs=()):
    """Every study met its budget; nothing RUNNING or WAITING; every failed trial was retried to the end (`outs`:
    the workers' output, shown when it was not)."""
    for name, study in studies_of(url, experiment).items():
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states, (name, states)
        failed = {t.number for t in trials if t.state == TrialState.FAIL}
        retried = {t.system_attrs.get("failed_trial") for t in trials}
        reasons = {t.number: t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL}
        assert failed <= retried, (name, failed, retried, reasons, outs)  # no lost trial (the reasons say why)
        if not name.endswith("/seeds"):  # the seed phase was not asked for
            assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == budget, (name, states)


def _epochs_reported(url, experiment) -> int:
    return sum(len(t.intermediate_values) for s in studies_of(url, experiment).values()
               for t in s.get_trials(deepcopy=False))


def test_ten_database_restarts_lose_no_worker_and_no_trial(private_cluster):
    pg_url, cluster = private_cluster.url, private_cluster
    # more work than the restarts last: the workers are stopped (SIGTERM) once they have ridden out all ten
    init(pg_url, "--experiment", "restart", "--datasets", "cmnist", "--methods", "erm,fim", "--trials", "50",
         "--epochs", "20", "--patience", "0", "--pruner", "none")
    # heartbeats every second: storage calls are certain to meet the outages (grace long enough to outlast them)
    # two simulated GPUs: each worker's GPU lock dies with every restart and is taken again between trials
    env = {"STUDY_HEARTBEAT_INTERVAL": "1", "STUDY_GRACE_PERIOD": "60", "STUDY_GPUS": "0,1"}
    workers = [start_worker(pg_url, "restart", env=env) for _ in range(2)]
    _wait_for(_running_with_progress(pg_url, "restart/cmnist/erm"), timeout=300)
    alive = []
    for _ in range(10):  # a restart every 3 s: every connection dies; the workers keep training and ride it out
        t0 = time.monotonic()
        alive.append(sum(w.poll() is None for w in workers))
        cluster.stop()
        cluster.start()
        time.sleep(max(0.0, 3 - (time.monotonic() - t0)))
    after = _epochs_reported(pg_url, "restart")
    _wait_for(lambda: _epochs_reported(pg_url, "restart") > after + 2, timeout=120)  # training goes on
    alive.append(sum(w.poll() is None for w in workers))
    for w in workers:
        w.send_signal(signal.SIGTERM)
    outs = [w.communicate(timeout=120)[0] for w in workers]
    assert alive == [2] * 11, (alive, outs)  # both workers met every restart, and outlived the last
    assert [w.returncode for w in workers] == [0, 0] and all("stopped by signal" in o for o in outs), outs
    assert any("unreachable" in o and "retrying" in o for o in outs), outs  # the outages were met, and ridden out
    assert all("Traceback" not in o and "claimed GPU" in o for o in outs), outs
    for name, study in studies_of(pg_url, "restart").items():  # no trial lost, none left without parameters
        trials = study.get_trials(deepcopy=False)
        assert TrialState.RUNNING not in [t.state for t in trials], name
        failed = {t.number: t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL}
        retried = {t.system_attrs.get("failed_trial") for t in trials}
        assert set(failed) <= retried, (name, failed, outs)
        assert all(t.params for t in trials), name
    assert sum(t.state == TrialState.COMPLETE for s in studies_of(pg_url, "restart").values()
               for t in s.get_trials(deepcopy=False)) >= 2


def test_writes_cut_off_by_an_outage_are_not_repeated(pg_url):
    """The reply to the first trial creation and the first parameter write is lost after the database committed
    them (what a restart does to a write in flight): the storage finds them again instead of writing twice."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    flushed, cut = set(), set()

    def after_flush(session, _):
        flushed.update(type(o).__name__ for o in session.new)

    def after_commit(session):
        for kind in ("TrialModel", "TrialParamModel"):
            if kind in flushed and kind not in cut:
                cut.add(kind)
                flushed.clear()
                raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        flushed.clear()
    event.listen(Session, "after_flush", after_flush)
    event.listen(Session, "after_commit", after_commit)
    try:
        s = storage_for(pg_url, timeout=30)
        study = optuna.create_study(study_name="cut", storage=s)
        assert study._storage is s  # every call of a worker enters through the riding-out
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
    finally:
        event.remove(Session, "after_flush", after_flush)
        event.remove(Session, "after_commit", after_commit)
    trials = study.get_trials(deepcopy=False)
    assert cut == {"TrialModel", "TrialParamModel"}, cut  # both replies were lost
    assert [t._trial_id for t in trials] == [trial._trial_id] and list(trials[0].params) == ["x"], trials
    assert "create_token" not in trials[0].system_attrs  # the token stays in the database


def test_a_frozen_claim_lock_stalls_neither_other_studies_nor_its_own_for_long(pg_url, tmp_path, monkeypatch):
    """A worker frozen inside a study's claim (here: this test, holding the claim lock idle in its transaction as a
    SIGSTOPped worker would) stalls no other study, and its own only until the server ends the idle session."""
    import threading

    from study.storage import study_lock
    for url, name in ((pg_url, "frozen"), (f"sqlite:///{tmp_path / 'f.db'}", "frozen")):
        init(url, "--experiment", name, "--datasets", "cmnist", "--methods", "erm,groupdro", "--trials", "1",
             "--epochs", "1", "--pruner", "none")
        monkeypatch.setenv("STUDY_IDLE_TRANSACTION_TIMEOUT", "12")  # the holder's and the worker's (PostgreSQL)
        holder = storage_for(url)
        held, release = threading.Event(), threading.Event()

        def freeze():
            with study_lock(holder, f"{name}/cmnist/erm") as got:
                assert got
                held.set()
                release.wait(120)
        t = threading.Thread(target=freeze)
        t.start()
        held.wait(30)
        start = time.time()
        w = start_worker(url, name)
        try:
            done = _wait_for(lambda: [s for s in studies_of(url, name).values()
                                      if any(x.state == TrialState.COMPLETE for x in s.get_trials(deepcopy=False))],
                             timeout=120)
            assert [s.study_name for s in done] == [f"{name}/cmnist/groupdro"]  # the other study went on
            if url.startswith("sqlite"):  # a frozen flock holder keeps its study's lock until it resumes
                release.set()
            out = w.communicate(timeout=120)[0]
        finally:
            release.set()
            t.join()
            w.kill()
        assert w.returncode == 0, out
        if url.startswith("postgresql"):  # the server ended the frozen session: its study went on well before
            assert time.time() - start < 60, out  # the holder's 120 s
        assert_complete(url, name, 1, [out])


def _raised(make):
    """The exception as Python chains it when raised inside an except block of another."""
    try:
        make()
    except Exception as e:
        return e


def test_restart_errors_are_ridden_out_and_permanent_ones_are_not():
    import psycopg2
    from sqlalchemy.exc import DatabaseError, PendingRollbackError, ProgrammingError

    from study.storage import StorageUnavailable, _connection_error, cause_chain, database_error

    def commit_on_dead(exc):  # Optuna's commit path: StorageInternalError raised from SQLAlchemy's error
        def make():
            try:
                raise exc
            except Exception as e:
                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
        return make
    transient = [
        PendingRollbackError("Can't reconnect until invalid transaction is rolled back", None, None),
        DatabaseError("COMMIT", {}, psycopg2.DatabaseError("error with status PGRES_TUPLES_OK and no message from "
                                                          "the libpq")),
        DatabaseError("SELECT 1", {}, psycopg2.DatabaseError("server closed the connection unexpectedly")),
    ]
    for exc in transient:
        e = _raised(commit_on_dead(exc))
        assert _connection_error(e) is exc, cause_chain(e)
    assert "StorageInternalError <- PendingRollbackError" in cause_chain(_raised(commit_on_dead(transient[0])))
    permanent = [ProgrammingError("SELECT", {}, psycopg2.ProgrammingError('relation "trials" does not exist')),
                 DatabaseError("COMMIT", {}, psycopg2.DatabaseError("value too long for type character varying"))]
    for exc in permanent:
        assert _connection_error(_raised(commit_on_dead(exc))) is None, exc
        assert database_error(_raised(commit_on_dead(exc)))  # a trial it cuts short is re-queued, not lost

    def gave_up():
        try:
            raise transient[0]
        except Exception:
            raise StorageUnavailable("storage unreachable for 600 s") from None
    assert not database_error(_raised(gave_up)) and not database_error(ValueError("a trial's own error"))


def test_database_down_too_long_stops_the_worker_with_one_line(private_cluster):
    pg_url, cluster = private_cluster.url, private_cluster
    init(pg_url, "--experiment", "down", "--datasets", "cmnist", "--methods", "erm", "--trials", "1",
         "--epochs", "15", "--patience", "0", "--pruner", "none")  # still running when the database goes away
    secret = pg_url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores the password
    w = start_worker(secret, "down", env={"STUDY_STORAGE_TIMEOUT": "5"})
    _wait_for(_running_with_progress(pg_url, "down/cmnist/erm"), timeout=300)
    cluster.stop()
    try:
        out = w.communicate(timeout=120)[0]
    finally:
        cluster.start()
    last = out.strip().splitlines()[-1]
    assert w.returncode == 2, out
    assert last.startswith(f"error: storage postgresql+psycopg2://postgres:***@127.0.0.1:{cluster.port}/")
    assert "unreachable" in last
    assert "s3cret-pw" not in out and "Traceback" not in out, out
    # nothing lost: the abandoned trial is failed as stale and retried by the next worker
    w2 = start_worker(pg_url, "down", env=FAST_HEARTBEAT)
    assert w2.wait(timeout=600) == 0
    assert_complete(pg_url, "down", 1)


@pytest.mark.parametrize("case", ["unknown method", "unknown dataset", "missing data directory", "missing column",
                                  "unknown split code", "corrupt image", "inverted bound", "invalid storage URL",
                                  "unknown database role"])
def test_bad_input_is_one_line_and_leaves_nothing(case, pg_url, waterbirds_dir, tmp_path):
    meta = waterbirds_dir / "metadata.csv"
    wb = ["--datasets", "waterbirds", "--methods", "erm", "--data-dir", str(waterbirds_dir)]
    syn = ["--datasets", "synthetic", "--methods", "erm,fim"]
    storage = pg_url
    if case == "unknown method":
        args, expect = ["--datasets", "synthetic", "--methods", "erm,fancy"], "unknown method 'fancy'"
    elif case == "unknown dataset":
        args, expect = ["--datasets", "imagenet", "--methods", "erm"], "unknown dataset 'imagenet'"
    elif case == "missing data directory":
        args, expect = wb[:4] + ["--data-dir", str(tmp_path / "nowhere")], "nowhere: data directory not found"
    elif case == "missing column":
        meta.write_text(meta.read_text().replace("place,place_filename", "site,place_filename"))
        args, expect = wb, "metadata.csv: missing column(s) place"
    elif case == "unknown split code":
        lines = meta.read_text().splitlines()
        lines[3] = ",".join(v if i != 3 else "7" for i, v in enumerate(lines[3].split(",")))
        meta.write_text("\n".join(lines) + "\n")
        args, expect = wb, "unknown split code '7'"
    elif case == "corrupt image":
        (next(waterbirds_dir.glob("*/img_5.jpg"))).write_bytes(b"\xff\xd8 truncated")
        args, expect = wb, "img_5.jpg: unreadable image"
    elif case == "inverted bound":
        (tmp_path / "e.toml").write_text('datasets = ["synthetic"]\nmethods = ["fim"]\n[space.fim]\nrho = [0.5, 0.1]\n')
        args, expect = ["--config", str(tmp_path / "e.toml")], "invalid bounds [0.5, 0.1]"
    elif case == "invalid storage URL":
        args, expect, storage = syn, "unsupported storage 'mysqlx://", "mysqlx://u:pw@h/db"
    else:  # trust auth accepts any password here; a wrong role takes the same path as a wrong password
        storage = pg_url.replace("postgres@", "nobody:s3cret-pw@")
        args, expect = syn, 'role "nobody" does not exist'
    p = study_main("init", "--storage", storage, "--experiment", "bad", *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and expect in p.stderr, p.stderr
    assert "s3cret-pw" not in p.stderr
    assert optuna.get_all_study_names(storage_for(pg_url)) == []  # no half-created experiment
