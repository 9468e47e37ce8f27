"""Reader for the IDX format of MNIST and Fashion-MNIST, and the offline loader built on it.

Written by hand with numpy: no library that jaxsplit depends on (or that is free of heavy
dependencies such as TensorFlow or torchvision) reads IDX, and the format is a 4-byte magic
number, big-endian uint32 dimensions and a raw uint8 payload, so ``np.frombuffer`` reads 60,000
images in well under a second.

Format (http://yann.lecun.com/exdb/mnist/): bytes 0-1 are zero, byte 2 is the element type
(0x08 = unsigned byte, the only type these datasets use), byte 3 is the number of dimensions D;
then D big-endian uint32 sizes; then ``prod(sizes)`` elements in row-major order. Images are
``0x00000803`` (N, rows, cols), labels ``0x00000801`` (N,). Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from jaxsplit.data.dataset import DataError, DataNotFoundError, Dataset

__all__ = [
    "IDX_UBYTE",
    "IDX_DATASETS",
    "FASHION_MNIST_CLASS_NAMES",
    "DATA_DIR_ENV",
    "DEBIAN_DATASETS_DIR",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "candidate_dirs",
    "find_idx_files",
    "load_idx_dataset",
]

IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"

DATA_DIR_ENV = "JAXSPLIT_DATA_DIR"
DEBIAN_DATASETS_DIR = Path("/usr/share/datasets")

FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# name -> (directory name, class names, Debian package or None)
IDX_DATASETS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "fashion_mnist": ("fashion-mnist", FASHION_MNIST_CLASS_NAMES, "dataset-fashion-mnist"),
    "mnist": ("mnist", tuple(str(d) for d in range(10)), None),
}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_SIZE = 28


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    raw = Path(path).read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip data ({err})") from err


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Reads an IDX file of unsigned bytes.

    Args:
      path: the file, gzip-compressed or not.
      expected_ndim: if given, the number of dimensions the header must declare.

    Returns:
      uint8 array of the shape the header declares (a read-only view of the file's bytes).

    Raises:
      DataError: bad magic number, unsupported element type, wrong number of dimensions, or a
        payload whose size does not match the header (truncated file or trailing bytes).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: file has {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    zero, dtype_byte, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if expected_ndim is None:
        expected_magic = f"0x0000{IDX_UBYTE:02X}nn (nn = number of dimensions)"
    else:
        expected_magic = f"0x{(IDX_UBYTE << 8) | expected_ndim:08X}"
    if zero != 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08X}; expected {expected_magic} "
            f"(is this an IDX file?)"
        )
    if dtype_byte != IDX_UBYTE:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08X}: element type 0x{dtype_byte:02X} is "
            f"not supported; expected {expected_magic} (0x{IDX_UBYTE:02X} = unsigned byte)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08X} ({ndim} dimensions); expected "
            f"{expected_magic} ({expected_ndim} dimensions)"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"{path}: truncated header: {len(data)} bytes, expected at least {header_size} for "
            f"{ndim} dimensions"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    found = len(data) - header_size
    if found != expected:
        what = "truncated payload" if found < expected else "trailing bytes after payload"
        raise DataError(
            f"{path}: {what}: header declares shape {shape} = {expected} bytes, found {found}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Images ``(N, rows, cols)`` uint8 from an ``idx3-ubyte`` file (magic 0x00000803)."""
    return read_idx(path, expected_ndim=3)


def read_idx_labels(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
    """Labels ``(N,)`` uint8 from an ``idx1-ubyte`` file (magic 0x00000801).

    Args:
      path: the file.
      num_classes: if given, every label must be in ``0 .. num_classes - 1``.
    """
    labels = read_idx(path, expected_ndim=1)
    if num_classes is not None and labels.size:
        bad = labels >= num_classes
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{path}: label value {int(labels[i])} at index {i} is out of range; expected "
                f"0..{num_classes - 1}"
            )
    return labels


def _file_names(split: str) -> tuple[str, str]:
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for dataset ``name``, in order.

    Base directories: ``data_dir``, then ``$JAXSPLIT_DATA_DIR``, then ``/usr/share/datasets``
    (where Debian's ``dataset-*`` packages install). In each base, ``<base>/<dir-name>`` (e.g.
    ``fashion-mnist``) comes before ``<base>`` itself.
    """
    dir_name = IDX_DATASETS[name][0]
    bases: list[Path] = []
    if data_dir is not None:
        bases.append(Path(data_dir))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        bases.append(Path(env))
    bases.append(DEBIAN_DATASETS_DIR)
    dirs: list[Path] = []
    for base in bases:
        for d in (base / dir_name, base):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _existing(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _how_to_get(name: str) -> str:
    package = IDX_DATASETS[name][2]
    if package is not None:
        apt = f"(2) on Debian/Ubuntu: `sudo apt-get install {package}` (installs under " \
              f"{DEBIAN_DATASETS_DIR / IDX_DATASETS[name][0]}/);"
    else:
        apt = f"(2) Debian has no package for {name}; use (1) or (3);"
    return (
        "Ways to get it:\n"
        f"  (1) with internet: `pip install 'jaxsplit[tfds]'` and use the data source 'tfds' "
        f"(TensorFlow Datasets downloads {name});\n"
        f"  {apt}\n"
        f"  (3) put the four IDX files (gzip or not) in a directory and pass it with "
        f"`--data-dir DIR` or `export {DATA_DIR_ENV}=DIR`."
    )


def find_idx_files(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``name``/``split``.

    The first directory of :func:`candidate_dirs` holding both files wins; ``.gz`` is preferred
    over the un-gzipped file.

    Raises:
      DataNotFoundError: listing every directory looked at and the ways to get the data.
    """
    _check_name_split(name, split)
    images_stem, labels_stem = _file_names(split)
    looked: list[str] = []
    for directory in candidate_dirs(name, data_dir):
        images = _existing(directory, images_stem)
        labels = _existing(directory, labels_stem)
        if images is not None and labels is not None:
            return images, labels
        note = ""
        if images is not None or labels is not None:
            found = images if images is not None else labels
            note = f"  (found {found.name} but not its pair)"
        looked.append(f"  {directory}{note}")
    raise DataNotFoundError(
        f"{name} ({split}) not found: looked for {images_stem}[.gz] and {labels_stem}[.gz] in\n"
        + "\n".join(looked)
        + "\n"
        + _how_to_get(name)
    )


def _check_name_split(name: str, split: str) -> None:
    if name not in IDX_DATASETS:
        raise DataError(
            f"unknown IDX dataset {name!r}; expected one of {sorted(IDX_DATASETS)}"
        )
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_PREFIX)}")


def load_idx_dataset(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> Dataset:
    """Loads MNIST or Fashion-MNIST from IDX files on disk (no network).

    Args:
      name: ``"fashion_mnist"`` or ``"mnist"``.
      split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
      data_dir: searched first; see :func:`candidate_dirs` for the full search order.

    Returns:
      Images ``(N, 28, 28, 1)`` float32 in [0, 1], labels ``(N,)`` int32, 10 classes with names.

    Raises:
      DataNotFoundError: the files are nowhere (the message lists where it looked and how to get
        them). DataError: the files are corrupt or inconsistent.
    """
    images_path, labels_path = find_idx_files(name, split, data_dir)
    class_names = IDX_DATASETS[name][1]
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path, num_classes=len(class_names))
    if images.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise DataError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}; expected "
            f"{_IMAGE_SIZE}x{_IMAGE_SIZE} for {name}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"count mismatch: {images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    return Dataset.from_arrays(images, labels, class_names=class_names)
