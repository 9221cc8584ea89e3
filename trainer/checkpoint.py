"""A kept model: the weights a run's test pass used and a manifest saying what they are, in one file; and their
evaluation (`python -m trainer --evaluate FILE`), which gives back the run's stored metrics exactly on the CPU.

The file is `torch.save({"manifest": {...}, "state_dict": {...}})`, read with `weights_only=True`: a damaged or
foreign file is refused in one line and never runs code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .files import read_regular

FORMAT, VERSION = "debias-study/model", 1
MAX_BYTES = 4 << 30  # a ResNet-50 is ~95 MB; anything this large is not one of ours


def manifest_of(result, **extra: Any) -> dict[str, Any]:
    """What a kept model is: its run's settings (`hparams`, every effective setting), selected epoch, val and test
    metrics and data checksum, and whatever the caller adds (the trial, its command, the code version)."""
    return {"format": FORMAT, "version": VERSION, "dataset": result.dataset, "method": result.method,
            "seed": result.seed, "hparams": result.hparams, "selection": result.selection,
            "objective": result.objective, "best_epoch": result.best_epoch, "refit": result.refit,
            "data_checksum": result.data_checksum, "val": result.val, "test": result.test, **extra}


def epoch_manifest(hparams: dict[str, Any], data_checksum: str, record: dict[str, Any], **extra: Any
                   ) -> dict[str, Any]:
    """What one epoch's model is (`--keep all-epochs`): its run's settings and that epoch's val metrics (the
    history's; the test split is not evaluated per epoch)."""
    return {"format": FORMAT, "version": VERSION, "dataset": hparams["dataset"], "method": hparams["method"],
            "seed": hparams["seed"], "hparams": hparams, "selection": hparams["selection"],
            "objective": record["val_selection"], "epoch": record["epoch"], "best_epoch": None, "refit": False,
            "data_checksum": data_checksum, "test": None,
            "val": {k: record[f"val_{k}"] for k in ("wga", "worst_class", "avg_plain", "avg_train_weighted")},
            **extra}


def to_bytes(manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({"manifest": manifest, "state_dict": state}, buf)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, state_dict) of a kept model; ValueError naming the file and what is wrong with it."""
    try:
        data = read_regular(Path(path), MAX_BYTES)
    except OSError as e:
        raise ValueError(f"{path}: {e}") from None
    if data is None:
        raise ValueError(f"{path}: no such file")
    return parse(data, path)


def weights_only(data: bytes) -> Any:
    """`torch.load` of bytes with weights_only=True (a file holding code is refused, never run); ValueError with the
    first line of why a damaged or truncated file cannot be read (model files and resume states alike)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise ValueError((str(e).splitlines() or [type(e).__name__])[0]) from None


def parse(data: bytes, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, state_dict) from a kept model's bytes; ValueError naming `path` and what is wrong."""
    try:
        obj = weights_only(data)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable model file (damaged or truncated: {e})") from None
    manifest = obj.get("manifest") if isinstance(obj, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a model kept by debias-study (no {FORMAT} manifest)")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: model file version {manifest.get('version')!r}; this version reads {VERSION}")
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: its state_dict is not a table of tensors")
    return manifest, state


# The settings a kept model's evaluation may change: where the data is and what runs it; the rest is the model's.
OVERRIDABLE = ("data_dir", "device", "image_loader", "num_workers")


def evaluate_file(path: str | Path, **overrides: Any) -> dict[str, Any]:
    """Evaluates a kept model on its run's val and test splits: {"val", "test" (metrics), "stored" (the manifest's),
    "same" ({split: whether equal to the stored metrics; None for val when the method refit on val})}."""
    from .data import TensorGroupDataset
    from .loop import _autocast, evaluate, resolve_device
    from .models import build_model

    manifest, state = load(path)
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"--evaluate takes its settings from the model file; only {', '.join(OVERRIDABLE)} may be "
                         f"given, not {', '.join(sorted(unknown))}")
    try:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in manifest["hparams"].items() if k in known})
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None}).resolved()
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: its manifest's settings are incomplete ({e})") from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # a CPU's sums depend on the thread count: the run's count
    splits = cfg.load_splits()
    if splits.checksum != manifest["data_checksum"]:
        raise ValueError(f"{path}: the {cfg.dataset} data here (checksum {splits.checksum}) is not the data the "
                         f"model was trained on ({manifest['data_checksum']})")
    device = resolve_device(cfg.device)
    assert cfg.model is not None and cfg.batch_size is not None  # resolved
    model = build_model(cfg.model, splits.n_classes, False, None, splits.in_channels, bool(cfg.freeze_bn))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit a {cfg.model}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval()
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    train_counts = splits.train.group_counts()
    workers = 0 if isinstance(splits.train, TensorGroupDataset) else cfg.num_workers  # as the run evaluated
    out: dict[str, Any] = {"stored": {"val": manifest["val"], "test": manifest["test"]}}
    for split in ("val", "test"):
        out[split] = evaluate(model, getattr(splits, split), splits.train.n_attr, train_counts, device,
                              cfg.batch_size * 2, _autocast(device), cuda, workers)
    out["same"] = {"val": None if manifest["refit"] else _same(out["val"], manifest["val"]),
                   "test": _same(out["test"], manifest["test"])}
    return out


def _same(measured: dict[str, Any], stored: dict[str, Any] | None) -> bool | None:
    """Whether every stored metric is measured again exactly (None: none stored, as for an epoch's test split)."""
    return None if stored is None else all(measured.get(k) == v for k, v in stored.items())
