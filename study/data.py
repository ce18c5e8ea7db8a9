"""Image sources, splits, and batch-wise dequantization with flips.

Every source yields uint8 tensors (N, C, H, W): train, validation (held out from the training
data with a fixed split seed, so every variant and run seed sees the same split) and test (used
only for the final evaluation). Augmentation happens on whole batches on the data's device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from study.config import DataConfig


class DataError(ValueError):
    """A data source that is missing or malformed; the message says what was expected and how to get it."""


# public-domain photos shipped inside the scikit-image wheel (no download needed); colour only
PATCH_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
PATCH_SIZE = 32
PATCH_TEST_FRACTION = 0.1
PATCH_SPLIT_SEED = 1234  # fixes which patches are test patches, forever


@dataclass(frozen=True)
class ImageSplits:
    train: torch.Tensor  # uint8 (N, C, H, W)
    val: torch.Tensor
    test: torch.Tensor
    description: str  # one line: where the images came from

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])


def _to_nchw(images: np.ndarray, origin: str) -> torch.Tensor:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{origin}: expected 'images' as uint8 (N, H, W, C) with C in (1, 3), got {images.dtype} {images.shape}"
        )
    if images.shape[1] != images.shape[2]:
        raise DataError(f"{origin}: expected square images, got {images.shape[1]}x{images.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _patches() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Non-overlapping 32x32 patches of the scikit-image photos, with a fixed 90/10 train/test split."""
    import skimage.data

    tiles = []
    for name in PATCH_IMAGES:
        img = getattr(skimage.data, name)()[..., :3]
        h, w = (s - s % PATCH_SIZE for s in img.shape[:2])
        grid = img[:h, :w].reshape(h // PATCH_SIZE, PATCH_SIZE, w // PATCH_SIZE, PATCH_SIZE, 3)
        tiles.append(grid.transpose(0, 2, 1, 3, 4).reshape(-1, PATCH_SIZE, PATCH_SIZE, 3))
    images = _to_nchw(np.concatenate(tiles), "patches")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(PATCH_SPLIT_SEED))
    n_test = int(round(len(images) * PATCH_TEST_FRACTION))
    test, train = images[perm[:n_test]], images[perm[n_test:]]
    return train, test, f"patches: {len(images)} 32x32 patches of scikit-image photos ({', '.join(PATCH_IMAGES)})"


def _load_npz(path: Path, origin: str) -> torch.Tensor:
    import zipfile

    if not zipfile.is_zipfile(path):
        raise DataError(f"{origin}: {path} is not an .npz archive (a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(path) as f:
            if "images" not in f.files:
                raise DataError(f"{origin}: {path} has no 'images' array (found: {', '.join(f.files) or 'none'})")
            images = f["images"]
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle errors: the file is not a readable .npz
        raise DataError(f"{origin}: cannot read {path} as .npz ({type(e).__name__}: {e})") from None
    return _to_nchw(images, f"{origin} {path.name}")


def _npz(path: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A folder holding one *train*.npz and one *test*.npz with 'images' uint8 (N, H, W, C)."""
    hint = "pass --data npz:DIR where DIR holds *train*.npz and *test*.npz (e.g. ../shared/data/cifar10-slices)"
    if not path:
        raise DataError(f"npz source needs a folder: {hint}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"npz source: {root} is not a folder; {hint}")
    found = {}
    for split in ("train", "test"):
        matches = sorted(root.glob(f"*{split}*.npz"))
        if len(matches) != 1:
            raise DataError(f"npz source: expected one *{split}*.npz in {root}, found {len(matches)}; {hint}")
        found[split] = matches[0]
    train = _load_npz(found["train"], "npz source")
    test = _load_npz(found["test"], "npz source")
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"npz source: train images {tuple(train.shape[1:])} and test {tuple(test.shape[1:])} differ")
    return train, test, f"npz: {found['train'].name} ({len(train)}) and {found['test'].name} ({len(test)}) in {root}"


def _cifar10(path: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    from torchvision.datasets import CIFAR10

    root = Path(path or "data/cifar10")
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as e:
        raise DataError(
            f"cifar10 source: no CIFAR-10 under {root} ({e}); add --set data.download=true on a networked "
            "machine, or use --data npz:../shared/data/cifar10-slices"
        ) from None
    except OSError as e:  # download attempted without a network
        raise DataError(f"cifar10 source: download to {root} failed ({e}); use --data npz:DIR offline") from None
    return (
        _to_nchw(train.data, "cifar10"),
        _to_nchw(test.data, "cifar10"),
        f"cifar10: torchvision CIFAR10 under {root} (50000 train, 10000 test)",
    )


def load_splits(cfg: DataConfig) -> ImageSplits:
    """The train/val/test uint8 splits a DataConfig names. Raises DataError with a one-line fix."""
    if cfg.source == "patches":
        train_full, test, desc = _patches()
    elif cfg.source == "npz":
        train_full, test, desc = _npz(cfg.path)
    elif cfg.source == "cifar10":
        train_full, test, desc = _cifar10(cfg.path, cfg.download)
    else:
        raise DataError(f"unknown data source {cfg.source!r}: use patches, npz:DIR or cifar10:DIR")
    n_val = int(round(len(train_full) * cfg.val_fraction))
    perm = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(cfg.split_seed))
    val, train = train_full[perm[:n_val]], train_full[perm[n_val:]]
    if cfg.train_limit:
        train = train[: cfg.train_limit]
    if len(train) < 2:
        raise DataError(f"{cfg.source}: only {len(train)} training images after the validation split")
    if len(val) == 0:
        raise DataError(f"{cfg.source}: the validation split is empty (data.val_fraction={cfg.val_fraction}); "
                        "set data.val_fraction above 0 so every epoch is evaluated")  # fmt: skip
    if len(test) == 0:
        raise DataError(f"{cfg.source}: the test split is empty ({desc}); give the source test images")
    return ImageSplits(train=train, val=val, test=test, description=desc)


def parse_data_spec(spec: str) -> dict[str, str]:
    """Command-line ``--data`` value -> config overrides: ``patches``, ``npz:DIR``, ``cifar10[:DIR]``."""
    source, _, path = spec.partition(":")
    if source not in ("patches", "npz", "cifar10"):
        raise DataError(f"--data {spec!r}: use patches, npz:DIR or cifar10:DIR")
    return {"data.source": source, "data.path": path}


def dequantize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 -> float32 x = (pixel + U[0, 1)) / 256 in [0, 1), on the images' device."""
    noise = torch.rand(images.shape, generator=generator, device=images.device)
    return (images.float() + noise) / 256.0


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2 (one draw per image)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_batches(
    images: torch.Tensor, batch_size: int, generator: torch.Generator, flip: bool = True
) -> Iterator[torch.Tensor]:
    """Shuffled, flipped, dequantized float batches; the last incomplete batch is dropped so batch
    norm never sees a tiny batch (when there are fewer images than one batch, one batch of all)."""
    n = len(images)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
    size = min(batch_size, n)
    for start in range(0, n - size + 1, size):
        x = dequantize(images[perm[start : start + size]], generator)
        yield random_flip(x, generator) if flip else x


def eval_batches(images: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Every image once, in order, no flips, dequantized with noise fixed by ``seed`` so that an
    evaluation is a deterministic function of the model."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    for start in range(0, len(images), batch_size):
        yield dequantize(images[start : start + batch_size], generator)
