"""Tests of jaxsplit.data: datasets, helpers, IDX / TFDS / npz / synthetic sources."""

from __future__ import annotations

import gzip
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxsplit import data
from jaxsplit.data import idx as idx_module
from jaxsplit.data import sources as sources_module
from jaxsplit.data.dataset import DataError, DataNotFoundError, Dataset

# --------------------------------------------------------------------------- helpers


def _shared_data_dir() -> Path | None:
    """``$JAXSPLIT_DATA_DIR`` (``make test`` sets it when a datasets folder is found)."""
    candidates = []
    if os.environ.get("JAXSPLIT_DATA_DIR"):
        candidates.append(Path(os.environ["JAXSPLIT_DATA_DIR"]))
    for base in candidates:
        if (base / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file():
            return base
    return None


REAL_DATA_DIR = _shared_data_dir()
needs_real_data = pytest.mark.skipif(
    REAL_DATA_DIR is None,
    reason="Fashion-MNIST IDX files not found (set JAXSPLIT_DATA_DIR to a directory holding "
    "fashion-mnist/train-images-idx3-ubyte.gz ...)",
)


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _write(path: Path, payload: bytes, gz: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _write_fashion(directory: Path, split: str = "train", num: int = 5, gz: bool = True,
                   fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Writes a tiny valid IDX pair; images are ``fill + index`` so the source is visible."""
    prefix = "train" if split == "train" else "t10k"
    images = np.zeros((num, 28, 28), np.uint8) + np.arange(num, dtype=np.uint8)[:, None, None]
    images = images + np.uint8(fill)
    labels = (np.arange(num) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    _write(directory / f"{prefix}-images-idx3-ubyte{suffix}", _idx_bytes(images), gz)
    _write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", _idx_bytes(labels), gz)
    return images, labels


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """Search bases under tmp_path: an explicit dir, $JAXSPLIT_DATA_DIR, and the Debian dir."""
    arg, env, deb = tmp_path / "arg", tmp_path / "env", tmp_path / "deb"
    for d in (arg, env, deb):
        d.mkdir()
    monkeypatch.setenv("JAXSPLIT_DATA_DIR", str(env))
    monkeypatch.setattr(idx_module, "DEBIAN_DATASETS_DIR", deb)
    return arg, env, deb


def _indexed(num: int, num_classes: int = 4, hw: int = 2, channels: int = 1) -> Dataset:
    """Images whose every pixel equals the example index; label = index % num_classes."""
    images = np.broadcast_to(
        np.arange(num, dtype=np.float32)[:, None, None, None], (num, hw, hw, channels)
    ).copy()
    labels = (np.arange(num) % num_classes).astype(np.int32)
    names = tuple(f"c{i}" for i in range(num_classes))
    return Dataset(images, labels, num_classes, names)


def _ids(ds: Dataset) -> np.ndarray:
    return ds.images[:, 0, 0, 0].astype(np.int64)


# --------------------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_train() -> Dataset:
    return data.load_idx_dataset("fashion_mnist", "train", data_dir=REAL_DATA_DIR)


@needs_real_data
def test_real_fashion_mnist_train(fashion_train):
    ds = fashion_train
    assert ds.images.shape == (60000, 28, 28, 1)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
    assert ds.labels.shape == (60000,)
    assert ds.num_classes == 10
    assert ds.class_names == data.FASHION_MNIST_CLASS_NAMES
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    np.testing.assert_array_equal(ds.class_counts(), np.full(10, 6000))
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.images.max() == 1.0  # some pixel is 255


@needs_real_data
def test_real_fashion_mnist_test_matches_raw_bytes():
    ds = data.load("idx", "fashion_mnist", "test", data_dir=REAL_DATA_DIR)
    assert ds.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(ds.class_counts(), np.full(10, 1000))
    raw = data.read_idx_images(REAL_DATA_DIR / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")
    assert raw.dtype == np.uint8 and raw.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.round(ds.images[..., 0] * 255).astype(np.uint8), raw)


@needs_real_data
def test_real_fashion_mnist_standard_pipeline(fashion_train):
    test = data.load("auto", "fashion_mnist", "test", data_dir=REAL_DATA_DIR)
    train, valid, test_n, stats = data.standard_pipeline(fashion_train, test)
    assert (len(train), len(valid), len(test_n)) == (48000, 12000, 10000)
    assert train.image_shape == valid.image_shape == test_n.image_shape == (32, 32, 1)
    assert stats["normalization"] == "dataset"
    # The train part is standardised by its own statistics.
    mean, std = data.compute_mean_std(train)
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    np.testing.assert_allclose(std, 1.0, atol=1e-4)


# --------------------------------------------------------------------------- IDX search order


def test_idx_search_order_and_layouts(isolated_dirs):
    arg, env, deb = isolated_dirs
    _write_fashion(deb / "fashion-mnist", fill=30)
    ds = data.load_idx_dataset("fashion_mnist", "train")
    assert ds.images[0, 0, 0, 0] == pytest.approx(30 / 255)
    # $JAXSPLIT_DATA_DIR directly (no sub-folder), un-gzipped, beats Debian's directory.
    _write_fashion(env, gz=False, fill=20)
    ds = data.load_idx_dataset("fashion_mnist", "train")
    assert ds.images[0, 0, 0, 0] == pytest.approx(20 / 255)
    # The explicit data_dir beats both.
    _write_fashion(arg, fill=10)
    ds = data.load_idx_dataset("fashion_mnist", "train", data_dir=arg)
    assert ds.images[0, 0, 0, 0] == pytest.approx(10 / 255)
    # <base>/fashion-mnist/ comes before <base>/.
    _write_fashion(arg / "fashion-mnist", fill=40)
    ds = data.load_idx_dataset("fashion_mnist", "train", data_dir=arg)
    assert ds.images[0, 0, 0, 0] == pytest.approx(40 / 255)
    assert ds.images.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(_ids_u8(ds), np.arange(5) + 40)


def _ids_u8(ds: Dataset) -> np.ndarray:
    return np.round(ds.images[:, 5, 5, 0] * 255).astype(np.int64)


def test_missing_data_lists_every_place_and_three_ways(isolated_dirs):
    arg, env, deb = isolated_dirs
    # A lone images file is reported but not used.
    _write(env / "t10k-images-idx3-ubyte.gz", _idx_bytes(np.zeros((1, 28, 28))))
    with pytest.raises(DataNotFoundError) as info:
        data.load_idx_dataset("fashion_mnist", "test", data_dir=arg)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for place in (arg / "fashion-mnist", arg, env / "fashion-mnist", env,
                  deb / "fashion-mnist", deb):
        assert f"  {place}" in message
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "found t10k-images-idx3-ubyte.gz but not its pair" in message
    assert "pip install 'jaxsplit[tfds]'" in message and "'tfds'" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "JAXSPLIT_DATA_DIR" in message


def test_missing_mnist_says_no_debian_package(isolated_dirs):
    with pytest.raises(DataNotFoundError, match="Debian has no package for mnist"):
        data.load("idx", "mnist", "train")


def test_idx_unknown_name_or_split():
    with pytest.raises(ValueError, match="unknown IDX dataset 'cifar10'"):
        data.load_idx_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        data.load_idx_dataset("fashion_mnist", "valid")


# --------------------------------------------------------------------------- corrupt IDX


def test_read_idx_roundtrip_gz_and_plain(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    for gz in (True, False):
        path = _write(tmp_path / f"a{gz}", _idx_bytes(array), gz)
        np.testing.assert_array_equal(data.read_idx_images(path), array)
        np.testing.assert_array_equal(data.read_idx(path), array)


@pytest.mark.parametrize(
    "magic, pattern",
    [
        (0x00000801, r"bad IDX magic number 0x00000801 \(1 dimensions\); expected 0x00000803"),
        (0x12340803, r"bad IDX magic number 0x12340803; expected 0x00000803"),
        (0x00000903, r"element type 0x09 is not supported; expected 0x00000803"),
    ],
)
def test_idx_wrong_magic(tmp_path, magic, pattern):
    path = _write(tmp_path / "images.gz", _idx_bytes(np.zeros((2, 3, 3)), magic=magic))
    with pytest.raises(DataError, match=pattern) as info:
        data.read_idx_images(path)
    assert str(path) in str(info.value)


def test_idx_wrong_magic_for_labels(tmp_path):
    path = _write(tmp_path / "labels", _idx_bytes(np.zeros((2, 3, 3))), gz=False)
    with pytest.raises(DataError, match="expected 0x00000801"):
        data.read_idx_labels(path)


def test_idx_truncated_payload_and_trailing_bytes(tmp_path):
    payload = _idx_bytes(np.zeros((4, 28, 28)))
    path = _write(tmp_path / "cut.gz", payload[:-10])
    with pytest.raises(DataError, match=r"truncated payload.*\(4, 28, 28\) = 3136 bytes, found 3126"):
        data.read_idx_images(path)
    path = _write(tmp_path / "long.gz", payload + b"\x00")
    with pytest.raises(DataError, match="trailing bytes.*found 3137"):
        data.read_idx_images(path)
    path = _write(tmp_path / "header.gz", payload[:9])
    with pytest.raises(DataError, match="truncated header"):
        data.read_idx_images(path)
    path = _write(tmp_path / "tiny", b"\x00\x00", gz=False)
    with pytest.raises(DataError, match="too short"):
        data.read_idx(path)


def test_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(_idx_bytes(np.zeros((4, 28, 28))))
    path = tmp_path / "broken.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt gzip"):
        data.read_idx_images(path)


def test_idx_count_mismatch(isolated_dirs):
    arg, _, _ = isolated_dirs
    _write(arg / "train-images-idx3-ubyte.gz", _idx_bytes(np.zeros((5, 28, 28))))
    _write(arg / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros((4,))))
    with pytest.raises(DataError, match="has 5 images but .*train-labels-idx1-ubyte.gz has 4"):
        data.load_idx_dataset("fashion_mnist", "train", data_dir=arg)


def test_idx_label_out_of_range(isolated_dirs):
    arg, _, _ = isolated_dirs
    _write(arg / "train-images-idx3-ubyte.gz", _idx_bytes(np.zeros((3, 28, 28))))
    _write(arg / "train-labels-idx1-ubyte.gz", _idx_bytes(np.array([1, 10, 2])))
    with pytest.raises(DataError, match=r"labels-idx1-ubyte.gz: label value 10 at index 1 .*0\.\.9"):
        data.load_idx_dataset("fashion_mnist", "train", data_dir=arg)


def test_idx_wrong_image_size(isolated_dirs):
    arg, _, _ = isolated_dirs
    _write(arg / "train-images-idx3-ubyte.gz", _idx_bytes(np.zeros((3, 27, 28))))
    _write(arg / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros((3,))))
    with pytest.raises(DataError, match="images are 27x28; expected 28x28"):
        data.load_idx_dataset("fashion_mnist", "train", data_dir=arg)


# --------------------------------------------------------------------------- Dataset validation


def test_dataset_rejects_bad_label_naming_value():
    images = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(DataError, match=r"label value 7 at index 2 .*expected 0\.\.4"):
        Dataset(images, np.array([0, 1, 7], np.int32), 5)
    with pytest.raises(DataError, match="label value -1 at index 0"):
        Dataset(images, np.array([-1, 1, 2], np.int32), 5)


@pytest.mark.parametrize(
    "images, labels, num_classes, names, error, pattern",
    [
        (np.zeros((3, 2, 2), np.float32), np.zeros(3, np.int32), 2, None, DataError, r"\(N, H, W, C\)"),
        (np.zeros((3, 2, 2, 1), np.float64), np.zeros(3, np.int32), 2, None, TypeError, "float32, got float64"),
        (np.zeros((3, 2, 2, 1), np.float32), np.zeros(3, np.int64), 2, None, TypeError, "int32, got int64"),
        (np.zeros((3, 2, 2, 1), np.float32), np.zeros(4, np.int32), 2, None, DataError, "3 images but 4 labels"),
        (np.zeros((3, 2, 2, 1), np.float32), np.zeros((3, 1), np.int32), 2, None, DataError, r"\(N,\)"),
        (np.zeros((3, 2, 2, 1), np.float32), np.zeros(3, np.int32), 0, None, DataError, "num_classes must be >= 1"),
        (np.zeros((3, 2, 2, 1), np.float32), np.zeros(3, np.int32), 2, ("a",), DataError, "1 names but num_classes is 2"),
        ([[[[0.0]]]], np.zeros(1, np.int32), 2, None, TypeError, "numpy array"),
    ],
)
def test_dataset_validation(images, labels, num_classes, names, error, pattern):
    with pytest.raises(error, match=pattern):
        Dataset(images, labels, num_classes, names)


def test_from_arrays_converts():
    images = np.array([[[0, 255], [51, 102]]], np.uint8)  # (1, 2, 2)
    ds = Dataset.from_arrays(images, np.array([2], np.int64))
    assert ds.images.shape == (1, 2, 2, 1) and ds.images.dtype == np.float32
    np.testing.assert_allclose(ds.images[0, :, :, 0], [[0, 1], [0.2, 0.4]], rtol=1e-6)
    assert ds.num_classes == 3 and ds.labels.dtype == np.int32
    with pytest.raises(DataError, match="label value 4294967296"):
        Dataset.from_arrays(images, np.array([2**32]), num_classes=3)
    with pytest.raises(TypeError, match="integer dtype"):
        Dataset.from_arrays(images, np.array([1.0]))


# --------------------------------------------------------------------------- split


def test_split_deterministic_disjoint_complete():
    ds = _indexed(100)
    train, valid = data.split(ds, valid_fraction=0.2, seed=1009)
    assert (len(train), len(valid)) == (80, 20)
    ids_t, ids_v = _ids(train), _ids(valid)
    assert not set(ids_t) & set(ids_v)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids_t, ids_v])), np.arange(100))
    np.testing.assert_array_equal(ids_v, np.sort(np.random.default_rng(1009).permutation(100)[:20]))
    # Labels and names travel with their images.
    np.testing.assert_array_equal(train.labels, ids_t % 4)
    assert train.class_names == ds.class_names and train.num_classes == 4
    # Same seed, same split; other seeds, other splits.
    again_t, again_v = data.split(ds, valid_fraction=0.2, seed=1009)
    np.testing.assert_array_equal(_ids(again_v), ids_v)
    np.testing.assert_array_equal(_ids(again_t), ids_t)
    for seed in range(5):
        _, other_v = data.split(ds, valid_fraction=0.2, seed=seed)
        assert not np.array_equal(_ids(other_v), ids_v)


def test_split_edges():
    ds = _indexed(10)
    train, valid = data.split(ds, valid_fraction=0.0)
    assert (len(train), len(valid)) == (10, 0)
    assert valid.images.shape == (0, 2, 2, 1)
    train, valid = data.split(ds, valid_fraction=0.25)
    assert (len(train), len(valid)) == (8, 2)  # round(2.5) == 2
    with pytest.raises(ValueError, match="valid_fraction must be in"):
        data.split(ds, valid_fraction=1.5)


# --------------------------------------------------------------------------- pad / normalise


def test_pad_to_centres_28_in_32():
    rng = np.random.default_rng(0)
    ds = Dataset(rng.uniform(size=(3, 28, 28, 2)).astype(np.float32) + 1, np.zeros(3, np.int32), 1)
    out = data.pad_to(ds, 32)
    assert out.images.shape == (3, 32, 32, 2)
    np.testing.assert_array_equal(out.images[:, 2:30, 2:30], ds.images)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(out.images[:, border] == 0)
    np.testing.assert_array_equal(out.labels, ds.labels)


def test_pad_to_odd_and_errors():
    ds = Dataset(np.ones((1, 29, 30, 1), np.float32), np.zeros(1, np.int32), 1)
    out = data.pad_to(ds, 32)
    rows = out.images[0, :, 5, 0]
    cols = out.images[0, 5, :, 0]
    np.testing.assert_array_equal(np.flatnonzero(rows), np.arange(1, 30))  # 1 top, 2 bottom
    np.testing.assert_array_equal(np.flatnonzero(cols), np.arange(1, 31))  # 1 left, 1 right
    assert data.pad_to(out, 32) is out
    with pytest.raises(DataError, match="cannot pad images of 29x30 to 28x28"):
        data.pad_to(ds, 28)


def test_normalize_exact_per_channel():
    images = np.zeros((2, 1, 1, 2), np.float32)
    images[0, 0, 0] = [1.0, 3.0]
    images[1, 0, 0] = [3.0, 7.0]
    ds = Dataset(images, np.zeros(2, np.int32), 1)
    out = data.normalize(ds, mean=[2.0, 5.0], std=[1.0, 2.0])
    np.testing.assert_allclose(out.images[:, 0, 0], [[-1, -1], [1, 1]])
    assert out.images.dtype == np.float32
    np.testing.assert_allclose(data.normalize(ds, 1.0, 2.0).images[:, 0, 0], [[0, 1], [1, 3]])
    mean, std = data.compute_mean_std(ds)
    np.testing.assert_allclose(mean, [2, 5])
    np.testing.assert_allclose(std, [1, 2])
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        data.normalize(ds, 0.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="one value per channel \\(2\\), got 3"):
        data.normalize(ds, [0.0, 0.0, 0.0], 1.0)


def test_compute_mean_std_chunked_matches_numpy():
    rng = np.random.default_rng(3)
    images = rng.normal(loc=[0.2, 0.5, 0.9], scale=[1.0, 0.3, 2.0], size=(50, 4, 5, 3))
    ds = Dataset(images.astype(np.float32), np.zeros(50, np.int32), 1)
    for chunk_size in (1, 7, 4096):
        mean, std = data.compute_mean_std(ds, chunk_size=chunk_size)
        np.testing.assert_allclose(mean, ds.images.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(std, ds.images.astype(np.float64).std(axis=(0, 1, 2)), rtol=1e-5)
    out = data.normalize(ds, *data.compute_mean_std(ds))
    np.testing.assert_allclose(out.images.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.images.std(axis=(0, 1, 2)), 1, atol=1e-5)


# --------------------------------------------------------------------------- select / concat


def test_select_classes_relabels_in_given_order():
    ds = Dataset(
        np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1),
        np.array([0, 1, 2, 3, 1, 2], np.int32),
        4,
        ("a", "b", "c", "d"),
    )
    out = data.select_classes(ds, [2, 0])
    np.testing.assert_array_equal(_ids(out), [0, 2, 5])
    np.testing.assert_array_equal(out.labels, [1, 0, 0])
    assert out.num_classes == 2 and out.class_names == ("c", "a")
    kept = data.select_classes(ds, [2, 0], relabel=False)
    np.testing.assert_array_equal(kept.labels, [0, 2, 2])
    assert kept.num_classes == 4 and kept.class_names == ds.class_names
    with pytest.raises(ValueError, match="class 4 is out of range"):
        data.select_classes(ds, [4])
    with pytest.raises(ValueError, match="must not repeat"):
        data.select_classes(ds, [1, 1])
    with pytest.raises(ValueError, match="at least one class"):
        data.select_classes(ds, [])


def test_concat_builds_mixed_patching_task():
    rng = np.random.default_rng(0)
    many = Dataset(rng.uniform(size=(30, 3, 3, 3)).astype(np.float32),
                   (np.arange(30) % 20).astype(np.int32), 20, tuple(f"x{i}" for i in range(20)))
    other = Dataset(rng.uniform(size=(8, 3, 3, 3)).astype(np.float32),
                    (np.arange(8) % 10).astype(np.int32), 10, tuple(f"y{i}" for i in range(10)))
    weak = data.select_classes(many, [3, 5, 7])  # labels 0..2
    target = data.select_classes(other, [4])  # label 0
    mixed = data.concat(weak, target, offset_labels=3)
    assert mixed.num_classes == 4
    assert mixed.class_names == ("x3", "x5", "x7", "y4")
    assert len(mixed) == len(weak) + len(target)
    np.testing.assert_array_equal(mixed.images[: len(weak)], weak.images)
    np.testing.assert_array_equal(mixed.images[len(weak):], target.images)
    np.testing.assert_array_equal(mixed.labels[len(weak):], np.full(len(target), 3))
    bigger = data.concat(weak, target, offset_labels=3, num_classes=6)
    assert bigger.num_classes == 6 and bigger.class_names is None
    with pytest.raises(DataError, match="label 0 is 'x3' in the first dataset but 'y4'"):
        data.concat(weak, target)
    with pytest.raises(DataError, match=r"image shapes \(3, 3, 3\) and \(2, 2, 1\)"):
        data.concat(weak, _indexed(4))
    with pytest.raises(DataError, match="label value 3"):
        data.concat(weak, target, offset_labels=3, num_classes=3)


def test_concat_same_task_keeps_names():
    a, b = _indexed(6), _indexed(4)
    out = data.concat(a, b)
    assert out.num_classes == 4 and out.class_names == a.class_names
    np.testing.assert_array_equal(_ids(out), [0, 1, 2, 3, 4, 5, 0, 1, 2, 3])


# --------------------------------------------------------------------------- subsample


def test_subsample_per_class_exact_counts_and_determinism():
    import jax

    ds = _indexed(40, num_classes=4)  # 10 per class
    out = data.subsample_per_class(7, ds, 3, classes=[1, 2])
    np.testing.assert_array_equal(out.class_counts(), [10, 3, 3, 10])
    ids = _ids(out)
    assert np.all(np.diff(ids) > 0)  # original order kept
    np.testing.assert_array_equal(ids[out.labels == 0], np.arange(0, 40, 4))
    np.testing.assert_array_equal(_ids(data.subsample_per_class(7, ds, 3, classes=[1, 2])), ids)
    assert not np.array_equal(_ids(data.subsample_per_class(8, ds, 3, classes=[1, 2])), ids)
    every = data.subsample_per_class(0, ds, 12)
    np.testing.assert_array_equal(every.class_counts(), [10, 10, 10, 10])
    none = data.subsample_per_class(0, ds, 0)
    assert len(none) == 0
    key = jax.random.key(5)
    by_key = data.subsample_per_class(key, ds, 2)
    np.testing.assert_array_equal(by_key.class_counts(), [2, 2, 2, 2])
    np.testing.assert_array_equal(_ids(data.subsample_per_class(key, ds, 2)), _ids(by_key))
    raw = data.subsample_per_class(jax.random.key_data(key), ds, 2)
    np.testing.assert_array_equal(_ids(raw), _ids(by_key))
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        data.subsample_per_class(0, ds, -1)
    with pytest.raises(TypeError, match="int seed or a JAX PRNG key"):
        data.subsample_per_class(1.5, ds, 1)


# --------------------------------------------------------------------------- batches / take


def test_batches_in_order_shuffled_and_drop_remainder():
    ds = _indexed(10)
    got = list(data.batches(ds, 4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([x[:, 0, 0, 0] for x, _ in got]), np.arange(10))
    assert got[0][0].shape == (4, 2, 2, 1) and got[0][1].dtype == np.int32
    assert [len(y) for _, y in data.batches(ds, 4, drop_remainder=True)] == [4, 4]
    assert list(data.batches(ds, 20, drop_remainder=True)) == []

    def order(seed):
        return np.concatenate([x[:, 0, 0, 0] for x, _ in data.batches(ds, 3, seed=seed)])

    shuffled = order(0)
    np.testing.assert_array_equal(np.sort(shuffled), np.arange(10))
    assert not np.array_equal(shuffled, np.arange(10))
    np.testing.assert_array_equal(order(0), shuffled)
    assert not np.array_equal(order(1), shuffled)
    for x, y in data.batches(ds, 3, seed=0):
        np.testing.assert_array_equal(y, x[:, 0, 0, 0].astype(np.int32) % 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(data.batches(ds, 0))


def test_take():
    ds = _indexed(10)
    np.testing.assert_array_equal(_ids(data.take(ds, 3)), [0, 1, 2])
    assert len(data.take(ds, 50)) == 10
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        data.take(ds, -1)


# --------------------------------------------------------------------------- standard pipeline


def test_standard_pipeline_greyscale_dataset_stats():
    train_ds = data.synthetic(0, num_classes=3, num_per_class=20, size=28)
    test_ds = data.synthetic(1, num_classes=3, num_per_class=5, size=28)
    train, valid, test, stats = data.standard_pipeline(
        train_ds, test_ds, valid_fraction=0.25, seed=3, normalization="imagenet"
    )
    assert (len(train), len(valid), len(test)) == (45, 15, 15)
    assert train.image_shape == (32, 32, 1)
    assert stats["normalization"] == "dataset"  # greyscale: no ImageNet constants
    raw_train, _ = data.split(train_ds, valid_fraction=0.25, seed=3)
    mean, std = data.compute_mean_std(data.pad_to(raw_train, 32))
    np.testing.assert_allclose(stats["mean"], mean)
    np.testing.assert_allclose(stats["std"], std)
    expected = (data.pad_to(test_ds, 32).images - mean) / std
    np.testing.assert_allclose(test.images, expected, rtol=1e-5, atol=1e-6)


def test_standard_pipeline_rgb_imagenet_and_none():
    train_ds = data.synthetic(0, num_classes=2, num_per_class=5, size=32, channels=3)
    test_ds = data.synthetic(1, num_classes=2, num_per_class=2, size=32, channels=3)
    train, _, test, stats = data.standard_pipeline(train_ds, test_ds, normalization="imagenet")
    assert stats["normalization"] == "imagenet"
    np.testing.assert_array_equal(stats["mean"], data.IMAGENET_MEAN)
    np.testing.assert_allclose(
        test.images, (test_ds.images - data.IMAGENET_MEAN) / data.IMAGENET_STD, rtol=1e-6
    )
    _, _, test, stats = data.standard_pipeline(train_ds, test_ds, normalization="none")
    np.testing.assert_array_equal(test.images, test_ds.images)
    np.testing.assert_array_equal(stats["std"], np.ones(3))
    with pytest.raises(ValueError, match="normalization must be"):
        data.standard_pipeline(train_ds, test_ds, normalization="batch")
    with pytest.raises(DataError, match="test images are"):
        data.standard_pipeline(train_ds, data.synthetic(1, num_classes=2, size=32))


# --------------------------------------------------------------------------- TFDS


def _tfds_format(num: int, hw: int, channels: int, num_classes: int, seed: int = 0):
    """Arrays as `tfds.as_numpy(tfds.load(..., batch_size=-1, as_supervised=True))` gives."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, hw, hw, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=(num,)).astype(np.int64)
    return images, labels


@pytest.mark.parametrize(
    "name, hw, channels", [("cifar10", 32, 3), ("cifar100", 32, 3), ("svhn_cropped", 32, 3),
                           ("fashion_mnist", 28, 1), ("mnist", 28, 1)]
)
def test_tfds_conversion(name, hw, channels):
    num_classes, names = data.TFDS_DATASETS[name]
    images, labels = _tfds_format(6, hw, channels, num_classes)
    ds = sources_module._tfds_arrays_to_dataset(images, labels, num_classes, names)
    assert ds.images.shape == (6, hw, hw, channels) and ds.images.dtype == np.float32
    np.testing.assert_allclose(ds.images * 255, images, atol=1e-4)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int32 and ds.num_classes == num_classes
    assert ds.class_names == names


def test_tfds_conversion_errors():
    images, labels = _tfds_format(3, 4, 3, 10)
    with pytest.raises(DataError, match="uint8, got float32"):
        sources_module._tfds_arrays_to_dataset(images.astype(np.float32), labels, 10, None)
    with pytest.raises(DataError, match="label value 10"):
        sources_module._tfds_arrays_to_dataset(images, np.array([0, 10, 1]), 10, None)


def test_tfds_not_installed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'jaxsplit\[tfds\]'"):
        data.load_tfds("cifar10", "train")
    with pytest.raises(ImportError, match=r"pip install 'jaxsplit\[tfds\]'"):
        data.load("tfds", "svhn_cropped", "test")
    with pytest.raises(ValueError, match="unknown TFDS dataset 'imagenet'"):
        data.load_tfds("imagenet", "train")


def test_auto_falls_back_to_tfds_then_reports_both(isolated_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataNotFoundError, match=r"(?s)looked for.*also tried TFDS.*jaxsplit\[tfds\]"):
        data.load("auto", "fashion_mnist", "train")


def test_load_tfds_with_fake_module(monkeypatch):
    """Checks the call made to TFDS and the conversion, with a stand-in for the module."""
    images, labels = _tfds_format(5, 32, 3, 100, seed=1)
    calls = []
    names = [f"fine{i}" for i in range(100)]
    info = types.SimpleNamespace(features={"label": types.SimpleNamespace(names=names)})

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        return ("images-tensor", "labels-tensor"), info

    def fake_as_numpy(tree):
        assert tree == ("images-tensor", "labels-tensor")
        return images, labels

    fake = types.SimpleNamespace(load=fake_load, as_numpy=fake_as_numpy)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = data.load("tfds", "cifar100", "test", data_dir="/somewhere")
    name, kwargs = calls[0]
    assert name == "cifar100"
    assert kwargs["split"] == "test" and kwargs["batch_size"] == -1
    assert kwargs["as_supervised"] is True and kwargs["data_dir"] == "/somewhere"
    assert ds.num_classes == 100 and ds.class_names == tuple(names)
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_allclose(ds.images, images / 255.0, rtol=1e-6)
    # "auto" goes to TFDS for names that have no IDX files.
    ds2 = data.load("auto", "cifar100", "train")
    assert calls[1][1]["split"] == "train" and len(ds2) == 5


# --------------------------------------------------------------------------- npz


def test_npz_roundtrip(tmp_path):
    ds = _indexed(6, num_classes=3)
    path = tmp_path / "d.npz"
    data.save_npz(ds, path)
    back = data.load_npz(path)
    np.testing.assert_array_equal(back.images, ds.images)
    np.testing.assert_array_equal(back.labels, ds.labels)
    assert back.num_classes == 3 and back.class_names == ds.class_names
    # Through `load`, searched in data_dir as <name>_<split>.npz, or given as a path.
    data.save_npz(ds, tmp_path / "mine_test.npz")
    assert len(data.load("npz", "mine", "test", data_dir=tmp_path)) == 6
    assert len(data.load("npz", str(tmp_path / "mine_{split}.npz"), "test")) == 6


def test_npz_uint8_without_channel(tmp_path):
    path = tmp_path / "u.npz"
    images = np.full((2, 3, 3), 51, np.uint8)
    np.savez(path, images=images, labels=np.array([4, 1]))
    ds = data.load_npz(path)
    assert ds.images.shape == (2, 3, 3, 1)
    np.testing.assert_allclose(ds.images, 0.2, rtol=1e-6)
    assert ds.num_classes == 5 and ds.class_names is None


def test_npz_errors(tmp_path, monkeypatch):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 3, 3), np.uint8), targets=np.zeros(2))
    with pytest.raises(DataError, match=r"missing key 'labels'; found keys \['images', 'targets'\]"):
        data.load_npz(path)
    np.savez(path, pixels=np.zeros((2, 3, 3)), labels=np.zeros(2, np.int32))
    with pytest.raises(DataError, match="missing key 'images'"):
        data.load_npz(path)
    np.savez(path, images=np.zeros((2, 3, 3), np.uint8), labels=np.array([0, 3]),
             class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match="bad.npz: labels: label value 3"):
        data.load_npz(path)
    with pytest.raises(DataNotFoundError, match="npz file not found"):
        data.load_npz(tmp_path / "nope.npz")
    monkeypatch.delenv("JAXSPLIT_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match=r"looked at: .*nope_train\.npz"):
        data.load("npz", "nope", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_separable():
    train = data.synthetic(0, num_classes=10, num_per_class=30, size=16, channels=1)
    again = data.synthetic(0, num_classes=10, num_per_class=30, size=16, channels=1)
    np.testing.assert_array_equal(train.images, again.images)
    np.testing.assert_array_equal(train.labels, again.labels)
    assert train.images.shape == (300, 16, 16, 1) and train.images.dtype == np.float32
    np.testing.assert_array_equal(train.class_counts(), np.full(10, 30))
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    test = data.synthetic(1, num_classes=10, num_per_class=30, size=16, channels=1)
    assert not np.array_equal(test.images, train.images)
    # Nearest class mean, fitted on one key's data, classifies another key's data.
    flat = train.images.reshape(len(train), -1)
    means = np.stack([flat[train.labels == c].mean(axis=0) for c in range(10)])
    test_flat = test.images.reshape(len(test), -1)
    dists = ((test_flat[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = np.mean(dists.argmin(axis=1) == test.labels)
    assert accuracy > 0.9
    # Another pattern seed is another task: the old class means no longer fit.
    other = data.synthetic(1, num_classes=10, num_per_class=30, size=16, pattern_seed=1)
    other_flat = other.images.reshape(len(other), -1)
    other_acc = np.mean(((other_flat[:, None] - means[None]) ** 2).sum(-1).argmin(1) == other.labels)
    assert other_acc < 0.5


def test_synthetic_rgb_via_load_and_errors():
    train = data.load("synthetic", "synthetic_rgb", "train")
    test = data.load("auto", "synthetic_rgb", "test")
    assert train.images.shape == (1000, 32, 32, 3) and test.images.shape == (200, 32, 32, 3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        data.synthetic(0, num_classes=0)
    with pytest.raises(ValueError, match="unknown synthetic dataset"):
        data.load("synthetic", "cifar10", "train")


def test_load_unknown_source():
    with pytest.raises(ValueError, match="unknown data source 'hdf5'"):
        data.load("hdf5", "mnist", "train")
