"""Checkpoints: round trips, atomic no-overwrite saves, corruption and mismatch errors."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxsplit import checkpoint as ckpt
from jaxsplit import config as jconfig
from jaxsplit import pipeline
from jaxsplit.models import inference_apply, init_params, init_variables


class Pair(NamedTuple):
    a: jax.Array
    b: np.ndarray


@struct.dataclass
class Carry:
    bits: jax.Array
    pair: Pair
    count: int


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
        "bits": jnp.asarray(rng.integers(0, 2, (5, 7)), jnp.bool_),
        "counts": np.arange(6, dtype=np.int32),
    }


def _assert_bit_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_files(path: Path) -> list[Path]:
    """The array chunk files of a checkpoint, largest first."""
    files = [p for p in (path / "tree").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


# -- generic pytrees ---------------------------------------------------------------------------------


def test_pytree_round_trip_is_bit_exact(tmp_path):
    tree = _tree()
    meta = {"generation": 3, "history": [0.5, 0.75], "name": "x", "nested": {"a": None}}
    path = ckpt.save_pytree(tmp_path / "ck", tree, meta)
    assert path == (tmp_path / "ck").absolute()
    raw, got_meta = ckpt.load_pytree(path)
    assert got_meta == meta
    _assert_bit_equal(raw, tree)
    fitted, _ = ckpt.load_pytree(path, jax.tree.map(lambda x: x, tree))
    _assert_bit_equal(fitted, tree)
    assert isinstance(fitted["counts"], np.ndarray) and isinstance(fitted["bits"], jax.Array)
    assert ckpt.read_metadata(path) == meta


def test_structured_state_with_keys_round_trips(tmp_path):
    state = Carry(bits=jnp.arange(6).reshape(2, 3) % 2 == 0,
                  pair=Pair(jnp.linspace(0, 1, 4), np.array([1.5, 2.5])), count=7)
    tree = {"carry": state, "key": jax.random.key(42)}
    ckpt.save_pytree(tmp_path / "ck", tree, {})
    template = {"carry": Carry(jnp.zeros((2, 3), bool), Pair(jnp.zeros(4), np.zeros(2)), 0),
                "key": jax.random.key(0)}
    got, _ = ckpt.load_pytree(tmp_path / "ck", template)
    assert isinstance(got["carry"], Carry) and isinstance(got["carry"].pair, Pair)
    assert got["carry"].count == 7 and isinstance(got["carry"].count, int)
    np.testing.assert_array_equal(got["carry"].pair.a, state.pair.a)
    np.testing.assert_array_equal(got["carry"].bits, state.bits)
    np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(tree["key"]))
    # the restored key draws the same numbers
    assert float(jax.random.uniform(got["key"])) == float(jax.random.uniform(tree["key"]))


def test_no_overwrite_unless_asked(tmp_path):
    path = tmp_path / "ck"
    ckpt.save_pytree(path, _tree(0), {"v": 1})
    with pytest.raises(ckpt.CheckpointExistsError, match="overwrite"):
        ckpt.save_pytree(path, _tree(1), {"v": 2})
    tree, meta = ckpt.load_pytree(path)
    assert meta == {"v": 1}
    _assert_bit_equal(tree, _tree(0))
    ckpt.save_pytree(path, _tree(1), {"v": 2}, overwrite=True)
    tree, meta = ckpt.load_pytree(path)
    assert meta == {"v": 2}
    _assert_bit_equal(tree, _tree(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers


def test_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save_pytree(tmp_path / "ck", _tree(), {"bad": object()})
    with pytest.raises(ckpt.CheckpointError, match="no array leaves"):
        ckpt.save_pytree(tmp_path / "ck", {}, {})
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_names_path_and_hint(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="nowhere") as info:
        ckpt.load_pytree(tmp_path / "nowhere", hint="run the search first")
    assert "run the search first" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip", "metadata"])
def test_corrupt_checkpoint_gives_one_line_error(tmp_path, damage):
    tree = {"w": jnp.arange(20_000, dtype=jnp.float32).reshape(100, 200)}
    path = ckpt.save_pytree(tmp_path / "ck", tree, {"v": 1})
    target = _data_files(path)[0]
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    elif damage == "flip":  # orbax restores this silently; the digest catches it
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 8] = b"\x00" * 8
        target.write_bytes(bytes(raw))
    else:
        (path / "tree" / "_METADATA").unlink()
    with pytest.raises(ckpt.CheckpointCorruptError) as info:
        ckpt.load_pytree(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_not_a_directory_and_foreign_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ckpt.CheckpointCorruptError, match="not a directory"):
        ckpt.load_pytree(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointCorruptError, match="corrupt"):
        ckpt.load_pytree(tmp_path / "empty")


def test_target_mismatch_names_the_leaf(tmp_path):
    path = ckpt.save_pytree(tmp_path / "ck", _tree(), {})
    wrong = _tree()
    wrong["conv_0"]["kernel"] = jnp.zeros((3, 3, 1, 8))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"conv_0/kernel.*\(3, 3, 1, 4\)"):
        ckpt.load_pytree(path, wrong)
    extra = {**_tree(), "more": jnp.zeros(2)}
    with pytest.raises(ckpt.CheckpointMismatchError, match="missing.*more"):
        ckpt.load_pytree(path, extra)
    wrong_kind = {**_tree(), "counts": np.zeros(6, np.bool_)}
    with pytest.raises(ckpt.CheckpointMismatchError, match="counts.*dtype"):
        ckpt.load_pytree(path, wrong_kind)


# -- models --------------------------------------------------------------------------------------


def _cfg(width: float = 0.25) -> jconfig.Config:
    return jconfig.from_dict(jconfig.Config, {
        "name": "ck_test",
        "data": {"source": "synthetic", "name": "synthetic", "image_size": 16},
        "model": {"name": "weak_cnn", "width": width},
    })


def _init(model):
    # jit + rbg: compiles in about a second (eager threefry init takes several on 2 cores)
    return jax.jit(init_params, static_argnums=0)(model, jax.random.key(0, impl="rbg"))


def test_model_round_trip(tmp_path):
    cfg = _cfg()
    model = pipeline.build_model(cfg.model, 7, 1, 16)
    params = _init(model)
    metrics = {"test_accuracy": 0.875, "history": [{"epoch": 1, "loss": 0.5}]}
    saved = ckpt.save_model(tmp_path / "run", params, cfg, metrics, model=model)
    assert saved == (tmp_path / "run" / "checkpoint").absolute()
    model2, params2, cfg2, metrics2 = ckpt.load_model(tmp_path / "run")
    assert model2 == model and model2.num_classes == 7
    assert cfg2 == cfg and metrics2 == metrics
    _assert_bit_equal(params2, params)
    # the checkpoint directory itself is accepted too
    assert ckpt.load_model(saved)[0] == model
    # without `model`, the description is inferred from the params
    ckpt.save_model(tmp_path / "run2", params, cfg, metrics)
    assert ckpt.load_model(tmp_path / "run2")[0] == model
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.save_model(tmp_path / "run", params, cfg, metrics, model=model)


def test_load_model_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="jaxsplit train"):
        ckpt.load_model(tmp_path / "missing_run")
    cfg = _cfg()
    model = pipeline.build_model(cfg.model, 10, 1, 16)
    wider = pipeline.build_model(_cfg(0.5).model, 10, 1, 16)
    params = _init(wider)
    ckpt.save_model(tmp_path / "bad", params, cfg, {}, model=model)  # describes the narrow model
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"conv_0/(kernel|bias).*shape"):
        ckpt.load_model(tmp_path / "bad")
    ckpt.save_pytree(tmp_path / "notmodel" / "checkpoint", {"x": jnp.zeros(2)}, {"kind": "search"})
    with pytest.raises(ckpt.CheckpointCorruptError, match="holds no model"):
        ckpt.load_model(tmp_path / "notmodel")


# -- BatchNorm models --------------------------------------------------------------------------------


def _bn_cfg(name: str = "resnet20") -> jconfig.Config:
    return jconfig.from_dict(jconfig.Config, {
        "name": "ck_bn",
        "data": {"source": "synthetic", "name": "synthetic", "image_size": 16},
        "model": {"name": name, "width": 0.25},
    })


def _random_variables(model, seed: int = 0) -> dict:
    """Random arrays of `model`'s variable shapes (nothing compiled)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn"])
def test_batch_stats_round_trip(tmp_path, name):
    cfg = _bn_cfg(name)
    model = pipeline.build_model(cfg.model, 10, 1, 32 if name == "vgg11_bn" else 16)
    variables = _random_variables(model)
    saved = ckpt.save_model(tmp_path / "run", variables, cfg, {"test_accuracy": 0.5}, model=model)
    raw, meta = ckpt.load_pytree(saved)
    assert sorted(raw) == ["batch_stats", "params"] and meta["collections"] == ["batch_stats", "params"]
    loaded = ckpt.load_model(tmp_path / "run")
    model2, params2, cfg2, metrics2 = loaded
    assert model2 == model and cfg2 == cfg and metrics2 == {"test_accuracy": 0.5}
    _assert_bit_equal(params2, variables)
    _assert_bit_equal(loaded.variables, variables)
    assert loaded.apply_fn is inference_apply(model)
    with pytest.raises(ckpt.CheckpointMismatchError, match="batch_stats"):
        ckpt.save_model(tmp_path / "params_only", variables["params"], cfg, {}, model=model)
    # a checkpoint without the running averages does not fit the model it describes
    ckpt.save_pytree(ckpt.checkpoint_path(tmp_path / "stale"), variables["params"], meta)
    with pytest.raises(ckpt.CheckpointMismatchError, match="does not fit"):
        ckpt.load_model(tmp_path / "stale")


def test_convnet_checkpoints_keep_the_params_only_format(tmp_path):
    cfg = _cfg()
    model = pipeline.build_model(cfg.model, 10, 1, 16)
    params = _init(model)
    saved = ckpt.save_model(tmp_path / "run", {"params": params}, cfg, {}, model=model)
    raw, meta = ckpt.load_pytree(saved)
    assert sorted(raw) == sorted(params) and "collections" not in meta  # conv_0, ..., fc_3
    loaded = ckpt.load_model(saved)
    _assert_bit_equal(loaded.params, params)
    assert set(loaded.variables) == {"params"}
    with pytest.raises(ckpt.CheckpointMismatchError, match="batch_stats"):
        ckpt.save_model(tmp_path / "bad", {"params": params, "batch_stats": {}}, cfg, {}, model=model)
    with pytest.raises(ckpt.CheckpointMismatchError, match="pass model="):
        resnet = pipeline.build_model(_bn_cfg().model, 10, 1, 16)
        ckpt.save_model(tmp_path / "bad2", _random_variables(resnet), _bn_cfg(), {})
