"""Training and evaluation of the models to modularise (SimCNN, ResCNN, weak CNNs).

The loop reads like the reference's `src/train.py`: for each epoch, shuffle the train split,
take optimiser steps on mini-batches, evaluate on the valid split, keep the parameters of the
best valid accuracy; finally report the test accuracy of those parameters.

Pure, jit-compiled pieces:

* `make_schedule` / `make_optimizer`: an optax learning-rate schedule (per step) and optimiser
  from `TrainConfig`.
* `train_step(state, batch, key)`: one SGD step; the dropout / augmentation key of step t is
  `fold_in(key, t)`, so a run is a deterministic function of its seed.
* `augment_batch(key, images)`: random 4-pixel-padded crop + horizontal flip (the reference's
  `RandomCrop(32, 4)` + `RandomHorizontalFlip`).
* `evaluate` / `predict_logits`: fixed-shape batches (the last one padded and masked), so one
  compilation serves a whole dataset.

`train_and_evaluate(cfg, workdir)` is the driver (data, loop, progress bar, files).

Axes: N examples, B batch, H/W spatial, C image channels, K classes.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax.training import train_state

from jaxsplit import config as jconfig
from jaxsplit import data as jdata
from jaxsplit import pipeline
from jaxsplit.errors import JaxsplitError
from jaxsplit.models import ConvNet, count_params, init_params

__all__ = [
    "TrainState",
    "TrainResult",
    "TrainingError",
    "make_schedule",
    "make_optimizer",
    "create_train_state",
    "run_keys",
    "cross_entropy_loss",
    "augment_batch",
    "train_step",
    "evaluate",
    "predict_logits",
    "train_epoch",
    "train_and_evaluate",
    "machine_info",
    "STEP_DECAY_EPOCH_FRACTIONS",
    "STEP_DECAY_FACTOR",
]

TrainState = train_state.TrainState  # step, apply_fn, params, tx, opt_state (flax.struct)

# The reference decays the learning rate by 0.1 at epochs 60 and 120 of 200: 30% and 60%.
STEP_DECAY_EPOCH_FRACTIONS = (0.3, 0.6)
STEP_DECAY_FACTOR = 0.1


class TrainingError(JaxsplitError, RuntimeError):
    """Training failed (e.g. the loss became NaN)."""


class TrainResult(NamedTuple):
    """What `train_and_evaluate` returns.

    Attributes:
      params: the best-on-valid parameters (inner params dict).
      model: the `ConvNet`.
      metrics: JSON-ready summary (also written to `metrics.json`).
      history: one dict per epoch (train/valid loss and accuracy, lr, seconds).
    """

    params: Any
    model: ConvNet
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


# -- optimiser ---------------------------------------------------------------------------------


def make_schedule(train_cfg: jconfig.TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the step.

    `train.warmup_epochs` of linear warm-up from 0, then over the remaining steps:
    `constant`; `cosine` decay to 0; or `step`: multiplied by `STEP_DECAY_FACTOR` (0.1) after
    30% and 60% of all epochs (the reference: 0.1x at epochs 60 and 120 of 200).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    lr = train_cfg.learning_rate
    total = train_cfg.epochs * steps_per_epoch
    warmup = train_cfg.warmup_epochs * steps_per_epoch
    if train_cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif train_cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=max(1, total - warmup))
    elif train_cfg.schedule == "step":
        boundaries = {
            max(1, round(f * train_cfg.epochs)) * steps_per_epoch - warmup: STEP_DECAY_FACTOR
            for f in STEP_DECAY_EPOCH_FRACTIONS
        }
        main = optax.piecewise_constant_schedule(lr, {b: s for b, s in boundaries.items() if b > 0})
    else:
        raise ValueError(f"train.schedule: unknown schedule {train_cfg.schedule!r}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


# The TrainConfig fields that define the optimiser (the others: seed, batch sizes, ...).
_OPTIMIZER_FIELDS = ("optimizer", "learning_rate", "momentum", "nesterov", "weight_decay",
                     "schedule", "warmup_epochs", "epochs")


def make_optimizer(train_cfg: jconfig.TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimiser of `train_cfg`.

    * `sgd`: SGD with `momentum` (0 = none) and optional Nesterov; `weight_decay` is L2
      regularisation added to the gradient before momentum, as PyTorch's `SGD(weight_decay=)`
      (the reference: SGD, lr 0.01, momentum 0.9, weight decay 1e-4).
    * `adam`: Adam with the same L2 (PyTorch `Adam(weight_decay=)` semantics).
    * `adamw`: Adam with *decoupled* weight decay (`optax.adamw`, PyTorch `AdamW`).

    Weight decay applies to every parameter (kernels and biases), as in the reference.

    Cached: configs that agree on the optimiser fields (and `steps_per_epoch`) get the same
    (pure) transformation object, so `train_step`, whose `TrainState.tx` is a static field,
    is not recompiled for every run (e.g. of another seed).
    """
    if not isinstance(train_cfg, jconfig.TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    key = {f: getattr(train_cfg, f) for f in _OPTIMIZER_FIELDS}
    if train_cfg.schedule == "constant" and train_cfg.warmup_epochs == 0:
        key["epochs"] = steps_per_epoch = 1  # the schedule does not depend on them
    return _make_optimizer_cached(jconfig.TrainConfig(**key), int(steps_per_epoch))


@functools.lru_cache(maxsize=64)
def _make_optimizer_cached(train_cfg: jconfig.TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    schedule = make_schedule(train_cfg, steps_per_epoch)
    wd = train_cfg.weight_decay
    if train_cfg.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=wd)
    if train_cfg.optimizer == "sgd":
        base = optax.sgd(schedule, momentum=train_cfg.momentum or None, nesterov=train_cfg.nesterov)
    elif train_cfg.optimizer == "adam":
        base = optax.adam(schedule)
    else:
        raise ValueError(f"train.optimizer: unknown optimizer {train_cfg.optimizer!r}")
    return optax.chain(optax.add_decayed_weights(wd), base) if wd > 0 else base


# jit-compiled once per model (ConvNet is a hashable frozen dataclass); eager init compiles
# each initializer separately, which is slower on CPU.
_init_params_jit = jax.jit(init_params, static_argnums=0)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """`(init_key, dropout_key)` of a training run with seed `seed`.

    The init key uses the `rbg` PRNG implementation: XLA compiles the initialisers of a deep
    net several times faster with it than with threefry on CPU (about 1 s against 9 s for a
    small CNN), and it is just as deterministic on a given backend. The dropout /
    augmentation key is a standard threefry key.
    """
    return jax.random.key(seed, impl="rbg"), jax.random.fold_in(jax.random.key(seed), 1)


def create_train_state(key: jax.Array, model: ConvNet, tx: optax.GradientTransformation) -> TrainState:
    """Fresh parameters (`init_params(model, key)`, jit-compiled) and optimiser state."""
    return TrainState.create(apply_fn=model.apply, params=_init_params_jit(model, key), tx=tx)


# -- steps -------------------------------------------------------------------------------------


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy `(B,)` of logits `(B, K)` and int labels `(B,)`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def augment_batch(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop of the zero-padded image and random horizontal flip, per image.

    As the reference's `RandomCrop(size, padding=4)` + `RandomHorizontalFlip()`. The padding
    is zeros of the *normalised* images (the reference pads raw pixels with 0 before
    normalising; the difference is the padding value only).

    Args:
      key: PRNG key.
      images: `(B, H, W, C)`.
      pad: pixels of zero padding on each side before cropping back to `H x W`.

    Returns:
      `(B, H, W, C)` augmented images.
    """
    chex.assert_rank(images, 4)
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1, :], crop)

    return jax.vmap(one)(padded, offsets, flips)


@functools.partial(jax.jit, static_argnames=("augment",))
def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array,
               augment: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a batch.

    Args:
      state: the train state.
      batch: `(images (B, H, W, C), labels (B,))`.
      key: the run's base dropout key; step t uses `fold_in(key, t)` (split into an
        augmentation and a dropout key), so the same key and data give the same run.
      augment: apply `augment_batch` to the images.

    Returns:
      `(new_state, {"loss": (), "accuracy": ()})` of the batch (before the update).
    """
    images, labels = batch
    chex.assert_rank(images, 4)
    chex.assert_shape(labels, (images.shape[0],))
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    if augment:
        images = augment_batch(aug_key, images)

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images, train=True, rngs={"dropout": dropout_key})
        return cross_entropy_loss(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"loss": loss, "accuracy": accuracy}


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_batch(model: ConvNet, params: Any, images: jax.Array, labels: jax.Array,
                valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed loss and number correct over the `valid` (B,) examples of a batch."""
    logits = model.apply({"params": params}, images)
    loss = jnp.sum(jnp.where(valid, cross_entropy_loss(logits, labels), 0.0))
    correct = jnp.sum(valid & (jnp.argmax(logits, -1) == labels))
    return loss, correct


@functools.partial(jax.jit, static_argnames=("model",))
def _logits_batch(model: ConvNet, params: Any, images: jax.Array, masks: Any) -> jax.Array:
    return model.apply({"params": params}, images, masks=masks)


def _padded_batches(images: np.ndarray, batch_size: int, labels: np.ndarray | None = None):
    """Yields `(images (B,...), labels (B,), valid (B,) bool)`; the last batch zero-padded."""
    n = images.shape[0]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = images[start:stop]
        y = labels[start:stop] if labels is not None else np.zeros((stop - start,), np.int32)
        valid = np.ones((stop - start,), bool)
        if stop - start < batch_size:
            fill = batch_size - (stop - start)
            x = np.concatenate([x, np.zeros((fill, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((fill,), y.dtype)])
            valid = np.concatenate([valid, np.zeros((fill,), bool)])
        yield x, y, valid


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def evaluate(model: ConvNet, params: Any, ds: jdata.Dataset, batch_size: int = 1000) -> dict[str, float]:
    """Mean loss and accuracy of `model` on every example of `ds`.

    Batches have the fixed size `min(batch_size, N)`; the last one is zero-padded and its
    padding masked out, so one compilation serves the whole dataset and every example
    counts exactly once.

    Returns:
      `{"loss": float, "accuracy": float, "num_examples": int}`.
    """
    _check_batch_size(batch_size)
    n = len(ds)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    bs = min(batch_size, n)
    total_loss = jnp.zeros((), jnp.float32)
    total_correct = jnp.zeros((), jnp.int32)
    for x, y, valid in _padded_batches(ds.images, bs, ds.labels):
        loss, correct = _eval_batch(model, params, x, y, valid)
        total_loss, total_correct = total_loss + loss, total_correct + correct
    return {"loss": float(total_loss) / n, "accuracy": int(total_correct) / n, "num_examples": n}


def predict_logits(model: ConvNet, params: Any, images: np.ndarray | jax.Array,
                   batch_size: int = 1000, masks: Any = None) -> np.ndarray:
    """Logits `(N, K)` of images `(N, H, W, C)`, in fixed-size (padded) batches.

    Args:
      masks: optional kernel masks `{conv_name: (K_l,)}` passed to the model.
    """
    _check_batch_size(batch_size)
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
        return np.zeros((0, model.num_classes), np.float32)
    bs = min(batch_size, n)
    out = [np.asarray(_logits_batch(model, params, x, masks)[valid])
           for x, _, valid in _padded_batches(images, bs)]
    return np.concatenate(out)


# -- the loop ----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Where a run ran: platform, CPU, core count, JAX backend/devices and versions."""
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
    }


def train_epoch(state: TrainState, ds: jdata.Dataset, batch_size: int, key: jax.Array, *,
                epoch: int, seed: int, augment: bool = False, progress_bar: Any = None,
                log_every: int = 10) -> tuple[TrainState, dict[str, float]]:
    """One pass over the shuffled train set (the last partial batch is dropped).

    The shuffle of epoch e uses seed `(seed, e)`. Returns the new state and the epoch's mean
    train loss and accuracy.
    """
    bs = min(batch_size, len(ds))
    sums = jnp.zeros((2,), jnp.float32)
    num_steps = 0
    shuffle_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    for images, labels in jdata.batches(ds, bs, seed=shuffle_seed, drop_remainder=True):
        state, m = train_step(state, (images, labels), key, augment=augment)
        sums = sums + jnp.stack([m["loss"], m["accuracy"]])
        num_steps += 1
        if progress_bar is not None:
            progress_bar.update(1)
            if num_steps % log_every == 0:
                mean = np.asarray(sums) / num_steps
                progress_bar.set_postfix(loss=f"{mean[0]:.4f}", acc=f"{mean[1]:.4f}", refresh=False)
    mean = np.asarray(sums) / max(1, num_steps)
    return state, {"loss": float(mean[0]), "accuracy": float(mean[1])}


def _json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def train_and_evaluate(cfg: jconfig.Config, workdir: str | os.PathLike | None = None, *,
                       data: tuple[jdata.Dataset, jdata.Dataset, jdata.Dataset] | None = None,
                       progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Trains `cfg.model` on `cfg.data` with `cfg.train`; keeps the best params on valid.

    Args:
      cfg: the run's config (its `data`, `model` and `train` sections are used).
      workdir: if given, the run folder: `config.yaml`, `metrics.json` and the checkpoint
        (`checkpoint/`, see `jaxsplit.checkpoint.save_model`) are written there.
      data: `(train, valid, test)` datasets to use instead of `prepare_data(cfg.data)`.
      progress: show a tqdm progress bar (loss / accuracy) on stderr.
      overwrite: replace an existing checkpoint in `workdir` (otherwise an error, raised
        before training).

    Returns:
      `TrainResult(params, model, metrics, history)`. For a given `cfg.train.seed` (and data),
      the result is deterministic: the init key, the shuffles and the dropout keys all derive
      from it.
    """
    from jaxsplit import checkpoint

    if not isinstance(cfg, jconfig.Config):
        raise TypeError(f"cfg must be a jaxsplit.config.Config, got {type(cfg).__name__}")
    tcfg = cfg.train
    if workdir is not None:
        workdir = Path(workdir)
        ckpt_dir = checkpoint.checkpoint_path(workdir)
        if ckpt_dir.exists() and not overwrite:
            raise checkpoint.CheckpointExistsError(
                f"{str(ckpt_dir)!r} already exists; choose another run folder (--out) or replace "
                f"it with `jaxsplit train --overwrite` (modules searched on the old model are then "
                f"refused by patch until you run `jaxsplit modularize --restart`)"
            )
    t_start = time.perf_counter()
    stats = None
    if data is None:
        train_ds, valid_ds, test_ds, stats = pipeline.load_splits(cfg.data)
    else:
        train_ds, valid_ds, test_ds = data
        for name, ds in (("valid", valid_ds), ("test", test_ds)):
            if ds.image_shape != train_ds.image_shape or ds.num_classes != train_ds.num_classes:
                raise jdata.DataError(
                    f"{name} images {ds.image_shape} / {ds.num_classes} classes do not match train's "
                    f"{train_ds.image_shape} / {train_ds.num_classes} classes")
    t_data = time.perf_counter() - t_start
    h, w, c = train_ds.image_shape
    if h != w:
        raise jdata.DataError(f"images must be square, got {h}x{w}")
    model = pipeline.build_model(cfg.model, train_ds.num_classes, c, h)
    batch_size = min(tcfg.batch_size, len(train_ds))
    steps_per_epoch = len(train_ds) // batch_size
    tx = make_optimizer(tcfg, steps_per_epoch)
    schedule = make_schedule(tcfg, steps_per_epoch)
    init_key, dropout_key = run_keys(tcfg.seed)
    state = create_train_state(init_key, model, tx)
    num_params = count_params(state.params)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.epochs * steps_per_epoch, unit="step", dynamic_ncols=True,
                   desc=f"train {cfg.model.name}")
    history: list[dict[str, Any]] = []
    best = {"accuracy": -1.0, "epoch": 0, "params": state.params, "loss": math.inf}
    t_train = time.perf_counter()
    try:
        for epoch in range(1, tcfg.epochs + 1):
            t_epoch = time.perf_counter()
            if bar is not None:
                bar.set_description(f"epoch {epoch}/{tcfg.epochs}")
            state, train_m = train_epoch(state, train_ds, batch_size, dropout_key, epoch=epoch,
                                         seed=tcfg.seed, augment=tcfg.augment, progress_bar=bar)
            if not math.isfinite(train_m["loss"]):
                raise TrainingError(
                    f"the train loss became {train_m['loss']} in epoch {epoch}; lower "
                    f"train.learning_rate (now {tcfg.learning_rate}) or use another optimizer"
                )
            valid_m = evaluate(model, state.params, valid_ds, tcfg.eval_batch_size)
            # `>=` as the reference: on ties the later epoch wins.
            if valid_m["accuracy"] >= best["accuracy"]:
                best = {"accuracy": valid_m["accuracy"], "epoch": epoch, "params": state.params,
                        "loss": valid_m["loss"]}
            history.append({
                "epoch": epoch,
                "train_loss": train_m["loss"],
                "train_accuracy": train_m["accuracy"],
                "valid_loss": valid_m["loss"],
                "valid_accuracy": valid_m["accuracy"],
                "learning_rate": float(schedule(int(state.step) - 1)),
                "seconds": time.perf_counter() - t_epoch,
            })
            if bar is not None:
                bar.set_postfix(loss=f"{train_m['loss']:.4f}", acc=f"{train_m['accuracy']:.4f}",
                                val_acc=f"{valid_m['accuracy']:.4f}")
    finally:
        if bar is not None:
            bar.close()
    train_time = time.perf_counter() - t_train
    params = best["params"]
    test_m = evaluate(model, params, test_ds, tcfg.eval_batch_size)
    data_record = stats.pop("data", None) if stats else None
    metrics = _json_ready({
        "test_accuracy": test_m["accuracy"],
        "test_loss": test_m["loss"],
        "valid_accuracy": best["accuracy"],
        "valid_loss": best["loss"],
        "best_epoch": best["epoch"],
        "epochs": tcfg.epochs,
        "steps": int(state.step),
        "train_time_s": train_time,
        "data_time_s": t_data,
        "total_time_s": time.perf_counter() - t_start,
        "num_params": num_params,
        "num_train": len(train_ds),
        "num_valid": len(valid_ds),
        "num_test": len(test_ds),
        "num_classes": train_ds.num_classes,
        "class_names": list(train_ds.class_names) if train_ds.class_names else None,
        "normalization": stats,
        "data": data_record,
        "model": pipeline.model_description(cfg.model, model),
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "history": history,
    })
    if workdir is not None:
        # The checkpoint goes last: its presence marks a finished training run.
        workdir.mkdir(parents=True, exist_ok=True)
        _write_atomic(workdir / "config.yaml", yaml.safe_dump(jconfig.to_dict(cfg), sort_keys=False))
        _write_atomic(workdir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        checkpoint.save_model(workdir, params, cfg, metrics, model=model, overwrite=overwrite)
    return TrainResult(params, model, metrics, history)


def _write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary sibling, fsyncs it, then renames it over `path`."""
    from jaxsplit.io import atomic_write_text

    atomic_write_text(path, text)
