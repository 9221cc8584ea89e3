"""Models kept as Optuna artifacts: where an experiment keeps them (named once, at init, stored with its settings),
what a trial keeps (its policy), and `python -m study export`.

A kept model is two artifacts of its trial: `model.pt` (the weights the test pass used and their manifest, see
`trainer/checkpoint.py`) and `manifest.json` (the same manifest plus the model file's sha256). Artifact ids are
fresh UUIDs, so two workers never write the same artifact, and each is written whole or not at all: a reader never
sees half a file. optuna-dashboard lists both on the trial's page (`python -m study dashboard`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from sqlalchemy.engine import make_url

from trainer.checkpoint import epoch_manifest, manifest_of, parse, sha256, to_bytes
from trainer.files import write_atomically

# nothing; the model each COMPLETE trial's test pass used (pruned trials: none); that and every epoch's weights of
# every trial (pruned ones too), as epoch-NNN.pt
KEEP = ("none", "selected", "all-epochs")


def default_location(storage_url: str) -> str:
    """Where an experiment keeps its models when init is not told: beside an SQLite file (`demo.db` →
    `demo-artifacts/`); none for a server database (its workers share no folder init could know)."""
    url = make_url(storage_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db = Path(url.database).resolve()
        return str(db.with_name(f"{db.stem}-artifacts"))
    return ""


class AtomicFileStore(FileSystemArtifactStore):
    """Optuna's file-system store, each artifact written to a temporary file beside it and renamed into place."""

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = self._get_filepath(artifact_id)
        write_atomically(path, iter(lambda: content_body.read(1 << 20), b""))

    def open_reader(self, artifact_id: str) -> BinaryIO:
        """A regular file only: a symlink planted in the store is not followed, a FIFO never blocks the reader."""
        path = self._get_filepath(artifact_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {artifact_id} not found") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"artifact {artifact_id}: not a regular file")
        return os.fdopen(fd, "rb")


class S3Store:
    """An S3-compatible bucket, `s3://BUCKET/PREFIX`: Optuna's `Boto3ArtifactStore` with every key under PREFIX
    and the client's errors as OSError naming the store (as a folder's are). The endpoint and credentials are
    boto3's own settings (AWS_ENDPOINT_URL for a server of your own, AWS_ACCESS_KEY_ID, ...). An object appears
    whole or not at all (a multipart upload too)."""

    def __init__(self, location: str):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ValueError(f"artifact store {location}: an s3:// store needs boto3 (pip install "
                             "'debias-study[s3]')") from None
        from optuna.artifacts import Boto3ArtifactStore
        check_location(location)
        parts = urlsplit(location)
        self.location, self.prefix = location, parts.path.strip("/") + "/" if parts.path.strip("/") else ""
        client = boto3.client("s3", config=Config(connect_timeout=10, read_timeout=120,
                                                  retries={"max_attempts": 4, "mode": "standard"}))
        self.store = Boto3ArtifactStore(parts.netloc, client)

    @contextlib.contextmanager
    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            yield
        except (BotoCoreError, ClientError) as e:
            raise OSError(f"artifact store {self.location}: {e}") from None

    def open_reader(self, artifact_id: str) -> BinaryIO:
        with self._errors():
            return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        with self._errors():
            self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        with self._errors():
            self.store.remove(self.prefix + artifact_id)


def is_url(location: str) -> bool:
    return "://" in location


def check_location(location: str) -> None:
    """ValueError unless `location` names a store this version opens: an absolute folder or s3://BUCKET/PREFIX
    (what it holds is not looked at: `check_store`)."""
    if is_url(location):
        parts = urlsplit(location)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"artifact store {location!r}: a folder or s3://BUCKET/PREFIX")
    elif not os.path.isabs(location):
        raise ValueError(f"artifact store {location!r}: give an absolute path (workers start in other folders)")


def open_store(location: str) -> AtomicFileStore | S3Store | None:
    """The artifact store at `location` (a folder, or s3://BUCKET/PREFIX; "" = none). ValueError: not one this
    version opens."""
    if not location:
        return None
    check_location(location)
    return S3Store(location) if is_url(location) else AtomicFileStore(location)


def check_store(location: str, create: bool = False) -> None:
    """The store can be written and read back: a probe artifact written, read and removed. ValueError in one line
    naming the store otherwise (init and every worker check it before any trial is trained)."""
    if not location:
        return
    if is_url(location):
        _probe(location)
        return
    if create:
        try:
            Path(location).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"artifact store {location}: cannot create it ({e.strerror or e})") from None
    if not Path(location).is_dir():
        raise ValueError(f"artifact store {location}: no such folder")
    _probe(location)


def _probe(location: str) -> None:
    store = open_store(location)
    assert store is not None
    probe, body = f".probe-{uuid.uuid4()}", b"debias-study"
    try:
        store.write(probe, io.BytesIO(body))
        with store.open_reader(probe) as f:
            ok = f.read() == body
        store.remove(probe)
    except (OSError, ArtifactNotFound) as e:
        why = getattr(e, "strerror", None) or str(e).removeprefix(f"artifact store {location}: ")
        raise ValueError(f"artifact store {location}: not writable ({why})") from None
    if not ok:
        raise ValueError(f"artifact store {location}: a written file read back different")


def keep_model(trial: optuna.Trial, store: AtomicFileStore, result, **extra: Any) -> tuple[str, str]:
    """Uploads the model a run tested (`result.state`) and its manifest as artifacts of `trial`; returns the model's
    artifact id and the model file's sha256. OSError (a full disk, say) fails the trial; nothing else is touched."""
    assert result.state is not None, "fit(keep_state=True)"
    manifest = manifest_of(result, **extra)
    data = to_bytes(manifest, result.state)
    digest = sha256(data)
    with tempfile.TemporaryDirectory(prefix="debias-model-") as tmp:
        model_path, manifest_path = Path(tmp) / "model.pt", Path(tmp) / "manifest.json"
        model_path.write_bytes(data)
        model_id = upload_artifact(artifact_store=store, file_path=str(model_path), study_or_trial=trial)
        manifest_path.write_text(json.dumps({**manifest, "model_artifact": model_id, "sha256": digest,
                                             "bytes": len(data)}, indent=1))
        upload_artifact(artifact_store=store, file_path=str(manifest_path), study_or_trial=trial,
                        mimetype="application/json")
    return model_id, digest


def keep_epoch(trial: optuna.Trial, store, state: dict, hparams: dict, data_checksum: str, record: dict,
               **extra: Any) -> str:
    """Uploads one epoch's weights (`--keep all-epochs`) as `epoch-NNN.pt`, an artifact of `trial` in the kept model
    format (`python -m trainer --evaluate` compares its val metrics); returns its artifact id."""
    data = to_bytes(epoch_manifest(hparams, data_checksum, record, **extra), state)
    with tempfile.TemporaryDirectory(prefix="debias-epoch-") as tmp:
        path = Path(tmp) / f"epoch-{record['epoch']:03d}.pt"
        path.write_bytes(data)
        return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def export(storage, experiment: str, out: str | Path, datasets: list[str] | None = None,
           methods: list[str] | None = None, log=print) -> list[dict[str, Any]]:
    """Writes the kept models of the configuration the report selected, every finished seed, to OUT/DATASET/METHOD/
    seedN.pt, each verified against its manifest's sha256, then OUT/manifest.json (one entry per model). Returns
    the entries. ValueError naming what is missing (a model not kept, a study without a finished run)."""
    from .results import collect

    exp, results = collect(storage, experiment)
    for key, wanted, have in (("datasets", datasets, exp.datasets), ("methods", methods, exp.methods)):
        unknown = set(wanted or ()) - set(have)
        if unknown:
            raise ValueError(f"--{key} {', '.join(sorted(unknown))}: not in experiment {experiment!r} "
                             f"({', '.join(have)})")
    store = open_store(exp.artifacts)
    if store is None:
        raise ValueError(f"experiment {experiment!r} keeps no models (it was created without an artifact store: "
                         "python -m study init --artifacts PATH, for a new experiment)")
    chosen = [r for r in results if (not datasets or r.dataset in datasets) and (not methods or r.method in methods)]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder")
    plan = []
    for r in chosen:
        runs = r.runs()
        if not runs:
            raise ValueError(f"{r.name}: no finished run to export")
        for run in runs:
            if run.record.model is None:
                raise ValueError(f"{r.name} trial {run.number}: no model kept (keep policy "
                                 f"{exp.keep!r} when it ran)")
            plan.append((r, run))
    entries = []
    out.mkdir(parents=True, exist_ok=True)
    for r, run in plan:
        dest = out / r.dataset / r.method / f"seed{run.seed}.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".export-") as tmp:
            part = Path(tmp) / "model.pt"
            download_artifact(artifact_store=store, file_path=str(part), artifact_id=run.record.model)
            data = part.read_bytes()
            manifest, _ = parse(data, part)
            digest, want = sha256(data), run.record.model_sha256
            if want is not None and digest != want:
                raise ValueError(f"{r.name} trial {run.number}: its model file's sha256 {digest} is not the "
                                 f"recorded {want} (the artifact store was changed)")
            shutil.move(str(part), dest)
        entries.append({"file": str(dest.relative_to(out)), "study": r.name, "trial": run.number, "seed": run.seed,
                        "dataset": r.dataset, "method": r.method, "label": r.label, "sha256": digest,
                        "best_epoch": run.best_epoch, "params": run.record.params, "val": manifest["val"],
                        "test": manifest["test"], "command": manifest.get("command")})
        log(f"{dest}: {r.name} trial {run.number} seed {run.seed}")
    write_atomically(out / "manifest.json", json.dumps({"experiment": experiment, "models": entries}, indent=1))
    return entries
