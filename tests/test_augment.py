"""The decoded-image path: its batched augmentation matches the PIL path's shapes, ranges and seeding (on CPU)."""
import time

import pytest
import torch
from PIL import Image

from trainer.data import load_splits, make_loader
from trainer.data.decoded import augment, cache_dir, crop_boxes
from trainer.data.images import image_transform

LOW = torch.tensor([(0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]).view(3, 1, 1)
HIGH = torch.tensor([(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]).view(3, 1, 1)


def first_batch(split, n=8):
    return next(iter(make_loader(split, n, shuffle=False)))[0]


def test_training_augmentation_matches_pil_path(waterbirds_dir):
    s = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=24)
    x = first_batch(s.train)
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 27, 27)
    out = s.train.batch_transform(x, train=True, generator=torch.Generator().manual_seed(0))
    with Image.open(waterbirds_dir / sorted(waterbirds_dir.glob("*/img_0.jpg"))[0]) as img:
        ref = image_transform(True, 24)(img.convert("RGB"))
    assert out.shape[1:] == ref.shape and out.dtype == ref.dtype
    eps = 1e-4
    for t in (out, ref):  # both normalised from [0, 1] pixels
        assert bool(((t >= LOW - eps) & (t <= HIGH + eps)).all())
    again = s.train.batch_transform(x, train=True, generator=torch.Generator().manual_seed(0))
    other = s.train.batch_transform(x, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    evals = [s.train.batch_transform(x, train=False) for _ in range(2)]
    assert torch.equal(*evals) and not torch.allclose(out, evals[0])


def test_evaluation_crop_matches_pil_centre_crop(waterbirds_dir):
    s = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=24)
    ref = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=24, decoded=False)
    ours = s.val.batch_transform(first_batch(s.val, 4), train=False)
    theirs = first_batch(ref.val, 4)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # the same pixels: decoded by PIL, same resize


def test_crop_boxes_follow_scale_and_ratio():
    boxes = crop_boxes(20000, 256, torch.Generator().manual_seed(0), "cpu")
    w, h = boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]
    assert bool((boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 256 + 1e-3).all() and (boxes[:, 4] <= 256 + 1e-3).all())
    area = w * h / 256**2
    assert area.min() > 0.55 and area.max() <= 1.0 + 1e-5  # 0.7..1.0, smaller where a side was clipped
    assert (w / h).min() >= 0.75 - 1e-3 and (w / h).max() <= 4 / 3 + 1e-3 or area.max() < 1.0


def test_flips_half_the_batch():
    x = torch.zeros(512, 3, 64, 64, dtype=torch.uint8)
    x[..., 32:] = 255  # dark left half, bright right half
    out = augment(x, 56, torch.Generator().manual_seed(0))
    flipped = out[..., :28].mean((1, 2, 3)) > out[..., 28:].mean((1, 2, 3))
    assert out.shape == (512, 3, 56, 56) and 0.42 < flipped.float().mean() < 0.58


def test_cache_is_reused_and_invalidated(waterbirds_dir):
    before = set(cache_dir().glob("*.npy"))
    load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=40)
    made = set(cache_dir().glob("*.npy")) - before
    assert len(made) == 3  # one file per split
    stamps = {p: p.stat().st_mtime_ns for p in made}
    time.sleep(0.01)
    again = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=40)
    assert {p: p.stat().st_mtime_ns for p in made} == stamps  # read, not rewritten
    img = sorted(waterbirds_dir.glob("*/img_0.jpg"))[0]  # a training image changes
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    changed = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=40)
    assert len(set(cache_dir().glob("*.npy")) - before) == 4  # train re-decoded, val/test reused
    assert not torch.equal(changed.train.x, again.train.x) and torch.equal(changed.val.x, again.val.x)
    assert changed.checksum != again.checksum


@pytest.mark.parametrize("loader", ["decoded", "pil"])
def test_training_on_images_with_either_loader(waterbirds_dir, loader):
    from trainer import TrainConfig, fit
    cfg = TrainConfig(dataset="waterbirds", data_dir=str(waterbirds_dir), method="fim", model="resnet18",
                      pretrained=False, image_size=24, epochs=2, batch_size=4, num_workers=0, device="cpu",
                      image_loader=loader, method_params={"warmup_epochs": 1})
    runs = [fit(cfg, log=None) for _ in range(2)]
    assert runs[0].epochs_run == 2 and not runs[0].compiled
    assert runs[0].history[-1]["constrained"] and runs[0].test["groups"]
    assert [h["train_loss"] for h in runs[0].history] == [h["train_loss"] for h in runs[1].history]
