"""Image splits decoded once to uint8 tensors and cached on disk; augmentation runs batched on the device.

A PIL DataLoader decodes every JPEG every epoch and cannot feed a GPU (2,257 img/s with 8 workers against a
4,322 img/s ResNet-50 step on an H200). Here each image is decoded once, resized (shorter side) and centre-cropped
to `stored_size(image_size)` (256 for 224), and kept as uint8 in a cache file that every process memory-maps: the
workers on one host share one copy in the page cache (CelebA's training split is 32 GB) instead of each holding a
private one. A split that fits in a quarter of the free GPU memory is copied there (Waterbirds' is under 1 GB);
else batches are gathered from the mapping and pinned one at a time. Per batch, on the device: a random resized
crop (roi_align, one kernel for the batch) + horizontal flip for augmented training, the deterministic centre crop
for evaluation (and for training without augmentation), then ImageNet normalisation.

Difference to the PIL path: the random crop is taken inside the stored centre square, not the full frame.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .base import DataError, TensorGroupDataset
from .cache import (CACHE_ENV, cache_dir, check_content, header, parse_header, read_regular, warn_once,
                    write_cache_file)

__all__ = ["CACHE_ENV", "cache_dir"]  # where the image caches live, for the callers that name them

CACHE_VERSION = "1"  # bump when the decoding changes: old cache files are then ignored
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_SCALE, CROP_RATIO = (0.7, 1.0), (3 / 4, 4 / 3)  # the same as the PIL path's RandomResizedCrop


def stored_size(image_size: int) -> int:
    """The evaluation resize of the PIL path (256 for a 224 crop): centre crops then match it exactly."""
    return int(round(image_size * 256 / 224))


def decoder_versions() -> str:
    """The libraries whose decoding and resizing make the cached pixels."""
    import PIL
    import torchvision
    return f"pillow {PIL.__version__}, torchvision {torchvision.__version__}"


def cache_key(paths: list[Path], size: int, versions: str | None = None) -> str:
    """Changes when the split's image list from the metadata (order included), an image's size or modification
    time, the stored size, or the Pillow / torchvision versions (`versions`, default the installed ones) change.
    Labels are not cached, so a label edit costs no re-decode."""
    versions = decoder_versions() if versions is None else versions
    h = hashlib.sha256(f"{CACHE_VERSION}:{size}:{versions}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def decode_one(path: Path, size: int) -> torch.Tensor:
    """PIL decode + PIL resize of the shorter side + centre crop: the PIL path's evaluation pixels exactly."""
    try:
        with Image.open(path) as opened:
            img = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:  # a 20000 x 20000 bomb too
        raise DataError(f"{path}: unreadable image ({e})") from None
    import torchvision.transforms.functional as TF  # torchvision's import costs ~2 s: only image datasets pay it
    img = TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


CHUNK = 1 << 24


def _mapped(path: Path, shape: tuple, key: str) -> torch.Tensor | None:
    """The cache file memory-mapped copy-on-write, once its content matches the checksum in its sidecar: its pages
    are the OS page cache, shared by every process on the host that maps the same split (never written, so never
    copied). None when it is missing; damaged or foreign: said in one line, and (re)built."""
    try:
        meta_bytes = read_regular(path.with_name(path.name + ".sha256"))
        if meta_bytes is None or not path.exists():
            return None
        meta, _ = parse_header(meta_bytes, key)
        h, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        check_content(meta, h.hexdigest(), size)
        arr = np.load(path, mmap_mode="c")
        if arr.shape != shape or arr.dtype != np.uint8:
            raise ValueError(f"holds {arr.dtype} {arr.shape}, expected uint8 {shape}")
    except (OSError, ValueError) as e:
        warn_once(f"cache file {path}: {e}: rebuilt")
        return None
    return torch.from_numpy(arr)


def _save_npy(path: Path, arr: np.ndarray, key: str) -> bool:
    """The array as a .npy file and its checksum beside it (`.npy.sha256`), each written atomically."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    chunks: list = [buf.getvalue(), *(flat[i:i + CHUNK] for i in range(0, len(flat), CHUNK))]
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    size = sum(len(c) for c in chunks)
    return (write_cache_file(path, chunks) and
            write_cache_file(path.with_name(path.name + ".sha256"), [header(key, h.hexdigest(), size)]))


def decode_images(paths: list[Path], size: int, key: str, desc: str = "decoding") -> torch.Tensor:
    """uint8 (N, 3, size, size), memory-mapped from the cache file; built (once per host) on a miss.

    Several workers starting on a cold cache: the first takes the key's lock file and decodes, the others wait on
    the lock and then map its file. A cache folder that cannot be written costs a private decode per process."""
    path, shape = cache_dir() / f"{key}.npy", (len(paths), 3, size, size)
    if (x := _mapped(path, shape, key)) is not None:
        return x
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:
        return _decode_all(paths, size, desc)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if (x := _mapped(path, shape, key)) is not None:
            return x  # another process built it while we waited
        out = _decode_all(paths, size, desc)
        if not _save_npy(path, out.numpy(), key):
            return out
    x = _mapped(path, shape, key)  # the builder, too, shares the mapped file instead of keeping its private decode
    return out if x is None else x


def _decode_all(paths: list[Path], size: int, desc: str) -> torch.Tensor:
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def work(i):
        out[i] = decode_one(paths[i], size)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        list(tqdm(pool.map(work, range(len(paths))), total=len(paths), desc=desc, unit="img", leave=False,
                  disable=len(paths) < 2000))
    return out


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # per channel with Python scalars: a mean/std tensor made here would be a host-to-device copy that syncs
    return torch.stack([(x[:, c] / 255.0 - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))],
                       dim=1)


def centre_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float (B, 3, crop, crop): the evaluation transform."""
    top = int(round((x.shape[-1] - crop) / 2.0))  # as transforms.CenterCrop rounds
    return _normalise(x[..., top:top + crop, top:top + crop].float())


def crop_boxes(n: int, side: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """RandomResizedCrop boxes (batch index, x0, y0, x1, y1) inside a side x side image, drawn on the device."""
    u = torch.rand((4, n), generator=generator, device=device)
    area = side * side * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[0])
    log_r = math.log(CROP_RATIO[0]) + (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0])) * u[1]
    w = (area * log_r.exp()).sqrt().clamp(max=side)
    h = (area / log_r.exp()).sqrt().clamp(max=side)
    x0, y0 = (side - w) * u[2], (side - h) * u[3]
    idx = torch.arange(n, device=device, dtype=w.dtype)
    return torch.stack([idx, x0, y0, x0 + w, y0 + h], dim=1)


def augment(x: torch.Tensor, crop: int, generator: torch.Generator | None) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float (B, 3, crop, crop): random resized crop + flip, batched."""
    n = x.shape[0]
    boxes = crop_boxes(n, x.shape[-1], generator, x.device)
    from torchvision.ops import roi_align
    out = roi_align(x.float(), boxes, output_size=(crop, crop), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    out = torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)
    return _normalise(out)


class DecodedImageDataset(TensorGroupDataset):
    """A split as uint8 (N, 3, S, S); `batch_transform` makes model inputs on whatever device x is on."""

    def __init__(self, x: torch.Tensor, y, a, n_classes: int, n_attr: int, crop: int):
        super().__init__(x, torch.tensor(y), torch.tensor(a), n_classes, n_attr)
        self.crop = crop

    def batch_transform(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None):
        return augment(x, self.crop, generator) if train else centre_crop(x, self.crop)
