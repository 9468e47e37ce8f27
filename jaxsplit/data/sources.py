"""Data sources: TensorFlow Datasets, IDX files, ``.npz`` files and a synthetic generator.

:func:`load` is the single entry point; :data:`SOURCES` maps each source name to its loader
``(name, split, data_dir) -> Dataset``.

* ``"idx"``: MNIST / Fashion-MNIST IDX files on disk (:mod:`jaxsplit.data.idx`), no network.
* ``"tfds"``: TensorFlow Datasets (CIFAR-10/100, SVHN, MNIST, Fashion-MNIST); needs the optional
  extra ``pip install 'jaxsplit[tfds]'`` and, the first time, internet.
* ``"npz"``: a ``.npz`` file with ``images`` and ``labels`` (see :func:`load_npz`).
* ``"synthetic"``: class-separable random images for fast tests (see :func:`synthetic`).
* ``"auto"``: ``idx`` for (fashion_)mnist when the files are found, else ``tfds``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxsplit.data.dataset import DataError, DataNotFoundError, Dataset, as_rng
from jaxsplit.data.idx import DATA_DIR_ENV, IDX_DATASETS, find_idx_files, load_idx_dataset

__all__ = [
    "CIFAR10_CLASS_NAMES",
    "TFDS_DATASETS",
    "SOURCES",
    "SYNTHETIC_PRESETS",
    "load_tfds",
    "load_npz",
    "save_npz",
    "synthetic",
    "load",
]

CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# TFDS name -> (number of classes, class names or None to take them from the TFDS metadata).
TFDS_DATASETS: dict[str, tuple[int, tuple[str, ...] | None]] = {
    "cifar10": (10, CIFAR10_CLASS_NAMES),
    "cifar100": (100, None),  # as_supervised gives the 100 fine labels.
    "svhn_cropped": (10, tuple(str(d) for d in range(10))),  # TFDS maps digit 0 to label 0.
    "fashion_mnist": (10, IDX_DATASETS["fashion_mnist"][1]),
    "mnist": (10, IDX_DATASETS["mnist"][1]),
}

_TFDS_INSTALL_HINT = (
    "tensorflow_datasets is not installed; install the optional extra with "
    "`pip install 'jaxsplit[tfds]'` (or use the offline sources 'idx', 'npz' or 'synthetic')"
)


def _tfds_arrays_to_dataset(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    names: tuple[str, ...] | None,
) -> Dataset:
    """Converts what ``tfds.as_numpy(tfds.load(..., batch_size=-1, as_supervised=True))`` gives.

    Args:
      images_uint8: ``(N, H, W, C)`` uint8 (``(N, H, W)`` is accepted and gets a channel axis).
      labels: ``(N,)`` integer (TFDS gives int64).
      num_classes: C.
      names: class names or None.

    Returns:
      Images float32 in [0, 1], labels int32.
    """
    images_uint8 = np.asarray(images_uint8)
    labels = np.asarray(labels)
    if images_uint8.dtype != np.uint8:
        raise DataError(f"TFDS images should be uint8, got {images_uint8.dtype}")
    if images_uint8.ndim not in (3, 4):
        raise DataError(
            f"TFDS images should have shape (N, H, W, C), got shape {images_uint8.shape}"
        )
    return Dataset.from_arrays(images_uint8, labels, num_classes=num_classes, class_names=names)


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # Lazy: an optional, heavy dependency.
    except ImportError as err:
        raise ImportError(_TFDS_INSTALL_HINT) from err
    return tfds


def load_tfds(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Dataset:
    """Loads a whole split through TensorFlow Datasets into memory.

    Args:
      name: one of :data:`TFDS_DATASETS` (``cifar10``, ``cifar100``, ``svhn_cropped``,
        ``fashion_mnist``, ``mnist``).
      split: a TFDS split, e.g. ``"train"``, ``"test"`` (slicing such as ``"train[:10%]"`` works).
      data_dir: TFDS's data directory (default ``~/tensorflow_datasets``).
      download: let TFDS download and prepare the data when it is missing.

    Returns:
      Images ``(N, H, W, C)`` float32 in [0, 1], labels int32.

    Raises:
      ImportError: tensorflow_datasets is not installed (says how to install it).
    """
    if name not in TFDS_DATASETS:
        raise DataError(f"unknown TFDS dataset {name!r}; expected one of {sorted(TFDS_DATASETS)}")
    tfds = _import_tfds()
    num_classes, names = TFDS_DATASETS[name]
    (images, labels), info = tfds.load(
        name,
        split=split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        batch_size=-1,
        as_supervised=True,
        with_info=True,
        download=download,
    )
    images, labels = tfds.as_numpy((images, labels))
    if names is None:
        try:
            names = tuple(info.features["label"].names)
        except (AttributeError, KeyError, TypeError):
            names = None
        if names is not None and len(names) != num_classes:
            names = None
    return _tfds_arrays_to_dataset(images, labels, num_classes, names)


def load_npz(path: str | os.PathLike) -> Dataset:
    """Loads a dataset from a ``.npz`` file (no pickles).

    Keys: ``images`` ``(N, H, W, C)`` or ``(N, H, W)``, uint8 (scaled by 1/255) or float;
    ``labels`` ``(N,)`` integer; optional ``class_names`` ``(C,)`` str and ``num_classes`` scalar
    (default ``len(class_names)``, else ``max(labels) + 1``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in ("images", "labels"):
                if key not in data.files:
                    raise DataError(
                        f"{path}: missing key {key!r}; found keys {sorted(data.files)}, expected "
                        f"'images' and 'labels' (and optionally 'class_names', 'num_classes')"
                    )
            images = data["images"]
            labels = data["labels"]
            names = (tuple(str(n) for n in data["class_names"])
                     if "class_names" in data.files else None)
            num_classes = int(data["num_classes"]) if "num_classes" in data.files else None
    except DataError:
        raise
    except (OSError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as err:
        # a truncated or non-npz file, pickled arrays, a non-integer num_classes
        raise DataError(f"{path}: not a readable .npz dataset ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if images.ndim not in (3, 4):
        raise DataError(
            f"{path}: 'images' should have shape (N, H, W, C) or (N, H, W), got {images.shape}"
        )
    try:
        return Dataset.from_arrays(images, labels, num_classes=num_classes, class_names=names)
    except (ValueError, TypeError) as err:  # wrong dtypes, label range: the file's fault
        raise DataError(f"{path}: {err}") from err


def save_npz(ds: Dataset, path: str | os.PathLike) -> None:
    """Writes ``ds`` to a compressed ``.npz`` readable by :func:`load_npz` (float32 images)."""
    arrays: dict[str, np.ndarray] = {
        "images": ds.images,
        "labels": ds.labels,
        "num_classes": np.asarray(ds.num_classes, dtype=np.int64),
    }
    if ds.class_names is not None:
        arrays["class_names"] = np.asarray(ds.class_names, dtype=str)
    np.savez_compressed(Path(path), **arrays)


def synthetic(
    key_or_seed: Any,
    num_classes: int = 10,
    num_per_class: int = 100,
    size: int = 32,
    channels: int = 1,
    *,
    pattern_seed: int = 0,
    noise: float = 0.2,
    block: int = 4,
) -> Dataset:
    """Class-separable random images, for tests and smoke runs.

    Each class c has a fixed random pattern: ``(size/block)^2 x channels`` uniform values
    blown up into ``block x block`` squares (coarse, so that small CNNs with pooling see it).
    An example of class c is ``clip(0.25 + 0.5 * pattern_c + N(0, noise^2), 0, 1)``.

    The patterns depend only on ``pattern_seed``; the noise and the example order depend on
    ``key_or_seed``. So two calls with different keys give a train and a test set of the same
    task, and the same key always gives the same dataset.

    Returns:
      ``num_classes * num_per_class`` examples ``(size, size, channels)`` float32 in [0, 1], in
      shuffled order, with names ``class_0, class_1, ...``.
    """
    for what, value in (
        ("num_classes", num_classes),
        ("num_per_class", num_per_class),
        ("size", size),
        ("channels", channels),
        ("block", block),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    low = -(-size // block)
    patterns = np.random.default_rng(pattern_seed).uniform(
        size=(num_classes, low, low, channels)
    )
    patterns = patterns.repeat(block, axis=1).repeat(block, axis=2)[:, :size, :size]
    rng = as_rng(key_or_seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), num_per_class))
    noise_values = rng.normal(scale=noise, size=(len(labels),) + patterns.shape[1:])
    images = 0.25 + 0.5 * patterns[labels] + noise_values
    return Dataset(
        images=np.clip(images, 0.0, 1.0).astype(np.float32),
        labels=labels.astype(np.int32),
        num_classes=num_classes,
        class_names=tuple(f"class_{c}" for c in range(num_classes)),
    )


# name -> keyword arguments of `synthetic` (train and test differ only in seed and size).
SYNTHETIC_PRESETS: dict[str, dict[str, int]] = {
    "synthetic": {"num_classes": 10, "size": 32, "channels": 1},
    "synthetic_rgb": {"num_classes": 10, "size": 32, "channels": 3},
}
_SYNTHETIC_SPLITS = {"train": (0, 100), "test": (1, 20)}  # split -> (seed, num_per_class)


def _load_synthetic(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    del data_dir
    if name not in SYNTHETIC_PRESETS:
        raise DataError(
            f"unknown synthetic dataset {name!r}; expected one of {sorted(SYNTHETIC_PRESETS)}"
        )
    if split not in _SYNTHETIC_SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_SYNTHETIC_SPLITS)}")
    seed, num_per_class = _SYNTHETIC_SPLITS[split]
    return synthetic(seed, num_per_class=num_per_class, **SYNTHETIC_PRESETS[name])


def _npz_path(name: str, split: str, data_dir: str | os.PathLike | None) -> Path:
    """``name`` containing ``.npz`` is a path (``{split}`` is filled in); otherwise the file
    ``<name>_<split>.npz`` is searched in ``data_dir`` then ``$JAXSPLIT_DATA_DIR``."""
    if ".npz" in name:
        return Path(name.format(split=split))
    file_name = f"{name}_{split}.npz"
    bases = [Path(d) for d in (data_dir, os.environ.get(DATA_DIR_ENV)) if d]
    for base in bases:
        if (base / file_name).is_file():
            return base / file_name
    looked = ", ".join(str(b / file_name) for b in bases)
    if not looked:
        looked = f"nothing (no data_dir, no ${DATA_DIR_ENV})"
    raise DataNotFoundError(
        f"npz dataset {name!r} ({split}) not found; looked at: {looked}. Pass a directory with "
        f"--data-dir / ${DATA_DIR_ENV}, or a path such as 'dir/{name}_{{split}}.npz' as the name"
    )


def _load_npz_source(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    return load_npz(_npz_path(name, split, data_dir))


def _load_tfds_source(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    return load_tfds(name, split, data_dir=data_dir)


def _load_auto(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    if name in SYNTHETIC_PRESETS:
        return _load_synthetic(name, split)
    if ".npz" in name:
        return _load_npz_source(name, split, data_dir)
    if name not in IDX_DATASETS:
        return load_tfds(name, split)
    try:
        return load_idx_dataset(name, split, data_dir)
    except DataNotFoundError as idx_err:
        try:
            return load_tfds(name, split)
        except ImportError as tfds_err:
            raise DataNotFoundError(
                f"{idx_err}\n(source 'auto' also tried TFDS: {tfds_err})"
            ) from idx_err


SOURCES: dict[str, Callable[..., Dataset]] = {
    "idx": load_idx_dataset,
    "tfds": _load_tfds_source,
    "npz": _load_npz_source,
    "synthetic": _load_synthetic,
    "auto": _load_auto,
}


def check_data_dir(source: str, data_dir: str | os.PathLike | None) -> None:
    """A given `data_dir` must be an existing directory (TFDS creates its own, so not for it).

    Without this check a mistyped `--data-dir` would be skipped and the next place in the search
    order (``$JAXSPLIT_DATA_DIR``, ``/usr/share/datasets``) used instead.
    """
    if data_dir is None or source == "tfds":
        return
    path = Path(data_dir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataNotFoundError(
            f"data directory {str(data_dir)!r} (data.data_dir / --data-dir) {what}; pass the "
            f"directory that holds the dataset files")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(source: str, name: str, split: str,
             data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Where :func:`load` reads ``split`` from: the source it resolves to and its files.

    Uses the same resolution as :func:`load` (``auto``: synthetic preset, ``.npz`` path, IDX files
    found by :func:`find_idx_files`, else TFDS).

    Returns:
      JSON-ready ``{"source", "name", "split", "files": [{"path", "sha256", "bytes"}]}`` (no
      files for ``synthetic``; ``tfds`` adds ``data_dir``).
    """
    check_data_dir(source, data_dir)
    resolved = source
    files: list[Path] = []
    if source == "auto":
        if name in SYNTHETIC_PRESETS:
            resolved = "synthetic"
        elif ".npz" in name:
            resolved = "npz"
        elif name in IDX_DATASETS:
            try:
                find_idx_files(name, split, data_dir)
                resolved = "idx"
            except DataNotFoundError:
                resolved = "tfds"
        else:
            resolved = "tfds"
    if resolved == "idx":
        files = list(find_idx_files(name, split, data_dir))
    elif resolved == "npz":
        files = [_npz_path(name, split, data_dir)]
    out: dict[str, Any] = {"source": resolved, "name": name, "split": split,
                           "files": [{"path": str(p.resolve()), "sha256": _sha256(p),
                                      "bytes": p.stat().st_size} for p in files]}
    if resolved == "tfds":
        out["data_dir"] = None if data_dir is None else str(data_dir)
    return out


def load(
    source: str, name: str, split: str, data_dir: str | os.PathLike | None = None
) -> Dataset:
    """Loads split ``split`` (``"train"`` or ``"test"``) of dataset ``name`` from ``source``.

    Args:
      source: ``"idx"``, ``"tfds"``, ``"npz"``, ``"synthetic"`` or ``"auto"``.
      name: e.g. ``"fashion_mnist"``, ``"mnist"``, ``"cifar10"``, ``"cifar100"``,
        ``"svhn_cropped"``, ``"synthetic"``, ``"synthetic_rgb"``; for ``npz`` a stem searched as
        ``<data_dir>/<name>_<split>.npz`` or a path containing ``.npz`` (``{split}`` filled in).
      split: ``"train"`` or ``"test"``.
      data_dir: where to look first (IDX and npz), or TFDS's data directory.

    Returns:
      The dataset.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; expected one of {sorted(SOURCES)}")
    check_data_dir(source, data_dir)
    return SOURCES[source](name, split, data_dir)
