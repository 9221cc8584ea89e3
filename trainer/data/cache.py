"""Files cached in DEBIAS_CACHE_DIR (shared by every worker of a host, a compose volume, a Kubernetes PVC), trusted
only after a check: each carries the settings that built it and a checksum of its content, verified on every read.
A damaged, truncated or foreign file is reported in one line and rebuilt, never trained on; a folder that cannot be
written leaves each process its private copy.

Format: one header line (`debias-cache 1 {"key": ..., "sha256": ..., "bytes": ...}`), then the payload
(`torch.save` of the object, or raw array bytes for the memory-mapped image caches, whose header sits in a sidecar).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .. import files
from ..files import read_regular

CACHE_ENV = "DEBIAS_CACHE_DIR"
MAGIC = b"debias-cache 1 "
STALE_TMP = 600  # seconds after which a temporary file beside a cache file is a killed builder's: removed
_warned: set[str] = set()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "debias-study")


def warn_once(text: str) -> None:
    if text not in _warned:  # once per process: a read-only cache is met by every load
        _warned.add(text)
        print(text, file=sys.stderr, flush=True)


def header(key: str, payload_sha256: str, size: int) -> bytes:
    return MAGIC + json.dumps({"key": key, "sha256": payload_sha256, "bytes": size}).encode() + b"\n"


def write_cache_file(path: Path, chunks) -> bool:
    """`trainer.files.write_atomically`, or False (said once) when the folder cannot be written: the caller keeps
    its private copy."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomically(path, chunks)
    except OSError as e:
        warn_once(f"cache {path.parent}: cannot write ({e.strerror}): this process keeps a private copy")
        return False
    now = time.time()
    for old in path.parent.glob(f".{path.name}.*.tmp"):  # left by a builder killed mid-save
        try:
            if now - old.lstat().st_mtime > STALE_TMP:
                old.unlink()
        except OSError:
            pass
    return True


def save_verified(obj, path: Path, key: str) -> bool:
    """torch.save(obj) to `path` with its key and checksum; False when the cache cannot be written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return write_cache_file(path, [header(key, hashlib.sha256(payload).hexdigest(), len(payload)), payload])


def parse_header(data: bytes, key: str) -> tuple[dict, int]:
    """(header fields, payload offset); ValueError saying what is wrong."""
    end = data.find(b"\n")
    if not data.startswith(MAGIC) or end < 0:
        raise ValueError("not a verified cache file")
    try:
        meta = json.loads(data[len(MAGIC):end])
    except ValueError:
        raise ValueError("damaged header") from None
    if not isinstance(meta, dict) or meta.get("key") != key:
        raise ValueError(f"built for other settings ({meta.get('key') if isinstance(meta, dict) else meta!r})")
    return meta, end + 1


def check_content(meta: dict, sha256_hex: str, size: int) -> None:
    """ValueError unless the content's size and sha256 are the ones its header recorded."""
    if size != meta.get("bytes") or sha256_hex != meta.get("sha256"):
        raise ValueError("content does not match its checksum (damaged)")


def load_verified(path: Path, key: str, check: Callable[[object], None] | None = None):
    """What `save_verified` wrote at `path` for `key`, or None: no file, or one that is damaged (checksum), built for
    other settings, or of the wrong structure (`check` raises ValueError), said in one line; the caller rebuilds."""
    try:
        data = read_regular(path)
        if data is None:
            return None
        meta, start = parse_header(data, key)
        payload = data[start:]
        check_content(meta, hashlib.sha256(payload).hexdigest(), len(payload))
        try:
            obj = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as e:  # a torch file can fail in many ways; none is trained on
            raise ValueError(f"unreadable ({type(e).__name__})") from None
        if check is not None:
            check(obj)
        return obj
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        warn_once(f"cache file {path}: {e or type(e).__name__}: rebuilt")
        return None
