import gzip
import shutil

import numpy as np
import pytest

from families.data import DEBIAN_PACKAGE, DEFAULT_DATA_DIR, DatasetError, load_split


def test_loads_both_splits_with_labels_in_range():
    train, test = load_split("train"), load_split("test")
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 28, 28)
    assert set(np.unique(test.labels)) == set(range(10))
    assert np.bincount(test.labels).tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    assert train.sha256 != test.sha256


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(DatasetError, match=DEBIAN_PACKAGE):
        load_split("test", tmp_path)


def test_env_var_points_the_loader_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=str(tmp_path)):
        load_split("test")


def _copy_test_split(dst):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(DEFAULT_DATA_DIR / name, dst / name)


def test_uncompressed_files_verify_too(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((DEFAULT_DATA_DIR / f"{name}.gz").read_bytes()))
    assert load_split("test", tmp_path).images.shape == (10_000, 28, 28)


def test_hash_mismatch_is_refused(tmp_path):
    _copy_test_split(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: still a valid IDX file, but not Fashion-MNIST
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match="sha256.*" + DEBIAN_PACKAGE):
        load_split("test", tmp_path)


def test_truncated_archive_is_refused(tmp_path):
    _copy_test_split(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="corrupt"):
        load_split("test", tmp_path)


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be"):
        load_split("validation")
