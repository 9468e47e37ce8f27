"""From a config to data and a model: the glue every stage (train, modularize, patch) shares.

`prepare_data(cfg.data)` applies the data protocol of docs/method.md §2 on top of `jaxsplit.data`:
load the train and test splits, optionally keep (and relabel) a subset of classes, optionally
sub-sample the train split (`train_limit`, for fast presets), split train 80/20 into
train/valid with the fixed seed (reference 1009), zero-pad to `image_size` (28 -> 32 for
Fashion-MNIST) and normalise.

`build_model(cfg.model, num_classes, in_channels, image_size)` builds the Flax `ConvNet` of a
family; the number of classes and the input shape come from the data, not from the config.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from jaxsplit import data as jdata
from jaxsplit.config import DataConfig, ModelConfig
from jaxsplit.models import ConvNet
from jaxsplit.models import build_model as _build_family

__all__ = ["prepare_data", "load_splits", "limit_examples", "build_model", "model_description"]


def limit_examples(ds: jdata.Dataset, limit: int | None, seed: int) -> jdata.Dataset:
    """At most `limit` examples of `ds`, a fixed-seed random subset in the original order.

    Args:
      ds: N examples.
      limit: the most examples kept (`None`: all).
      seed: seed of the subset (the same `ds`, `limit`, `seed` always give the same subset).

    Returns:
      `min(N, limit)` examples.
    """
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:limit])
    return jdata.Dataset(ds.images[keep], ds.labels[keep], ds.num_classes, ds.class_names)


def load_splits(
    data_cfg: DataConfig,
) -> tuple[jdata.Dataset, jdata.Dataset, jdata.Dataset, dict[str, Any]]:
    """`prepare_data` plus the normalisation statistics it used.

    Returns:
      `(train, valid, test, stats)`; `stats` has `mean`/`std` (lists, one value per channel) and
      `normalization` (the statistics actually used), ready for JSON.
    """
    if not isinstance(data_cfg, DataConfig):
        raise TypeError(f"data_cfg must be a DataConfig, got {type(data_cfg).__name__}")
    train = jdata.load(data_cfg.source, data_cfg.name, "train", data_cfg.data_dir)
    test = jdata.load(data_cfg.source, data_cfg.name, "test", data_cfg.data_dir)
    if data_cfg.classes is not None:
        for c in data_cfg.classes:
            if not 0 <= c < train.num_classes:
                raise jdata.DataError(
                    f"data.classes: class {c} is out of range for {data_cfg.name!r}, which has "
                    f"classes 0..{train.num_classes - 1}"
                )
        train = jdata.select_classes(train, data_cfg.classes, relabel=True)
        test = jdata.select_classes(test, data_cfg.classes, relabel=True)
    train = limit_examples(train, data_cfg.train_limit, data_cfg.split_seed)
    train, valid, test, stats = jdata.standard_pipeline(
        train,
        test,
        valid_fraction=data_cfg.valid_fraction,
        seed=data_cfg.split_seed,
        pad_to_size=data_cfg.image_size,
        normalization=data_cfg.normalization,
    )
    if len(train) == 0 or len(valid) == 0:
        raise jdata.DataError(
            f"data: the train/valid split of {data_cfg.name!r} left {len(train)} train and "
            f"{len(valid)} valid images; raise data.train_limit or change data.valid_fraction"
        )
    stats = {
        "mean": np.asarray(stats["mean"]).tolist(),
        "std": np.asarray(stats["std"]).tolist(),
        "normalization": stats["normalization"],
    }
    return train, valid, test, stats


def prepare_data(data_cfg: DataConfig) -> tuple[jdata.Dataset, jdata.Dataset, jdata.Dataset]:
    """The train, valid and test splits of a config's dataset (docs/method.md §2).

    Steps: load train/test (`data.source`, `data.name`, `data.data_dir`); keep and relabel
    `data.classes` (given order = new label order); keep a fixed-seed random `data.train_limit`
    of the train split; split it `1 - valid_fraction` / `valid_fraction` by `data.split_seed`;
    zero-pad every image to `data.image_size`; normalise (`data.normalization`).

    Returns:
      `(train, valid, test)` datasets, images `(N, S, S, C)` float32 with S = `image_size`.
    """
    train, valid, test, _ = load_splits(data_cfg)
    return train, valid, test


def build_model(model_cfg: ModelConfig, num_classes: int, in_channels: int,
                image_size: int) -> ConvNet:
    """The `ConvNet` of `model_cfg.name` for images `(S, S, in_channels)` and `num_classes`.

    `model_cfg.dropout` is passed only when set (otherwise the family's reference rate is used).
    Cached: equal arguments return the same (immutable) module, so `model.apply` is the same
    function and jit-compiled steps are reused across runs.
    """
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return _build_cached(model_cfg, int(num_classes), int(in_channels), int(image_size))


@functools.lru_cache(maxsize=64)
def _build_cached(model_cfg: ModelConfig, num_classes: int, in_channels: int,
                  image_size: int) -> ConvNet:
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_channels=in_channels,
                                  width=model_cfg.width, image_size=image_size)
    if model_cfg.dropout is not None:
        kwargs["dropout"] = model_cfg.dropout
    return _build_family(model_cfg.name, **kwargs)


def model_description(model_cfg: ModelConfig, model: ConvNet) -> dict[str, Any]:
    """JSON-ready description from which `build_model` rebuilds `model` (saved in checkpoints)."""
    return {
        "family": model_cfg.name,
        "width": model_cfg.width,
        "dropout": model_cfg.dropout,
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "image_size": model.image_size,
    }
