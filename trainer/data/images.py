"""Image datasets on disk: Waterbirds and CelebA in their official layouts, and a generic folder layout.

decoded=True (default): decoded once into cached uint8 tensors, augmented on the device (see decoded.py); whether
training batches are augmented is the run's `augment` setting, applied in the training loop.
decoded=False: the reference PIL path, decoding (and, with augment=True, augmenting) per item in DataLoader workers.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import pandas as pd

from .base import DataError, GroupDataset, Splits
from .decoded import (CROP_RATIO, CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, DecodedImageDataset, cache_key,
                      decode_images, stored_size)

SPLIT_NAMES = ("train", "val", "test")


def image_transform(train: bool, image_size: int):
    """ImageNet-style: random resized crop + flip for training (augmented), resize + centre crop for evaluation
    and for training without augmentation."""
    from torchvision import transforms  # torchvision's import costs ~2 s: only image datasets pay it
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO),
            transforms.RandomHorizontalFlip(), *norm])
    return transforms.Compose([
        transforms.Resize(stored_size(image_size)), transforms.CenterCrop(image_size), *norm])


class ImageGroupDataset(GroupDataset):
    def __init__(self, paths: list[Path], y, a, n_classes: int, n_attr: int, transform):
        self.paths, self.transform = paths, transform
        self.y, self.a = torch.tensor(y, dtype=torch.long), torch.tensor(a, dtype=torch.long)
        self.n_classes, self.n_attr = n_classes, n_attr

    def load(self, idx: int) -> torch.Tensor:
        path = self.paths[idx]
        try:
            with Image.open(path) as opened:
                img = opened.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:  # a 20000 x 20000 bomb too
            raise DataError(f"{path}: unreadable image ({e})") from None
        return self.transform(img)


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: data directory not found")
    return path


def _read_csv(path: Path, required: list[str], **kw) -> pd.DataFrame:
    import pandas as pd  # its import costs 0.4 s: only the on-disk datasets pay it
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})")
    return df


def _int_column(df: pd.DataFrame, col: str, source: Path) -> pd.Series:
    import pandas as pd
    values = pd.to_numeric(df[col], errors="coerce")
    bad = df[col][values.isna() | (values < 0) | (values != values.round())]
    if len(bad):
        raise DataError(f"{source}: column {col} has non-integer or negative value {str(bad.iloc[0])!r}")
    return values.astype(int)


def _split_codes(series: pd.Series, source: Path) -> pd.Series:
    """Split column as 0/1/2 or train/val/test."""
    names = {"0": 0, "1": 1, "2": 2, "train": 0, "val": 1, "valid": 1, "test": 2}
    codes = series.astype(str).str.strip().str.lower().map(names)
    if codes.isna().any():
        bad = str(series[codes.isna()].iloc[0])
        raise DataError(f"{source}: unknown split code {bad!r} (expected 0/1/2 or train/val/test)")
    return codes.astype(int)


def _checksum(meta_files: list[Path], paths: list[Path]) -> str:
    """Metadata bytes plus every image's name and content: an edited image changes it even at the same size and
    name (reading the bytes costs about a second per GB)."""
    h = hashlib.sha256()
    for f in meta_files:
        h.update(f.read_bytes())
    for p in paths:
        with open(p, "rb") as stream:
            h.update(f"{p.name}:".encode() + hashlib.file_digest(stream, "sha256").digest())
    return h.hexdigest()[:16]


def _build(root: Path, meta_files: list[Path], files: pd.Series, y: pd.Series, a: pd.Series, split: pd.Series,
           name: str, image_size: int, decoded: bool, augment: bool) -> Splits:
    paths = [root / f for f in files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: image file not found ({len(missing)} of {len(paths)} listed images missing)")
    for column, values in (("label y", y), ("attribute a", a)):
        seen = sorted(int(v) for v in values.unique())
        if seen != list(range(len(seen))):  # {0, 5} would train a six-class model, four classes never seen
            raise DataError(f"{meta_files[0]}: {column} takes the values {seen}: expected 0, 1, ... with none missing")
    n_classes, n_attr = int(y.max()) + 1, int(a.max()) + 1
    checksum = _checksum(meta_files, paths)
    out: dict[str, GroupDataset] = {}
    for code, split_name in enumerate(SPLIT_NAMES):
        rows = (split == code).to_numpy()
        if not rows.any():
            raise DataError(f"{meta_files[0]}: split {split_name} ({code}) has no rows")
        split_paths, ys, as_ = [p for p, r in zip(paths, rows) if r], y[rows].to_numpy(), a[rows].to_numpy()
        if decoded:
            size = stored_size(image_size)
            x = decode_images(split_paths, size, cache_key(split_paths, size), f"decoding {name} {split_name}")
            out[split_name] = DecodedImageDataset(x, ys, as_, n_classes, n_attr, image_size)
        else:
            out[split_name] = ImageGroupDataset(split_paths, ys, as_, n_classes, n_attr,
                                                image_transform(augment and split_name == "train", image_size))
    return Splits(**out, name=name, checksum=checksum)


def load_waterbirds(data_dir: str | None = None, image_size: int = 224, decoded: bool = True, augment: bool = True,
                    **_) -> Splits:
    """metadata.csv: img_id,img_filename,y,split,place,place_filename; group = 2*y + place."""
    root = _require_dir(Path(data_dir or "data/waterbirds"))
    meta = root / "metadata.csv"
    df = _read_csv(meta, ["img_id", "img_filename", "y", "split", "place", "place_filename"])
    return _build(root, [meta], df["img_filename"], _int_column(df, "y", meta), _int_column(df, "place", meta),
                  _split_codes(df["split"], meta), "waterbirds", image_size, decoded, augment)


def load_celeba(data_dir: str | None = None, image_size: int = 224, decoded: bool = True, augment: bool = True,
                **_) -> Splits:
    """list_attr_celeba.txt + list_eval_partition.txt + img_align_celeba/; y = Blond_Hair, a = Male."""
    root = _require_dir(Path(data_dir or "data/celeba"))
    attr_file, part_file = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    # list_attr_celeba.txt: a count line, a header line of 40 names, then "file v1 ... v40" with v in {-1, 1}.
    attrs = _read_csv(attr_file, ["Blond_Hair", "Male"], sep=r"\s+", skiprows=1)
    parts = _read_csv(part_file, ["image_id", "partition"], sep=r"\s+", header=None, names=["image_id", "partition"])
    if len(parts) != len(attrs) or not (parts["image_id"].to_numpy() == attrs.index.to_numpy()).all():
        raise DataError(f"{part_file}: image list does not match {attr_file.name} ({len(parts)} vs {len(attrs)} rows)")
    for col in ("Blond_Hair", "Male"):
        bad = attrs[col][~attrs[col].isin([-1, 1])]
        if len(bad):
            raise DataError(f"{attr_file}: column {col} has value {str(bad.iloc[0])} (expected -1 or 1)")
    y = (attrs["Blond_Hair"] == 1).astype(int).reset_index(drop=True)
    a = (attrs["Male"] == 1).astype(int).reset_index(drop=True)
    files = "img_align_celeba/" + parts["image_id"].astype(str)
    return _build(root, [attr_file, part_file], files, y, a, _split_codes(parts["partition"], part_file),
                  "celeba", image_size, decoded, augment)


def load_folder(data_dir: str | None = None, image_size: int = 224, decoded: bool = True, augment: bool = True,
                **_) -> Splits:
    """Users' own data: metadata.csv with filename,y,a,split (split train|val|test or 0/1/2)."""
    if not data_dir:
        raise DataError("dataset 'folder' needs --data-dir pointing at a folder with metadata.csv")
    root = _require_dir(Path(data_dir))
    meta = root / "metadata.csv"
    df = _read_csv(meta, ["filename", "y", "a", "split"])
    return _build(root, [meta], df["filename"], _int_column(df, "y", meta), _int_column(df, "a", meta),
                  _split_codes(df["split"], meta), "folder", image_size, decoded, augment)
