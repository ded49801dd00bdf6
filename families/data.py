"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: IDX files, hash-checked, never downloaded."""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# sha256 of each file's *decompressed* IDX bytes, so a .gz file and its unpacked twin verify alike.
IDX_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class DatasetError(RuntimeError):
    """The Fashion-MNIST files are missing or not the ones we expect."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    sha256: str         # digest of the split's image and label hashes: names the data a model saw


def data_dir() -> Path:
    return Path(os.environ.get("GENSERVE_DATA_DIR", DEFAULT_DATA_DIR))


def _read_verified(directory: Path, name: str) -> bytes:
    for path in (directory / name, directory / f"{name}.gz"):
        if path.is_file():
            raw = path.read_bytes()
            try:
                data = gzip.decompress(raw) if path.suffix == ".gz" else raw
            except (OSError, EOFError) as exc:
                raise DatasetError(f"{path} is corrupt ({exc}); reinstall it with "
                                   f"`apt-get install --reinstall {DEBIAN_PACKAGE}`") from exc
            if hashlib.sha256(data).hexdigest() != IDX_SHA256[name]:
                raise DatasetError(f"{path} does not match the expected sha256; the file is corrupt "
                                   f"or not Fashion-MNIST. Reinstall it with "
                                   f"`apt-get install --reinstall {DEBIAN_PACKAGE}`")
            return data
    raise DatasetError(f"Fashion-MNIST file {name}[.gz] not found in {directory}. Install Debian's "
                       f"`{DEBIAN_PACKAGE}` package (`apt-get install {DEBIAN_PACKAGE}`) or point "
                       f"GENSERVE_DATA_DIR at a folder holding the IDX files.")


def _parse_idx(data: bytes, ndim: int) -> np.ndarray:
    # IDX header: two zero bytes, dtype code 0x08 (uint8), ndim, then ndim big-endian uint32 sizes.
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, directory: Path | None = None) -> Split:
    """The `train` (60,000) or `test` (10,000) split, verified against the known hashes."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _load_split(split, Path(directory) if directory is not None else data_dir())


@lru_cache(maxsize=4)
def _load_split(split: str, directory: Path) -> Split:
    image_name = f"{SPLIT_PREFIX[split]}-images-idx3-ubyte"
    label_name = f"{SPLIT_PREFIX[split]}-labels-idx1-ubyte"
    images = _parse_idx(_read_verified(directory, image_name), 3)
    labels = _parse_idx(_read_verified(directory, label_name), 1).astype(np.int64)
    digest = hashlib.sha256((IDX_SHA256[image_name] + IDX_SHA256[label_name]).encode()).hexdigest()
    return Split(images=images, labels=labels, sha256=digest)
