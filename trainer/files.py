"""Files written whole or not at all."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable


def write_atomically(path: Path, data: str | bytes | Iterable[bytes]) -> None:
    """A complete file at `path` or none: written to an unpredictable temporary file beside it (created with
    O_EXCL, so a symlink planted at a predictable name is never followed and no existing file is touched), then
    renamed over `path`; the temporary file never stays. OSError when it cannot be written."""
    chunks = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_regular(path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of a regular file (never a FIFO, which would block, or a device such as /dev/zero, which would
    never end), None when there is none; OSError naming what it is otherwise, or when it holds more than `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder in words of its own
        os.close(fd)
        raise OSError("not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise OSError(f"larger than {limit} bytes")
    return data
