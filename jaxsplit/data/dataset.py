"""In-memory image classification datasets and pure helpers on them.

A :class:`Dataset` holds host (numpy) arrays: images ``(N, H, W, C)`` float32 in NHWC layout and
labels ``(N,)`` int32. Models convert to device arrays themselves; keeping the data layer on the
host avoids copying 60k images to an accelerator before they are batched.

Every helper here is a pure function: it returns a new :class:`Dataset` and never changes its
input. Randomness comes from an explicit integer seed or JAX PRNG key (``key_or_seed``), so the
same call always gives the same result.

Axes in docstrings: N examples, H height, W width, C channels (image channels, or classes where
said so), K classes kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from jaxsplit.errors import JaxsplitError

__all__ = [
    "DataError",
    "DataNotFoundError",
    "Dataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "split",
    "normalize",
    "compute_mean_std",
    "pad_to",
    "select_classes",
    "concat",
    "subsample_per_class",
    "batches",
    "take",
    "standard_pipeline",
    "as_rng",
]

# Per-channel RGB statistics of ImageNet (torchvision's convention), used by the reference
# implementation to normalise CIFAR-10/100 and SVHN.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

Normalization = Literal["dataset", "imagenet", "none"]


class DataError(JaxsplitError, ValueError):
    """Bad or inconsistent data (corrupt file, wrong shape, label out of range, ...)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The requested data could not be found in any of the places looked at."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification dataset held in host memory.

    Attributes:
      images: ``(N, H, W, C)`` float32, NHWC.
      labels: ``(N,)`` int32, each in ``0 .. num_classes - 1``.
      num_classes: number of classes C of the task (classes may be absent from ``labels``).
      class_names: ``None`` or one name per class, ``len == num_classes``.

    Construction validates ranks, dtypes, lengths and the label range; it does not convert.
    Use :meth:`from_arrays` to build one from uint8 images or integer labels of another type.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray):
            raise TypeError(f"Dataset.images must be a numpy array, got {type(images).__name__}")
        if not isinstance(labels, np.ndarray):
            raise TypeError(f"Dataset.labels must be a numpy array, got {type(labels).__name__}")
        if images.ndim != 4:
            raise DataError(
                f"Dataset.images must have shape (N, H, W, C), got shape {images.shape}"
            )
        if images.dtype != np.float32:
            raise TypeError(f"Dataset.images must be float32, got {images.dtype}")
        if labels.ndim != 1:
            raise DataError(f"Dataset.labels must have shape (N,), got shape {labels.shape}")
        if labels.dtype != np.int32:
            raise TypeError(f"Dataset.labels must be int32, got {labels.dtype}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Dataset has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if isinstance(self.num_classes, bool) or not isinstance(
            self.num_classes, (int, np.integer)
        ):
            raise TypeError(f"Dataset.num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise DataError(f"Dataset.num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        _check_label_range(labels, self.num_classes, where="Dataset.labels")
        if self.class_names is not None:
            if isinstance(self.class_names, str) or not all(
                isinstance(n, str) for n in self.class_names
            ):
                raise TypeError(
                    f"Dataset.class_names must be a sequence of str, got {self.class_names!r}"
                )
            names = tuple(self.class_names)
            if len(names) != self.num_classes:
                raise DataError(
                    f"Dataset.class_names has {len(names)} names but num_classes is "
                    f"{self.num_classes}"
                )
            object.__setattr__(self, "class_names", names)

    @classmethod
    def from_arrays(
        cls,
        images: Any,
        labels: Any,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> Dataset:
        """Builds a Dataset, converting common formats.

        Args:
          images: ``(N, H, W, C)`` or ``(N, H, W)`` (a channel axis is added); uint8 in 0..255 is
            scaled to float32 in [0, 1], floating point is cast to float32.
          labels: ``(N,)`` of any integer dtype.
          num_classes: defaults to ``len(class_names)``, else ``max(labels) + 1``.
          class_names: optional names, one per class.

        Returns:
          The validated Dataset.
        """
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / np.float32(255.0)
        elif np.issubdtype(images.dtype, np.floating):
            images = images.astype(np.float32, copy=False)
        else:
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise DataError(f"label {int(labels.min())} is negative; labels must be >= 0")
        if num_classes is None:
            if class_names is not None:
                num_classes = len(class_names)
            else:
                num_classes = int(labels.max()) + 1 if labels.size else 1
        # Range check before the int32 cast so that huge labels are reported, not wrapped.
        _check_label_range(labels, num_classes, where="labels")
        return cls(
            images=images,
            labels=labels.astype(np.int32),
            num_classes=num_classes,
            class_names=None if class_names is None else tuple(str(n) for n in class_names),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_examples(self) -> int:
        """N."""
        return len(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> np.ndarray:
        """``(num_classes,)`` int64: number of examples of each class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def _subset(self, indices: np.ndarray) -> Dataset:
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


def _check_label_range(labels: np.ndarray, num_classes: int, *, where: str) -> None:
    """Raises DataError naming the first label outside ``0 .. num_classes - 1``."""
    if labels.size == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{where}: label value {int(labels[i])} at index {i} is out of range; expected "
            f"0..{num_classes - 1} (num_classes={num_classes})"
        )


def as_rng(key_or_seed: Any) -> np.random.Generator:
    """A numpy Generator from an int seed or a JAX PRNG key (typed or raw uint32).

    The same seed or key always gives the same stream; nothing global is touched.
    """
    if isinstance(key_or_seed, (bool, np.bool_)):
        raise TypeError(f"expected an int seed or a JAX PRNG key, got {key_or_seed!r}")
    if isinstance(key_or_seed, (int, np.integer)):
        if key_or_seed < 0:
            raise ValueError(f"seed must be >= 0, got {key_or_seed}")
        return np.random.default_rng(int(key_or_seed))
    dtype = getattr(key_or_seed, "dtype", None)
    if dtype is None:
        raise TypeError(
            f"expected an int seed or a JAX PRNG key, got {type(key_or_seed).__name__}"
        )
    import jax  # Lazy: only needed when a JAX key is passed.

    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        key_or_seed = jax.random.key_data(key_or_seed)
    raw = np.asarray(key_or_seed)
    if not np.issubdtype(raw.dtype, np.unsignedinteger) or raw.ndim != 1:
        raise TypeError(
            f"expected an int seed or a JAX PRNG key, got an array of dtype {raw.dtype} "
            f"and shape {raw.shape}"
        )
    return np.random.default_rng(raw.astype(np.uint64).tolist())


def split(
    ds: Dataset, valid_fraction: float = 0.2, seed: int = 1009
) -> tuple[Dataset, Dataset]:
    """Splits into (train, valid) by a fixed-seed permutation.

    ``round(N * valid_fraction)`` examples go to valid. Which examples go where depends only on
    ``N``, ``valid_fraction`` and ``seed``. Both parts keep the original example order.

    Args:
      ds: the dataset, N examples.
      valid_fraction: in ``[0, 1]``.
      seed: seed of ``np.random.default_rng(seed).permutation(N)`` (reference seed 1009).

    Returns:
      ``(train, valid)`` with ``N - n_valid`` and ``n_valid`` examples.
    """
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}")
    n = len(ds)
    num_valid = int(round(n * valid_fraction))
    perm = np.random.default_rng(seed).permutation(n)
    valid_idx = np.sort(perm[:num_valid])
    train_idx = np.sort(perm[num_valid:])
    return ds._subset(train_idx), ds._subset(valid_idx)


def _per_channel(value: Any, num_channels: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.full((num_channels,), arr[0], dtype=np.float32)
    if arr.shape != (num_channels,):
        raise ValueError(
            f"{what} must be a scalar or have one value per channel ({num_channels}), "
            f"got {arr.size} values"
        )
    return arr


def normalize(ds: Dataset, mean: Any, std: Any) -> Dataset:
    """``(images - mean) / std`` per channel.

    Args:
      ds: images ``(N, H, W, C)``.
      mean: scalar or ``(C,)``.
      std: scalar or ``(C,)``, all > 0.

    Returns:
      The dataset with normalised float32 images.
    """
    num_channels = ds.image_shape[2]
    mean_c = _per_channel(mean, num_channels, "mean")
    std_c = _per_channel(std, num_channels, "std")
    if not np.all(np.isfinite(mean_c)):
        raise ValueError(f"mean must be finite, got {mean_c.tolist()}")
    if not np.all(std_c > 0) or not np.all(np.isfinite(std_c)):
        raise ValueError(f"std must be finite and > 0 for every channel, got {std_c.tolist()}")
    images = (ds.images - mean_c) / std_c
    return dataclasses.replace(ds, images=images.astype(np.float32, copy=False))


def compute_mean_std(ds: Dataset, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of the images.

    Accumulates in float64 over chunks of ``chunk_size`` images, so memory stays small.

    Returns:
      ``(mean, std)``, each ``(C,)`` float32.
    """
    if len(ds) == 0:
        raise DataError("cannot compute mean/std of an empty dataset")
    num_channels = ds.image_shape[2]
    count = len(ds) * ds.image_shape[0] * ds.image_shape[1]
    total = np.zeros((num_channels,), np.float64)
    for start in range(0, len(ds), chunk_size):
        total += ds.images[start : start + chunk_size].sum(axis=(0, 1, 2), dtype=np.float64)
    mean = total / count
    sq = np.zeros((num_channels,), np.float64)
    for start in range(0, len(ds), chunk_size):
        centred = ds.images[start : start + chunk_size].astype(np.float64) - mean
        sq += np.square(centred).sum(axis=(0, 1, 2))
    std = np.sqrt(sq / count)
    return mean.astype(np.float32), std.astype(np.float32)


def pad_to(ds: Dataset, size: int = 32) -> Dataset:
    """Zero-pads images to ``size x size``, centred (e.g. 28x28 -> 32x32 with 2 pixels a side).

    When ``size - H`` is odd the extra row goes to the bottom (column to the right).

    Returns:
      Images ``(N, size, size, C)``.
    """
    h, w, _ = ds.image_shape
    if h > size or w > size:
        raise DataError(f"cannot pad images of {h}x{w} to {size}x{size}: images are larger")
    if h == size and w == size:
        return ds
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0))
    return dataclasses.replace(ds, images=np.pad(ds.images, pad))


def _check_classes(classes: Sequence[int], num_classes: int) -> list[int]:
    out = []
    for c in classes:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"class ids must be ints, got {c!r}")
        if not 0 <= c < num_classes:
            raise ValueError(f"class {c} is out of range; expected 0..{num_classes - 1}")
        out.append(int(c))
    if len(set(out)) != len(out):
        raise ValueError(f"classes must not repeat, got {out}")
    return out


def select_classes(ds: Dataset, classes: Sequence[int], relabel: bool = True) -> Dataset:
    """Keeps only the examples of ``classes`` (original example order kept).

    Args:
      ds: the dataset.
      classes: K distinct class ids.
      relabel: if True, ``classes[k]`` becomes label ``k`` (the given order is the new label
        order), ``num_classes`` becomes K and ``class_names`` are reordered to match; if False,
        labels, ``num_classes`` and names are unchanged.

    Returns:
      The subset.
    """
    classes = _check_classes(classes, ds.num_classes)
    if not classes:
        raise ValueError("classes must name at least one class")
    keep = np.isin(ds.labels, classes)
    sub = ds._subset(np.flatnonzero(keep))
    if not relabel:
        return sub
    lookup = np.full((ds.num_classes,), -1, dtype=np.int32)
    lookup[classes] = np.arange(len(classes), dtype=np.int32)
    names = None if ds.class_names is None else tuple(ds.class_names[c] for c in classes)
    return Dataset(
        images=sub.images,
        labels=lookup[sub.labels],
        num_classes=len(classes),
        class_names=names,
    )


def concat(
    a: Dataset, b: Dataset, offset_labels: int = 0, num_classes: int | None = None
) -> Dataset:
    """Concatenates ``a`` then ``b``, adding ``offset_labels`` to ``b``'s labels.

    E.g. a mixed patching task: ``concat(nine_cifar100_classes, one_cifar10_class,
    offset_labels=9)`` gives a 10-class task whose last class is the target class.

    Args:
      a, b: datasets with the same ``(H, W, C)``.
      offset_labels: >= 0, added to every label of ``b``.
      num_classes: of the result; defaults to ``max(a.num_classes, offset_labels +
        b.num_classes)`` (the largest possible label + 1).

    Returns:
      The concatenation. ``class_names`` are merged when every class gets a name from ``a`` or
      ``b``; otherwise ``None``. A label that gets two different names is an error.
    """
    if a.image_shape != b.image_shape:
        raise DataError(
            f"cannot concat datasets of image shapes {a.image_shape} and {b.image_shape}"
        )
    if offset_labels < 0:
        raise ValueError(f"offset_labels must be >= 0, got {offset_labels}")
    needed = max(a.num_classes, offset_labels + b.num_classes)
    if num_classes is None:
        num_classes = needed
    labels = np.concatenate([a.labels, b.labels + np.int32(offset_labels)])
    names: tuple[str, ...] | None = None
    if a.class_names is not None or b.class_names is not None:
        merged: list[str | None] = [None] * max(num_classes, needed)
        if a.class_names is not None:
            merged[: a.num_classes] = a.class_names
        if b.class_names is not None:
            for i, name in enumerate(b.class_names):
                j = offset_labels + i
                if merged[j] is not None and merged[j] != name:
                    raise DataError(
                        f"label {j} is {merged[j]!r} in the first dataset but {name!r} in the "
                        f"second; use offset_labels to keep them apart"
                    )
                merged[j] = name
        merged = merged[:num_classes]
        if all(n is not None for n in merged):
            names = tuple(merged)  # type: ignore[arg-type]
    _check_label_range(labels, num_classes, where="concat labels")
    return Dataset(
        images=np.concatenate([a.images, b.images]),
        labels=labels,
        num_classes=num_classes,
        class_names=names,
    )


def subsample_per_class(
    key_or_seed: Any, ds: Dataset, k: int, classes: Sequence[int] | None = None
) -> Dataset:
    """Keeps at most ``k`` randomly chosen examples of each class in ``classes``.

    Examples of other classes are all kept; the original example order is kept. E.g. the
    reference's weak model sees only 500 training images of the target class.

    Args:
      key_or_seed: int seed or JAX PRNG key; the choice is deterministic given it.
      ds: the dataset.
      k: >= 0, the most examples kept per named class.
      classes: the classes to subsample; ``None`` means all.

    Returns:
      The subset.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    rng = as_rng(key_or_seed)
    classes = (
        list(range(ds.num_classes)) if classes is None else _check_classes(classes, ds.num_classes)
    )
    keep = np.ones((len(ds),), dtype=bool)
    for c in classes:
        idx = np.flatnonzero(ds.labels == c)
        drop = rng.permutation(idx)[k:]
        keep[drop] = False
    return ds._subset(np.flatnonzero(keep))


def batches(
    ds: Dataset,
    batch_size: int,
    *,
    seed: Any = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterates over ``(images, labels)`` numpy batches, one pass.

    Args:
      ds: the dataset.
      batch_size: B >= 1.
      seed: if given (int or JAX key), the examples are shuffled by it; otherwise in order.
      drop_remainder: drop the last batch when it has fewer than B examples.

    Yields:
      ``images (B, H, W, C)`` float32 and ``labels (B,)`` int32 (the last batch may be smaller).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(ds)
    order = None if seed is None else as_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            yield ds.images[start:end], ds.labels[start:end]
        else:
            idx = order[start:end]
            yield ds.images[idx], ds.labels[idx]


def take(ds: Dataset, n: int) -> Dataset:
    """The first ``min(n, N)`` examples."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return dataclasses.replace(ds, images=ds.images[:n], labels=ds.labels[:n])


def standard_pipeline(
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    valid_fraction: float = 0.2,
    seed: int = 1009,
    pad_to_size: int | None = 32,
    normalization: Normalization = "dataset",
) -> tuple[Dataset, Dataset, Dataset, dict[str, Any]]:
    """The data protocol of CNNSplitter: split, pad, normalise.

    1. ``train_ds`` is split into train/valid by :func:`split` (``valid_fraction``, ``seed``).
    2. All three sets are zero-padded to ``pad_to_size`` (skipped when ``None``).
    3. Normalisation statistics:
       ``"dataset"``: per-channel mean/std of the (padded) train part;
       ``"imagenet"``: :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD` for 3-channel images, the train
       part's statistics for other channel counts (as the reference does for greyscale);
       ``"none"``: mean 0, std 1 (images unchanged).

    Returns:
      ``(train, valid, test, stats)``; ``stats`` has ``mean`` and ``std`` (``(C,)`` float32) and
      ``normalization`` (the statistics actually used: ``"dataset"``, ``"imagenet"`` or
      ``"none"``).
    """
    if normalization not in ("dataset", "imagenet", "none"):
        raise ValueError(
            f"normalization must be 'dataset', 'imagenet' or 'none', got {normalization!r}"
        )
    if train_ds.image_shape != test_ds.image_shape:
        raise DataError(
            f"train images are {train_ds.image_shape} but test images are {test_ds.image_shape}"
        )
    if train_ds.num_classes != test_ds.num_classes:
        raise DataError(
            f"train has {train_ds.num_classes} classes but test has {test_ds.num_classes}"
        )
    train, valid = split(train_ds, valid_fraction=valid_fraction, seed=seed)
    test = test_ds
    if pad_to_size is not None:
        train, valid, test = (pad_to(d, pad_to_size) for d in (train, valid, test))
    num_channels = train.image_shape[2]
    used: str = normalization
    if normalization == "none":
        mean = np.zeros((num_channels,), np.float32)
        std = np.ones((num_channels,), np.float32)
    elif normalization == "imagenet" and num_channels == 3:
        mean, std = IMAGENET_MEAN.copy(), IMAGENET_STD.copy()
    else:
        mean, std = compute_mean_std(train)
        used = "dataset"
    if normalization != "none":
        train, valid, test = (normalize(d, mean, std) for d in (train, valid, test))
    return train, valid, test, {"mean": mean, "std": std, "normalization": used}
