"""A run's resumable state: everything `fit` needs to go on after its last finished epoch as if it had never
stopped — the model, the optimiser, the method's own state (multipliers, EMAs, a second model and its optimiser,
the stage), every random stream, the best checkpoint so far, the patience counter and the history.

`fit(on_state=...)` offers a snapshot (CPU copies) after every epoch; `fit(resume=state)` goes on from one. A state
is `torch.save`d and read back with `weights_only=True` (a damaged or foreign file is refused with the reason, and
never runs code). `Pacer` decides when a snapshot is worth writing: the writes cost at most a budget share of the
training time. On the CPU, with deterministic settings, a resumed run's metrics equal an uninterrupted run's bit
for bit (tests/test_resume.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from .checkpoint import weights_only

FORMAT, VERSION = "debias-study/resume", 1
MAX_BYTES = 16 << 30  # a ResNet-50 with its optimiser is ~200 MB; anything this large is not one of ours

# Settings that change where or how fast a run executes, not what it computes: a state may resume under others.
RUNTIME = ("device", "threads", "num_workers", "compile", "data_dir", "image_loader")


class ResumeError(ValueError):
    """A state this run cannot go on from; the message says why (the run then starts from epoch 0)."""


def fingerprint(hparams: dict[str, Any]) -> str:
    """What a state belongs to: every resolved setting of the run but the runtime ones."""
    kept = {k: v for k, v in hparams.items() if k not in RUNTIME}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor detached and on the CPU: a snapshot the next step cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def nbytes(obj: Any) -> int:
    """The bytes of every tensor in a snapshot: what writing it costs, before it is serialised."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def rng_states(device: torch.device, *generators: torch.Generator) -> dict[str, Any]:
    """Python's, NumPy's, torch's and the run's device's global streams and the run's own generators (those on the
    device are the device's kind: a CUDA generator's state is not a CPU one's), as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"device": device.type,
            "python": random.getstate(), "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos,
                                                   has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "generators": [g.get_state() for g in generators]}


def set_rng_states(states: dict[str, Any], device: torch.device, *generators: torch.Generator) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    for g, s in zip(generators, states["generators"], strict=True):
        g.set_state(s)


@dataclass
class ResumeState:
    """The run after its epoch `epoch` (1-based), as `fit` left it. `best_state` is None when the best epoch is this
    one (its weights are `model`)."""
    fingerprint: str
    data_checksum: str
    epoch: int
    model: dict
    optimizer: dict
    method: dict
    rng: dict
    history: list
    best_epoch: int | None
    best_val: dict | None
    best_state: dict | None
    stale: int

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "version": VERSION, **asdict(self)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ResumeState":
        """ResumeError naming what is wrong: damaged or truncated, not a state, another version."""
        try:
            obj = weights_only(data)
        except ValueError as e:
            raise ResumeError(f"not a readable state (damaged or truncated: {e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ResumeError(f"not a resume state (no {FORMAT} format tag)")
        if obj.get("version") != VERSION:
            raise ResumeError(f"resume state version {obj.get('version')!r}; this version reads {VERSION}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in obj]
        if missing:
            raise ResumeError(f"the state lacks {', '.join(missing)}")
        state = cls(**{n: obj[n] for n in names})
        if not (isinstance(state.epoch, int) and state.epoch >= 1 and len(state.history) == state.epoch):
            raise ResumeError(f"the state's epoch {state.epoch!r} does not match its history of "
                              f"{len(state.history)} epochs")
        return state

    def check(self, hparams: dict[str, Any], data_checksum: str, device: str | None = None) -> None:
        """ResumeError unless this state belongs to a run of these settings on this data (and, given the run's
        device kind, whose random streams are of that kind)."""
        if device is not None and self.rng.get("device") != device:
            raise ResumeError(f"the state's random streams are of a {self.rng.get('device')} run; this run is on "
                              f"{device}")
        if self.fingerprint != fingerprint(hparams):
            raise ResumeError(f"the state is of another run (settings {self.fingerprint}, this run's "
                              f"{fingerprint(hparams)})")
        if self.data_checksum != data_checksum:
            raise ResumeError(f"the state was trained on other data (checksum {self.data_checksum}, here "
                              f"{data_checksum})")
        if self.epoch > hparams.get("epochs", self.epoch):
            raise ResumeError(f"the state is at epoch {self.epoch}, past the run's {hparams['epochs']} epochs")


class Pacer:
    """When to snapshot a run and when to write a snapshot, within one budget: the snapshots (copies to host memory,
    kept for a stop signal's write) and the writes so far, plus the next one, cost at most `budget` of the time
    since the pacer started; a write also waits `interval` seconds after the last. The next snapshot is estimated by
    the last one's time, the next write from the last one's speed (before any: `PRIOR_SECONDS` and
    `PRIOR_SECONDS_PER_BYTE`, a slow shared disk and a database round trip). Cheap states are thus written every
    epoch or so, once a trial has run a few seconds; a ResNet-50's on a fast GPU every many epochs."""
    PRIOR_SECONDS, PRIOR_SECONDS_PER_BYTE = 0.05, 1 / 100e6

    def __init__(self, budget: float = 0.03, interval: float = 0.0, clock=time.monotonic):
        self.budget, self.interval, self.clock = budget, interval, clock
        self.start = self.last = clock()
        self.spent = 0.0  # seconds spent snapshotting and writing
        self.snapshot_seconds = 0.0
        self.fixed, self.per_byte = self.PRIOR_SECONDS, self.PRIOR_SECONDS_PER_BYTE

    def _within(self, cost: float) -> bool:
        return self.budget > 0 and self.spent + cost <= self.budget * (self.clock() - self.start - self.spent)

    def snapshot_due(self) -> bool:
        return self._within(self.snapshot_seconds)

    def snapshotted(self, seconds: float) -> None:
        self.spent += seconds
        self.snapshot_seconds = seconds

    def due(self, nbytes: int) -> bool:
        return self.clock() - self.last >= self.interval and self._within(self.fixed + nbytes * self.per_byte)

    def wrote(self, seconds: float, nbytes: int) -> None:
        self.spent += seconds
        self.last = self.clock()
        self.fixed, self.per_byte = 0.0, seconds / max(nbytes, 1)
