"""Models kept as artifacts: every COMPLETE trial keeps the model its test pass used, whole, with a manifest;
`export` writes the selected configuration's models; `python -m trainer --evaluate` gives back the stored metrics
exactly; a store no trial could write, and a damaged or foreign model file, are refused in one line."""
import hashlib
import json
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from conftest import study_main, trainer_main
from study.experiment import Experiment, init_experiment
from study.records import read
from study.replicate import replicate
from study.storage import make_storage
from study.worker import run_worker
from trainer.checkpoint import evaluate_file, load

from test_faults import one_line_error


def sqlite(tmp_path, name="a.db"):
    url = f"sqlite:///{tmp_path / name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_storage(url), url


def run(storage, name):
    assert run_worker(storage, name, device="cpu", sampler_seed=0, poll_seconds=0.1, log=lambda *_: None) == 0


def store_files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def test_complete_trials_keep_the_tested_model_whole_and_it_evaluates_to_the_stored_metrics(tmp_path):
    storage, url = sqlite(tmp_path)
    init_experiment(storage, Experiment.of(name="k", datasets=["synthetic"], methods=["erm", "dfr"], trials=1,
                                           epochs=2), check_data=False)
    folder = tmp_path / "a-artifacts"  # the default: beside the SQLite file
    run(storage, "k")
    kept = 0
    for method in ("erm", "dfr"):
        study = optuna.load_study(study_name=f"k/synthetic/{method}", storage=storage)
        for t in study.trials:
            r, metas = read(t), get_all_artifact_meta(t, storage=storage)
            assert t.state == TrialState.COMPLETE  # a pruned or failed trial keeps none: the full-disk test
            assert sorted(m.filename for m in metas) == ["manifest.json", "model.pt"]
            model = folder / r.model
            data = model.read_bytes()
            assert hashlib.sha256(data).hexdigest() == r.model_sha256
            meta = next(m for m in metas if m.filename == "manifest.json")
            manifest = json.loads((folder / meta.artifact_id).read_text())
            assert manifest["sha256"] == r.model_sha256 and manifest["model_artifact"] == r.model
            assert (manifest["study"], manifest["number"], manifest["seed"]) == (study.study_name, t.number, 0)
            assert manifest["command"] == t.user_attrs["command"] and manifest["test"]["wga"] == pytest.approx(
                t.user_attrs["test"]["wga"], abs=1e-6)
            e = evaluate_file(model, device="cpu")
            assert e["same"] == {"val": None if method == "dfr" else True, "test": True}, method
            kept += 1
    assert kept == 2
    assert not [f for f in store_files(folder) if f.name.startswith(".")]  # no temporary file left behind


def test_export_writes_every_seed_of_the_selected_configuration_verified(tmp_path):
    storage, url = sqlite(tmp_path)
    init_experiment(storage, Experiment.of(name="x", datasets=["synthetic"], methods=["erm"], trials=2, epochs=2),
                    check_data=False)
    run(storage, "x")
    replicate(storage, "x", seeds=2, top_k=1)
    run(storage, "x")
    out = tmp_path / "models"
    p = study_main("export", "--storage", url, "--experiment", "x", "--out", str(out))
    assert p.returncode == 0, p.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["file"], m["seed"]) for m in manifest["models"]] == [("synthetic/erm/seed0.pt", 0),
                                                                  ("synthetic/erm/seed1.pt", 1)]
    for m in manifest["models"]:
        assert hashlib.sha256((out / m["file"]).read_bytes()).hexdigest() == m["sha256"]
        e = trainer_main("--evaluate", str(out / m["file"]), "--device", "cpu", "--output", str(tmp_path / "e.json"))
        assert e.returncode == 0 and e.stdout.count("equal to the stored metrics") == 2, e.stdout
        assert json.loads((tmp_path / "e.json").read_text())["test"]["wga"] == m["test"]["wga"]
    one_line_error(study_main("export", "--storage", url, "--experiment", "x", "--out", str(out)),
                   "exists and is not an empty folder")
    one_line_error(study_main("export", "--storage", url, "--experiment", "x", "--out", str(tmp_path / "o2"),
                              "--methods", "fim"), "--methods fim: not in experiment 'x'")
    # a model file changed in the store after its trial recorded it is refused, naming the trial
    r = read(next(t for t in optuna.load_study(study_name="x/synthetic/erm", storage=storage).trials
                  if t.number == manifest["models"][0]["trial"]))
    stored = tmp_path / "a-artifacts" / r.model
    manifest0, state = load(stored)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"manifest": manifest0, "state_dict": state}, stored)
    one_line_error(study_main("export", "--storage", url, "--experiment", "x", "--out", str(tmp_path / "o3")),
                   f"trial {r.number}: its model file's sha256")
    assert not (tmp_path / "o3" / "manifest.json").exists()  # no manifest for a half export


def one_trial(tmp_path, name: str, *flags: str):
    """(storage, url, the trial) of a one-trial synthetic ERM experiment `name` run by a worker, init given `flags`."""
    storage, url = sqlite(tmp_path)
    p = study_main("init", "--storage", url, "--experiment", name, "--datasets", "synthetic", "--methods", "erm",
                   "--trials", "1", *flags)
    assert p.returncode == 0, p.stderr
    run(storage, name)
    (t,) = optuna.load_study(study_name=f"{name}/synthetic/erm", storage=storage).trials
    return storage, url, t


def test_keep_none_keeps_nothing_and_export_says_so(tmp_path):
    storage, url, t = one_trial(tmp_path, "n", "--epochs", "1", "--keep", "none")
    assert t.state == TrialState.COMPLETE and read(t).model is None and get_all_artifact_meta(t, storage=storage) == []
    one_line_error(study_main("export", "--storage", url, "--experiment", "n", "--out", str(tmp_path / "o")),
                   "no model kept (keep policy 'none' when it ran)")


def test_a_store_no_trial_could_write_is_refused_by_init_and_by_a_worker(tmp_path):
    storage, url = sqlite(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["--experiment", "s", "--datasets", "synthetic", "--methods", "erm", "--trials", "1", "--epochs", "1"]
    one_line_error(study_main("init", "--storage", url, *args, "--artifacts", str(blocker / "models")),
                   f"artifact store {blocker / 'models'}: cannot create it")
    one_line_error(study_main("init", "--storage", url, *args, "--artifacts", "models"),
                   "artifact store 'models': give an absolute path")
    one_line_error(study_main("init", "--storage", url, *args, "--artifacts", "ftp://host/x"),
                   "artifact store 'ftp://host/x': a folder or s3://BUCKET/PREFIX")
    assert optuna.get_all_study_names(storage) == []  # nothing created
    folder = tmp_path / "models"
    assert study_main("init", "--storage", url, *args, "--artifacts", str(folder)).returncode == 0
    folder.rmdir()
    folder.write_text("no longer a folder")  # the shared folder went away under the experiment
    one_line_error(study_main("worker", "--storage", url, "--experiment", "s", "--device", "cpu"),
                   f"artifact store {folder}: no such folder")
    (t,) = optuna.load_study(study_name="s/synthetic/erm", storage=storage).trials
    assert t.state == TrialState.WAITING  # no trial taken


@pytest.mark.parametrize("budget", ["0", "1"], ids=["model", "resume-state"])
def test_a_full_disk_while_keeping_fails_that_trial_with_its_reason(tmp_path, pg_url, budget):
    """Files over 64 KiB cannot be written (RLIMIT_FSIZE: the kernel refuses the write, EFBIG, as a full disk
    refuses with ENOSPC): the model (no resumable states) or the first resumable state (one per epoch) cannot be
    written, the trial fails saying why, and the store holds no part of it."""
    folder = tmp_path / "models"
    p = study_main("init", "--storage", pg_url, "--experiment", "full", "--datasets", "synthetic", "--methods",
                   "erm", "--trials", "1", "--epochs", "1", "--artifacts", str(folder), "--resume-budget", budget)
    assert p.returncode == 0, p.stderr

    def small_files():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    w = subprocess.run([sys.executable, "-m", "study", "worker", "--experiment", "full", "--storage", pg_url,
                        "--device", "cpu", "--threads", "1"], preexec_fn=small_files, capture_output=True,
                       text=True, timeout=300)
    assert w.returncode == 3 and "halted" in w.stderr, (w.stdout, w.stderr)  # three failed trials halt the study
    storage = make_storage(pg_url)
    trials = optuna.load_study(study_name="full/synthetic/erm", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all(read(t).fail_reason == "OSError: [Errno 27] File too large" for t in trials), [
        read(t).fail_reason for t in trials]
    assert [t.user_attrs.get("resume_state") for t in trials] == [None] * 3
    # where it failed: a state is offered after the epoch, the model kept after the test pass
    assert [bool(t.user_attrs.get("resume_files")) for t in trials] == [budget == "1"] * 3
    assert store_files(folder) == []


def test_a_damaged_or_foreign_model_file_is_refused_in_one_line(tmp_path):
    storage, _ = sqlite(tmp_path)
    init_experiment(storage, Experiment.of(name="d", datasets=["synthetic"], methods=["erm"], trials=1, epochs=1),
                    check_data=False)
    run(storage, "d")
    (t,) = optuna.load_study(study_name="d/synthetic/erm", storage=storage).trials
    good = tmp_path / "a-artifacts" / read(t).model
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "text.pt": b"not a model\n"}
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"manifest": Boom(), "state_dict": {}}, tmp_path / "code.pt")
    manifest, state = load(good)
    torch.save({"manifest": {**manifest, "data_checksum": "0" * 16}, "state_dict": state}, tmp_path / "other.pt")
    torch.save({"manifest": {**manifest, "hparams": {**manifest["hparams"], "model": "resnet18"}},
                "state_dict": state}, tmp_path / "shape.pt")
    for name, expect in (("truncated.pt", "not a readable model file"), ("text.pt", "not a readable model file"),
                         ("code.pt", "not a readable model file"),
                         ("foreign.pt", "not a model kept by debias-study"),
                         ("other.pt", "is not the data the model was trained on"),
                         ("shape.pt", "its weights do not fit a resnet18"), ("missing.pt", "no such file")):
        p = one_line_error(trainer_main("--evaluate", str(tmp_path / name), "--device", "cpu"), expect)
        assert "pwned" not in p.stdout
    one_line_error(trainer_main("--evaluate", str(tmp_path), "--device", "cpu"), "not a regular file")
    one_line_error(trainer_main("--evaluate", str(good), "--lr", "0.1"), "only data_dir, device")


@pytest.fixture
def s3(monkeypatch):
    """An S3-compatible server (moto's) on loopback, with a bucket `models`; boto3 pointed at it."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                       ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="models")
    yield client
    server.stop()


def test_an_s3_compatible_store_round_trips_models_and_resumable_states(tmp_path, s3, monkeypatch):
    from study.artifacts import open_store
    from study.records import StateRef
    from study.resume import read_state
    from trainer import TrainConfig, fit
    from trainer.resume import ResumeError

    storage, url = sqlite(tmp_path)
    location = "s3://models/team/exp"
    p = study_main("init", "--storage", url, "--experiment", "s3", "--datasets", "synthetic", "--methods", "erm",
                   "--trials", "2", "--epochs", "2", "--artifacts", location, "--resume-budget", "1")
    assert p.returncode == 0, p.stderr
    run(storage, "s3")

    def keys():
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="models").get("Contents", []))
    trials = optuna.load_study(study_name="s3/synthetic/erm", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:  # each model under the prefix, whole; each state written (one per epoch) and removed after
        r = read(t)
        body = s3.get_object(Bucket="models", Key=f"team/exp/{r.model}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == r.model_sha256
        assert t.user_attrs["resume_state"] is None and t.user_attrs["resume_files"]["artifacts"]
    assert all(k.startswith("team/exp/") for k in keys()) and not [k for k in keys() if "/state-" in k], keys()
    assert len(keys()) == 4  # two models and their manifests: nothing else stays
    out = tmp_path / "out"
    p = study_main("export", "--storage", url, "--experiment", "s3", "--out", str(out))
    assert p.returncode == 0, p.stderr
    for m in json.loads((out / "manifest.json").read_text())["models"]:
        assert evaluate_file(out / m["file"], device="cpu")["same"]["test"] is True
    # a resumable state read back from the bucket is verified against its recorded size and sha256
    states: dict = {}
    fit(TrainConfig(dataset="synthetic", method="erm", epochs=1), log=None,
        on_state=lambda e, take: states.setdefault(e, take().to_bytes()))
    store, data = open_store(location), states[1]
    import io
    store.write("state-x", io.BytesIO(data))
    ref = StateRef("state-x", 1, hashlib.sha256(data).hexdigest(), len(data))
    assert read_state(store, ref).epoch == 1
    with pytest.raises(ResumeError, match="not the recorded"):
        read_state(store, StateRef("state-x", 1, ref.sha256, len(data) + 1))
    with pytest.raises(ResumeError, match="cannot be read"):
        read_state(store, StateRef("state-gone", 1, ref.sha256, len(data)))
    # a bucket that does not exist, a server that does not answer: refused in one line naming the store
    args = ["--storage", url, "--experiment", "s4", "--datasets", "synthetic", "--methods", "erm"]
    one_line_error(study_main("init", *args, "--artifacts", "s3://no-such-bucket/x"),
                   "artifact store s3://no-such-bucket/x: not writable (")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    one_line_error(study_main("init", *args, "--artifacts", location),
                   f"artifact store {location}: not writable (Could not connect to the endpoint URL")
    assert optuna.get_all_study_names(storage) == ["s3/synthetic/erm", "s3/synthetic/erm/seeds"]


def test_keep_all_epochs_keeps_every_epoch_of_every_trial_and_each_evaluates_to_its_val_metrics(tmp_path):
    storage, _, t = one_trial(tmp_path, "ae", "--epochs", "3", "--keep", "all-epochs")
    metas = get_all_artifact_meta(t, storage=storage)
    epochs = sorted(m.filename for m in metas if m.filename.startswith("epoch-"))
    assert t.state == TrialState.COMPLETE and read(t).model is not None  # the selected model is kept too
    assert epochs == [f"epoch-{e:03d}.pt" for e in range(1, t.user_attrs["epochs_run"] + 1)]
    folder = tmp_path / "a-artifacts"
    for m in metas:
        if m.filename.startswith("epoch-"):
            epoch = int(m.filename[6:9])
            manifest, _ = load(folder / m.artifact_id)
            assert manifest["epoch"] == epoch and manifest["val"]["wga"] == t.intermediate_values[epoch]
            if epoch == 1:  # an epoch before the selected one, evaluated again
                e = trainer_main("--evaluate", str(folder / m.artifact_id), "--device", "cpu")
                assert e.returncode == 0 and "equal to the stored metrics" in e.stdout and \
                    "not compared: not measured at this epoch" in e.stdout, e.stdout
