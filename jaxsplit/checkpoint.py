"""Checkpoints: named arrays (orbax) plus JSON metadata, written atomically, checked on load.

Two layers:

* `save_pytree(path, tree, metadata)` / `load_pytree(path, target)`: any pytree of arrays and
  scalars (dicts, lists, tuples, NamedTuples, `flax.struct` dataclasses; typed PRNG keys are
  supported) plus a JSON-ready `metadata` dict. The search driver keeps its resumable state with
  these. Guarantees:

  - **atomic**: the checkpoint is written by orbax into a fresh hidden sibling directory (orbax
    itself writes to a temporary directory and renames it when complete), then renamed to
    `path`. A crash leaves either the old checkpoint or the new one, never a half-written one.
  - **no overwrite**: an existing `path` is an error (`CheckpointExistsError`) unless
    `overwrite=True`; then the new checkpoint is written completely *before* the old one is
    swapped out (rename old away, rename new in, delete old).
  - **checked**: the metadata records each leaf's shape/dtype and a SHA-256 digest of all leaf
    bytes, and a second digest (`record_digest`) covers the whole metadata record (the
    metadata dict, the leaf table, the array digest); loading verifies both, so a truncated,
    deleted or silently altered file, or hand-edited metadata (a changed normalisation or
    split seed), gives a `CheckpointCorruptError` naming the path (orbax alone restores flipped
    bytes silently).
  - **typed errors**: missing -> `CheckpointNotFoundError` (a `FileNotFoundError`), unreadable or
    corrupt -> `CheckpointCorruptError`, shapes that do not fit the target ->
    `CheckpointMismatchError` naming the leaf (e.g. `conv_3/kernel`). All are `CheckpointError`
    (a `ValueError`), with one-line messages.

* `save_model(run_dir, params, cfg, metrics)` / `load_model(run_dir)`: a trained model in
  `run_dir/checkpoint/`: its params and, as metadata, the resolved config, the training metrics
  and a model description (family, width, dropout, num_classes, in_channels, image_size) from
  which the `ConvNet` is rebuilt.

On disk (orbax composite checkpoint): `path/tree/` (orbax `StandardSave` of the pytree),
`path/meta/` (orbax `JsonSave` of `{"format", "format_version", "created", "leaves", "digest",
"metadata"}`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxsplit.errors import JaxsplitError

__all__ = [
    "CHECKPOINT_DIRNAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointCorruptError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "save_pytree",
    "load_pytree",
    "read_metadata",
    "save_model",
    "load_model",
    "checkpoint_path",
    "params_digest",
]

FORMAT_NAME = "jaxsplit-pytree"
FORMAT_VERSION = 2  # 2: the record digest covers the metadata too (normalisation, split seed, ...)
CHECKPOINT_DIRNAME = "checkpoint"  # a run's model checkpoint: runs/NAME/checkpoint/
_TREE_ITEM = "tree"
_META_ITEM = "meta"
TRAIN_HINT = "create it with `jaxsplit train --config CONFIG.yaml --out RUN_DIR`"


class CheckpointError(JaxsplitError, ValueError):
    """A checkpoint that cannot be written or read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint at the path."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint is incomplete, unreadable or its contents do not match its digest."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """Saving would overwrite an existing checkpoint (pass `overwrite=True`)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's arrays do not fit the expected tree (missing/extra leaf, shape)."""


# -- leaf paths and digest --------------------------------------------------------------------


def _key_name(entry: Any) -> str:
    """One path entry as a plain name: dict key, attribute/field name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_with_names(tree: Any) -> list[tuple[str, Any]]:
    """`[("a/b/0", leaf), ...]`, sorted by name.

    Names use plain key/field names, so a NamedTuple or dataclass saved by orbax (restored
    as a dict of its fields) has the same names as the original.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    named = [("/".join(_key_name(e) for e in path), leaf) for path, leaf in flat]
    return sorted(named, key=lambda kv: kv[0])


def _leaf_bytes(leaf: Any) -> tuple[np.ndarray, str]:
    """Host array of a leaf and its dtype name (typed PRNG keys as their key data)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf)), f"key<{jax.random.key_impl(leaf)}>"
    arr = np.asarray(leaf)
    return arr, str(arr.dtype)


def _describe_leaves(tree: Any) -> tuple[dict[str, dict[str, Any]], str]:
    """Per-leaf `{name: {"shape", "dtype"}}` and the SHA-256 digest of every leaf's bytes."""
    digest = hashlib.sha256()
    leaves: dict[str, dict[str, Any]] = {}
    for name, leaf in _flat_with_names(tree):
        arr, dtype = _leaf_bytes(leaf)
        leaves[name] = {"shape": list(arr.shape), "dtype": dtype}
        digest.update(name.encode())
        digest.update(dtype.encode())
        digest.update(repr(arr.shape).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return leaves, digest.hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _record_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata record (every field but `record_digest`), canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "record_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def params_digest(params: Any) -> str:
    """SHA-256 of every leaf's bytes (with its path, dtype and shape), in path order: the
    identity of a trained model's weights (recorded by modularize, checked by patch)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode() + repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous: save returns once the checkpoint is complete on disk.
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


# -- generic pytrees --------------------------------------------------------------------------


def save_pytree(path: str | os.PathLike, tree: Any, metadata: Mapping[str, Any] | None = None,
                *, overwrite: bool = False) -> Path:
    """Saves `tree` and `metadata` atomically at directory `path`.

    Args:
      path: the checkpoint directory to create (its parent is created if needed).
      tree: a pytree of arrays / numpy arrays / Python scalars (dicts, lists, tuples,
        NamedTuples, flax.struct dataclasses; typed PRNG keys allowed). `None` leaves are
        dropped by JAX and come back as nothing.
      metadata: a JSON-serialisable dict stored alongside (returned by `load_pytree`).
      overwrite: replace an existing checkpoint at `path` (written new first, then swapped).

    Returns:
      `path` as a `Path`.

    Raises:
      CheckpointExistsError: `path` exists and `overwrite` is False.
      TypeError: `metadata` is not a JSON-serialisable mapping.
    """
    path = Path(path).absolute()
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        metadata = json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from e
    if path.exists() and not overwrite:
        raise CheckpointExistsError(
            f"checkpoint {str(path)!r} already exists; refusing to overwrite it "
            f"(delete it, choose another path, or pass overwrite=True)"
        )
    leaves, digest = _describe_leaves(tree)
    if not leaves:
        raise CheckpointError(f"nothing to save at {str(path)!r}: the tree has no array leaves")
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "leaves": leaves,
        "digest": digest,
        "metadata": metadata,
    }
    meta["record_digest"] = _record_digest(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.new-{token}"
    try:
        _checkpointer().save(
            tmp,
            args=ocp.args.Composite(
                **{_TREE_ITEM: ocp.args.StandardSave(tree), _META_ITEM: ocp.args.JsonSave(meta)}
            ),
        )
        if path.exists():  # overwrite: the new checkpoint is complete; swap it in.
            old = path.parent / f".{path.name}.old-{token}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _restore(path: Path, hint: str | None) -> tuple[Any, dict]:
    """The raw restored tree (dicts/lists) and the full metadata record of a checkpoint."""
    hint_text = f"; {hint}" if hint else ""
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {str(path)!r}{hint_text}")
    if not path.is_dir():
        raise CheckpointCorruptError(f"checkpoint {str(path)!r} is not a directory{hint_text}")
    try:
        restored = _checkpointer().restore(
            path,
            args=ocp.args.Composite(
                **{_TREE_ITEM: ocp.args.StandardRestore(), _META_ITEM: ocp.args.JsonRestore()}
            ),
        )
        tree, meta = restored[_TREE_ITEM], restored[_META_ITEM]
    except Exception as e:  # orbax/tensorstore raise many types; report one line.
        raise CheckpointCorruptError(
            f"checkpoint {str(path)!r} is incomplete or corrupt ({_first_line(e)}); delete it "
            f"and create it again{hint_text}"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(
            f"{str(path)!r} is not a jaxsplit checkpoint (no {FORMAT_NAME!r} metadata){hint_text}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"checkpoint {str(path)!r} has format version {meta.get('format_version')!r}; this "
            f"jaxsplit reads version {FORMAT_VERSION} (version 1 did not protect its metadata); "
            f"create it again{hint_text}"
        )
    if meta.get("record_digest") != _record_digest(meta):
        raise CheckpointCorruptError(
            f"checkpoint {str(path)!r} is corrupt: its metadata (config, normalisation, metrics) "
            f"does not match the digest recorded when it was saved, so it was edited or damaged; "
            f"delete it and create it again{hint_text}"
        )
    leaves, digest = _describe_leaves(tree)
    if leaves != meta.get("leaves") or digest != meta.get("digest"):
        saved = meta.get("leaves") or {}
        bad = sorted(set(saved) ^ set(leaves)) or [k for k in sorted(leaves) if leaves[k] != saved.get(k)]
        where = f" (first differing leaf: {bad[0]})" if bad else ""
        raise CheckpointCorruptError(
            f"checkpoint {str(path)!r} is corrupt: its arrays do not match the digest recorded "
            f"when it was saved{where}; delete it and create it again{hint_text}"
        )
    return tree, meta


def _fit_leaf(name: str, saved: Any, target: Any) -> Any:
    """`saved` converted to the kind and dtype of `target`, or CheckpointMismatchError."""
    t_shape = tuple(np.shape(target)) if not hasattr(target, "shape") else tuple(target.shape)
    s_shape = tuple(saved.shape) if hasattr(saved, "shape") else tuple(np.shape(saved))
    if s_shape != t_shape:
        raise CheckpointMismatchError(
            f"{name}: the checkpoint has shape {s_shape}, expected {t_shape}"
        )
    t_dtype = getattr(target, "dtype", None)
    if t_dtype is not None and jax.dtypes.issubdtype(t_dtype, jax.dtypes.prng_key):
        if not jax.dtypes.issubdtype(saved.dtype, jax.dtypes.prng_key):
            raise CheckpointMismatchError(f"{name}: expected a PRNG key, the checkpoint has {saved.dtype}")
        return saved
    if t_dtype is None:  # a Python scalar
        return type(target)(np.asarray(saved).item())
    s_dtype = np.asarray(saved).dtype if not hasattr(saved, "dtype") else saved.dtype
    if not np.can_cast(s_dtype, t_dtype, casting="same_kind"):
        raise CheckpointMismatchError(f"{name}: the checkpoint has dtype {s_dtype}, expected {t_dtype}")
    if isinstance(target, np.ndarray):
        return np.asarray(saved).astype(t_dtype, copy=False)
    return jnp.asarray(saved, dtype=t_dtype)


def _fit_tree(restored: Any, target: Any, path: Path) -> Any:
    saved = dict(_flat_with_names(restored))
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = ["/".join(_key_name(e) for e in p) for p, _ in flat]
    missing = [n for n in names if n not in saved]
    extra = sorted(set(saved) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} does not fit the expected tree: {'; '.join(parts)}"
        )
    leaves = [_fit_leaf(n, saved[n], leaf) for n, (_, leaf) in zip(names, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_pytree(path: str | os.PathLike, target: Any = None, *,
                hint: str | None = None) -> tuple[Any, dict]:
    """Loads a checkpoint written by `save_pytree`.

    Args:
      path: the checkpoint directory.
      target: `None` to get the tree as saved, with containers as nested dicts/lists; or a
        pytree (arrays, `jax.ShapeDtypeStruct`s, numpy arrays, scalars) whose structure and
        leaf shapes the checkpoint must match: the result then has `target`'s structure and
        leaf kinds/dtypes (same-kind casts only).
      hint: appended to not-found/corrupt errors (e.g. how to create the checkpoint).

    Returns:
      `(tree, metadata)`, `metadata` the dict given to `save_pytree`.

    Raises:
      CheckpointNotFoundError, CheckpointCorruptError, CheckpointMismatchError.
    """
    path = Path(path).absolute()
    tree, meta = _restore(path, hint)
    if target is not None:
        tree = _fit_tree(tree, target, path)
    return tree, meta["metadata"]


def read_metadata(path: str | os.PathLike, *, hint: str | None = None) -> dict:
    """The metadata dict of a checkpoint (the arrays are read and verified too)."""
    return load_pytree(path, None, hint=hint)[1]


# -- models -----------------------------------------------------------------------------------


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """`run_dir/checkpoint`, or `run_dir` itself when it already is a checkpoint directory."""
    run_dir = Path(run_dir)
    if run_dir.name == CHECKPOINT_DIRNAME or (run_dir / _META_ITEM).is_dir():
        return run_dir
    return run_dir / CHECKPOINT_DIRNAME


def save_model(run_dir: str | os.PathLike, params: Any, cfg: Any, metrics: Mapping[str, Any],
               *, model: Any = None, overwrite: bool = False) -> Path:
    """Saves a trained model's params with its config, metrics and description.

    Args:
      run_dir: the run folder; the checkpoint goes to `run_dir/checkpoint/`.
      params: the model's inner params dict.
      cfg: the resolved `jaxsplit.config.Config` of the run.
      metrics: JSON-ready training metrics.
      model: the `ConvNet` (its num_classes/in_channels/image_size are recorded); when None
        they are inferred from `params` (first conv's input channels, last Dense's width) and
        `cfg.data.image_size`.
      overwrite: replace an existing checkpoint.

    Returns:
      The checkpoint directory.
    """
    from jaxsplit import config as jconfig
    from jaxsplit import pipeline

    if not isinstance(cfg, jconfig.Config):
        raise TypeError(f"cfg must be a jaxsplit.config.Config, got {type(cfg).__name__}")
    if model is None:
        convs = sorted((k for k in params if k.startswith("conv_")), key=lambda k: int(k[5:]))
        fcs = sorted((k for k in params if k.startswith("fc_")), key=lambda k: int(k[3:]))
        if not convs or not fcs:
            raise CheckpointMismatchError(f"params have no conv_*/fc_* layers: {sorted(params)}")
        model = pipeline.build_model(
            cfg.model, num_classes=int(params[fcs[-1]]["kernel"].shape[-1]),
            in_channels=int(params[convs[0]]["kernel"].shape[2]), image_size=cfg.data.image_size)
    meta = {
        "kind": "model",
        "model": pipeline.model_description(cfg.model, model),
        "config": jconfig.to_dict(cfg),
        "metrics": dict(metrics),
    }
    return save_pytree(checkpoint_path(run_dir), params, meta, overwrite=overwrite)


def load_model(run_dir: str | os.PathLike) -> tuple[Any, Any, Any, dict]:
    """Loads a model saved by `save_model`.

    Args:
      run_dir: a run folder (its `checkpoint/` is read) or a checkpoint directory.

    Returns:
      `(model, params, cfg, metrics)`: the rebuilt `ConvNet`, its params (jax arrays, checked
      against the model's parameter shapes), the run's `Config` and training metrics.

    Raises:
      CheckpointNotFoundError: no checkpoint (the message says how to create one).
      CheckpointCorruptError: unreadable or altered checkpoint.
      CheckpointMismatchError: params that do not fit the described model (names the layer).
    """
    from jaxsplit import config as jconfig
    from jaxsplit import pipeline

    path = checkpoint_path(run_dir).absolute()
    tree, meta = _restore(path, TRAIN_HINT)
    info = meta["metadata"]
    if info.get("kind") != "model" or "model" not in info or "config" not in info:
        raise CheckpointCorruptError(
            f"checkpoint {str(path)!r} holds no model (kind={info.get('kind')!r}); {TRAIN_HINT}"
        )
    try:
        cfg = jconfig.from_dict(jconfig.Config, info["config"])
    except jconfig.ConfigError as e:
        raise CheckpointCorruptError(f"checkpoint {str(path)!r} has an unusable config: {e}") from e
    desc = info["model"]
    model_cfg = jconfig.from_dict(
        jconfig.ModelConfig, {"name": desc["family"], "width": desc["width"], "dropout": desc["dropout"]})
    model = pipeline.build_model(model_cfg, desc["num_classes"], desc["in_channels"], desc["image_size"])
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), model.dummy_input()))["params"]
    try:
        params = _fit_tree(tree, expected, path)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} does not fit the model it describes ({desc['family']}, "
            f"width {desc['width']}): {e}"
        ) from e
    return model, params, cfg, dict(info.get("metrics", {}))
