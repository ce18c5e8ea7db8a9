import socket

import numpy as np
import pytest
import torch

from study.config import DataConfig
from study.data import (
    DataError,
    dequantize,
    eval_batches,
    load_splits,
    parse_data_spec,
    random_flip,
    train_batches,
)
from tests.conftest import SHARED_CIFAR


def _write_npz(folder, n_train=40, n_test=10, size=32, **override):
    rng = np.random.default_rng(0)
    train = {"images": rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8), "labels": np.zeros(n_train)}
    test = {"images": rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8)}
    train.update(override)
    np.savez(folder / "mini_train.npz", **train)
    np.savez(folder / "mini_test.npz", **test)
    return train["images"]


def _check_splits(splits, size=32):
    for part in (splits.train, splits.val, splits.test):
        assert part.dtype == torch.uint8 and part.ndim == 4 and part.shape[1:] == (3, size, size)


def test_patches_source_works_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    splits = load_splits(DataConfig(source="patches", val_fraction=0.1))
    _check_splits(splits)
    n = len(splits.train) + len(splits.val) + len(splits.test)
    assert n > 1500 and len(splits.test) == round(n * 0.1)
    assert splits.train.float().std() > 20  # real photos, not a constant
    again = load_splits(DataConfig(source="patches", val_fraction=0.1))
    assert torch.equal(again.test, splits.test) and torch.equal(again.val, splits.val)


def test_npz_source_splits_and_keeps_pixels(tmp_path):
    images = _write_npz(tmp_path)
    splits = load_splits(DataConfig(source="npz", path=str(tmp_path), val_fraction=0.25, split_seed=3))
    _check_splits(splits)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    originals = {bytes(im.transpose(2, 0, 1).tobytes()) for im in images}
    for im in torch.cat([splits.train, splits.val]):
        assert bytes(im.numpy().tobytes()) in originals
    limited = load_splits(DataConfig(source="npz", path=str(tmp_path), val_fraction=0.25, split_seed=3, train_limit=5))
    assert len(limited.train) == 5 and torch.equal(limited.val, splits.val)  # limit never moves the split


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="../shared/data/cifar10-slices is not beside this clone")
def test_npz_source_reads_the_real_cifar10_slices():
    splits = load_splits(DataConfig(source="npz", path=str(SHARED_CIFAR), val_fraction=0.1))
    _check_splits(splits)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3600, 400, 500)
    mean = torch.cat([splits.train, splits.val]).float().mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([125.36, 122.85, 113.39]), atol=0.05)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: None, r"expected one \*train\*\.npz"),
        (lambda d: _write_npz(d, images=np.zeros((4, 32, 32, 3), np.float32)), "expected 'images' as uint8"),
        (lambda d: _write_npz(d, images=np.zeros((4, 32, 16, 3), np.uint8)), "expected square images"),
        (lambda d: [(d / f"x_{s}.npz").write_text("not a zip") for s in ("train", "test")], "is not an .npz archive"),
    ],
)
def test_malformed_npz_is_a_one_line_error(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(DataError, match=match) as info:
        load_splits(DataConfig(source="npz", path=str(tmp_path)))
    assert "\n" not in str(info.value)


def test_npz_without_images_key_and_bad_folder(tmp_path):
    np.savez(tmp_path / "a_train.npz", pixels=np.zeros((2, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "a_test.npz", pixels=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="has no 'images' array"):
        load_splits(DataConfig(source="npz", path=str(tmp_path)))
    with pytest.raises(DataError, match="is not a folder"):
        load_splits(DataConfig(source="npz", path=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="needs a folder"):
        load_splits(DataConfig(source="npz", path=""))


def test_cifar10_missing_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 under .*data.download=true") as info:
        load_splits(DataConfig(source="cifar10", path=str(tmp_path)))
    assert "\n" not in str(info.value)


def test_data_spec_parsing():
    assert parse_data_spec("npz:/a/b") == {"data.source": "npz", "data.path": "/a/b"}
    assert parse_data_spec("patches") == {"data.source": "patches", "data.path": ""}
    with pytest.raises(DataError, match="use patches, npz:DIR or cifar10:DIR"):
        parse_data_spec("imagenet:/x")


def test_dequantize_range_and_determinism():
    u8 = torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(1000, 1, 1, 2).contiguous()
    x = dequantize(u8, torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32
    assert (x[..., 0] >= 0).all() and (x[..., 0] < 1 / 256).all()
    assert (x[..., 1] >= 255 / 256).all() and (x[..., 1] < 1).all()
    assert torch.equal(x, dequantize(u8, torch.Generator().manual_seed(1)))
    assert abs(x[..., 0].mean().item() * 256 - 0.5) < 0.05  # uniform noise


def test_flip_flips_about_half_the_images_horizontally():
    x = torch.arange(4.0).reshape(1, 1, 1, 4).repeat(400, 1, 1, 1)
    y = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (y == x.flip(-1)).all(dim=(1, 2, 3))
    kept = (y == x).all(dim=(1, 2, 3))
    assert torch.all(flipped ^ kept)
    assert 150 < flipped.sum() < 250


def test_batches_cover_data_and_are_reproducible():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    batches = list(train_batches(images, 4, torch.Generator().manual_seed(0), flip=True))
    assert [len(b) for b in batches] == [4, 4]  # incomplete last batch dropped
    seen = torch.cat(batches).mul(256).floor()[:, 0, 0, 0].long().tolist()
    assert len(set(seen)) == 8
    again = list(train_batches(images, 4, torch.Generator().manual_seed(0), flip=True))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    ev = list(eval_batches(images, 4, seed=5))
    assert [len(b) for b in ev] == [4, 4, 2]
    assert torch.cat(ev).mul(256).floor()[:, 0, 0, 0].long().tolist() == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(ev, eval_batches(images, 4, seed=5), strict=True))
