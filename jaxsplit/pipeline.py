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
    provenance = {split: jdata.describe(data_cfg.source, data_cfg.name, split, data_cfg.data_dir)
                  for split in ("train", "test")}
    train = jdata.load(data_cfg.source, data_cfg.name, "train", data_cfg.data_dir)
    test = jdata.load(data_cfg.source, data_cfg.name, "test", data_cfg.data_dir)
    for split, ds in (("train", train), ("test", test)):
        check_finite(ds, split, provenance[split])
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
        "data": data_record(provenance),
    }
    return train, valid, test, stats


def data_record(provenance: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The `data` entry of a run's metrics.json: the resolved source and, per split, its files
    (absolute path, sha256, size) as `jaxsplit.data.describe` reports them."""
    first = next(iter(provenance.values()))
    return {"source": first["source"], "name": first["name"],
            "splits": {split: {k: v for k, v in p.items() if k not in ("source", "name", "split")}
                       for split, p in provenance.items()}}


def check_finite(ds: jdata.Dataset, split: str, provenance: dict[str, Any] | None = None) -> None:
    """Refuse images holding NaN or Inf (they would be scored silently or break training).

    Raises:
      DataError: naming the split, the first bad image's index in it (and the file).
    """
    bad = ~np.isfinite(ds.images.reshape(len(ds), -1)).all(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad)
        files = [f["path"] for f in (provenance or {}).get("files", [])]
        where = f" ({files[0]})" if files else ""
        shown = ", ".join(str(i) for i in idx[:5]) + (", ..." if len(idx) > 5 else "")
        raise jdata.DataError(
            f"the {split} split{where} has {len(idx)} image(s) with NaN or Inf values, at index "
            f"{shown}; fix or remove them (images must be finite)")


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


# -- run-time estimates ---------------------------------------------------------------------------

# Conservative CPU throughputs per core, in multiply-accumulates per second, about half of what
# the development machine measured (2 x86_64 cores, jax CPU; README "Results"): training
# (forward + backward = 3x the forward MACs) ran at ~1.5e10 MACs/s/core; the "fast" search
# evaluator at ~6.6e10 full-model MACs/s/core (it skips dropped kernels and caches shared
# layers); the "reference" evaluator is ~7x slower than "fast" on CPU. Since the fast evaluator is
# one for every model (search/fast_graph.py), the same figure holds for traced models, whose
# narrow ResNets run closer to the reference (README, Performance).
TRAIN_MACS_PER_S_PER_CORE = 5e9
SEARCH_MACS_PER_S_PER_CORE = {"fast": 2.5e10, "auto": 2.5e10, "reference": 3e9}
ESTIMATE_THRESHOLD_S = 15 * 60  # stages expected to take longer print an estimate first
# (train images, channels, classes) of the datasets whose sizes are known without loading them
KNOWN_DATASETS = {"fashion_mnist": (60_000, 1, 10), "mnist": (60_000, 1, 10),
                  "cifar10": (50_000, 3, 10), "cifar100": (50_000, 3, 100),
                  "svhn_cropped": (73_257, 3, 10), "synthetic": (1_000, 1, 10),
                  "synthetic_rgb": (1_000, 3, 10)}


def _cpu_cores() -> int | None:
    import os

    import jax

    if jax.default_backend() != "cpu":
        return None  # no measured accelerator throughput: no estimate
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def format_duration(seconds: float) -> str:
    """`95 s`, `12 min`, `3 h 20 min`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def train_estimate(cfg: Any, threshold_s: float = ESTIMATE_THRESHOLD_S,
                   cores: int | None = None) -> str | None:
    """A one-line time estimate of `jaxsplit train` with `cfg` on this CPU, or None when it is
    below `threshold_s`, the dataset's size is unknown, or JAX does not run on the CPU.

    MACs/image (forward) x 3 (forward + backward) x train images x epochs, at
    `TRAIN_MACS_PER_S_PER_CORE` per core.
    """
    known = KNOWN_DATASETS.get(cfg.data.name)
    cores = cores if cores is not None else _cpu_cores()
    if known is None or cores is None:
        return None
    num_train, channels, num_classes = known
    if cfg.data.classes is not None:
        num_train = num_train * len(cfg.data.classes) // num_classes
        num_classes = len(cfg.data.classes)
    if cfg.data.train_limit is not None:
        num_train = min(num_train, cfg.data.train_limit)
    num_train = int(num_train * (1 - cfg.data.valid_fraction))
    model = build_model(cfg.model, num_classes, channels, cfg.data.image_size)
    macs = model_macs(model)
    rate = TRAIN_MACS_PER_S_PER_CORE * cores
    seconds = 3 * macs * num_train * cfg.train.epochs / rate
    if seconds < threshold_s:
        return None
    return (f"estimate: training takes about {format_duration(seconds)} on {cores} CPU core(s) "
            f"({format_duration(seconds / cfg.train.epochs)} per epoch: {macs / 1e6:,.1f} M "
            f"MACs/image x 3 (forward + backward) x {num_train:,} images x {cfg.train.epochs} "
            f"epochs at a conservative {rate:.1e} MACs/s); Ctrl-C stops it")


def model_macs(model: Any) -> int:
    """Full-model multiply-accumulates per image of a `ConvNet` (convs + head), a traced
    `jaxsplit.Graph` (its convs and Dense layers, as `jaxsplit.module_stats` counts them), or
    another jaxsplit flax model (the BatchNorm zoo: traced from its variable shapes, no weights)."""
    import jax

    from jaxsplit import extract
    from jaxsplit.models.convnet import ConvNet, conv_macs, head_macs

    if isinstance(model, ConvNet):
        return int(conv_macs(model) + head_macs(model))
    graph = model
    if not (hasattr(graph, "sites") and hasattr(graph, "free_layers")):
        if not hasattr(model, "dummy_input"):
            raise TypeError(f"model_macs takes a jaxsplit model or a traced Graph, got "
                            f"{type(model).__name__}")
        from jaxsplit.graph import trace
        from jaxsplit.models import inference_apply, init_variables

        shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
        example = jax.eval_shape(lambda: model.dummy_input(1))
        graph = trace(inference_apply(model), shapes, example)
    full = {s.name: np.ones(s.num_kernels, bool) for s in graph.sites}
    return int(extract.module_stats(graph, full)["model_macs"])


def search_estimate(model: Any, num_classes: int, population_size: int, num_images: int,
                    num_populations: int, backend: str = "fast",
                    threshold_s: float = ESTIMATE_THRESHOLD_S, cores: int | None = None) -> str | None:
    """A one-line time estimate of a modularization search, or None (below `threshold_s`, or JAX
    not on the CPU).

    Classes x (population + 1) x images x populations x full-model MACs/image (`model_macs` of
    `model`: a `ConvNet` or the traced `jaxsplit.Graph` of any model), at
    `SEARCH_MACS_PER_S_PER_CORE[backend]` per core.
    """
    cores = cores if cores is not None else _cpu_cores()
    if cores is None or num_populations <= 0:
        return None
    macs = model_macs(model)
    rate = SEARCH_MACS_PER_S_PER_CORE.get(backend, SEARCH_MACS_PER_S_PER_CORE["reference"]) * cores
    seconds = num_classes * (population_size + 1) * num_images * num_populations * macs / rate
    if seconds < threshold_s:
        return None
    return (f"estimate: the search takes about {format_duration(seconds)} on {cores} CPU core(s) "
            f"({num_classes} classes x {population_size + 1} modules x {num_images:,} images x "
            f"{num_populations} generations x {macs / 1e6:,.1f} M MACs/image at a conservative "
            f"{rate:.1e} MACs/s, evaluator {backend!r}); Ctrl-C stops it, `--resume` continues")


def patch_estimate(cfg: Any, threshold_s: float = ESTIMATE_THRESHOLD_S,
                   cores: int | None = None) -> str | None:
    """A one-line time estimate of `jaxsplit patch` (its weak-model training), or None (below
    `threshold_s`, a task or dataset whose sizes are not known without loading it, or JAX not on
    the CPU).

    Per target class: weak-model MACs/image x 3 x (weak classes x images per class + TC images)
    x weak epochs (+ the poor-fit run's epochs), at `TRAIN_MACS_PER_S_PER_CORE` per core.
    """
    from jaxsplit.config import ModelConfig
    from jaxsplit.models.convnet import conv_macs, head_macs

    pcfg = cfg.patch
    known = KNOWN_DATASETS.get(cfg.data.name)
    cores = cores if cores is not None else _cpu_cores()
    if pcfg.task != "self" or known is None or cores is None:
        return None
    num_train, channels, num_classes = known
    per_class = int(num_train / num_classes * (1 - cfg.data.valid_fraction))
    if pcfg.weak_images_per_class is not None:
        per_class = min(per_class, pcfg.weak_images_per_class)
    images = len(pcfg.weak_classes) * per_class + pcfg.tc_train_images
    weak = build_model(ModelConfig(name=pcfg.weak_model, width=pcfg.weak_width),
                       len(pcfg.weak_classes) + 1, channels, cfg.data.image_size)
    macs = conv_macs(weak) + head_macs(weak)
    epochs = pcfg.weak_epochs + (pcfg.overfit_epochs if pcfg.poor_fit else 0)
    targets = len(pcfg.target_classes or pcfg.strong_classes)
    rate = TRAIN_MACS_PER_S_PER_CORE * cores
    seconds = 3 * macs * images * epochs * targets / rate
    if seconds < threshold_s:
        return None
    return (f"estimate: patching takes more than {format_duration(seconds)} on {cores} CPU core(s) "
            f"(training {targets} weak model(s): {macs / 1e6:,.1f} M MACs/image x 3 (forward + "
            f"backward) x {images:,} images x {epochs} epochs each at a conservative {rate:.1e} "
            f"MACs/s); cached weak models are reused, Ctrl-C stops it")
