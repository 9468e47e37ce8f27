"""Configs: frozen dataclasses loaded from YAML (defaults + file + `key=value` overrides).

Each stage gets only its sub-config (`cfg.train`, `cfg.search`, ...). Loading
rejects unknown keys, wrong types and out-of-range values with the key's
dotted name and what was expected.

Hand-written rather than a config library: the checks we need (dotted-key
errors, nested frozen dataclasses, `--set a.b=c` overrides) are ~100 lines,
and ml_collections/hydra would add a dependency for less precise messages.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxsplit.errors import JaxsplitError
from jaxsplit.search.config import SearchConfig
from jaxsplit.patch_config import PatchConfig


class ConfigError(JaxsplitError, ValueError):
    """A config key, type or value that is not accepted."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are prepared (SPEC §2)."""

    source: Literal["auto", "idx", "tfds", "npz", "synthetic"] = "auto"
    name: str = "fashion_mnist"
    data_dir: str | None = None
    valid_fraction: float = 0.2
    split_seed: int = 1009
    image_size: int = 32
    normalization: Literal["dataset", "imagenet", "none"] = "dataset"
    train_limit: int | None = None  # keep at most this many train+valid images (fast presets)
    classes: tuple[int, ...] | None = None  # keep (and relabel) only these classes

    def __post_init__(self):
        _check(0.0 < self.valid_fraction < 1.0, "data.valid_fraction", f"must be in (0, 1), got {self.valid_fraction}")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        _check(self.train_limit is None or self.train_limit > 0, "data.train_limit", f"must be > 0, got {self.train_limit}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which network (SPEC §1) and how wide."""

    name: Literal["simcnn", "rescnn", "weak_cnn"] = "simcnn"
    width: float = 1.0
    dropout: float | None = None  # None = the family's reference rate

    def __post_init__(self):
        _check(self.width > 0, "model.width", f"must be > 0, got {self.width}")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optax optimiser and the training loop."""

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: int = 0
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 1000
    seed: int = 0
    augment: bool = False  # random flips/crops (off for Fashion-MNIST presets)

    def __post_init__(self):
        _check(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(0.0 <= self.momentum < 1.0, "train.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0, "train.warmup_epochs",
               f"must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: data, model, training, search, patching."""

    name: str = "run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    patch: PatchConfig = PatchConfig()


# -- generic dataclass <-> dict with checks -----------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or ConfigError naming `key` and the expected type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, Mapping), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        _check(value in typing.get_args(tp), key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        _check(value is None, key, f"expected null, got {value!r}")
        return None
    if origin in (tuple, list):
        _check(isinstance(value, (list, tuple)), key, f"expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        _check(isinstance(value, Mapping), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected bool, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected int, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected float, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected str, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) mapping, checking every key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid keys under {prefix.rstrip('.') or 'the top level'}: {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) of a config dataclass."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["train.epochs=3", "model.width=0.25"]` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"--set {item!r}: the value {raw!r} is not valid YAML ({first}); quote it for a "
                f"string, e.g. --set '{key.strip()}=\"{raw}\"'") from e
        _set_dotted(tree, key.strip(), value)
    return tree


def merge(base: Mapping, over: Mapping) -> dict:
    """`over` merged into `base`, section by section (neither is changed)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        data = dict(loaded)
    data = merge(data, parse_overrides(overrides))
    return from_dict(Config, data)


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)
