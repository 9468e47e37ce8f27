"""Tests of jaxsplit.config: checked loading, dotted-key errors, overrides, round trips.

(Every shipped config loading and `presets.DEMO == configs/fashion_mnist_cpu.yaml` are
tested in tests/test_cli.py; `--set` through the CLI too.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from jaxsplit import config as C

REPO = Path(__file__).resolve().parents[1]


def _err(data: dict) -> str:
    with pytest.raises(C.ConfigError) as info:
        C.from_dict(C.Config, data)
    return str(info.value)


def test_defaults_are_the_reference_and_every_section_is_frozen():
    cfg = C.from_dict(C.Config, {})
    assert cfg == C.Config()
    assert cfg.data.split_seed == 1009 and cfg.data.valid_fraction == 0.2
    assert cfg.search.population_size == 100 and cfg.search.num_generations == 200
    assert cfg.search.alpha == 0.9 and cfg.search.mutation_rate == 0.05
    for section in (cfg, cfg.data, cfg.model, cfg.train, cfg.search, cfg.patch):
        with pytest.raises(dataclasses.FrozenInstanceError):
            section.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("data, needles", [
    ({"trian": {}}, ["'trian'", "top level", "train"]),
    ({"train": {"epochz": 3}}, ["train.epochz", "valid keys under train", "epochs"]),
    ({"search": {"pop_size": 3}}, ["search.pop_size", "population_size"]),
    ({"patch": {"tc": 1}}, ["patch.tc", "target_classes"]),
])
def test_unknown_keys_are_named_with_the_valid_ones(data, needles):
    msg = _err(data)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("data, needles", [
    ({"train": {"epochs": "three"}}, ["train.epochs", "expected int", "'three'"]),
    ({"train": {"epochs": 2.5}}, ["train.epochs", "expected int"]),
    ({"train": {"epochs": True}}, ["train.epochs", "expected int"]),
    ({"train": {"learning_rate": "fast"}}, ["train.learning_rate", "expected float"]),
    ({"train": {"nesterov": 1}}, ["train.nesterov", "expected bool"]),
    ({"train": {"optimizer": "rmsprop"}}, ["train.optimizer", "one of 'sgd', 'adam', 'adamw'"]),
    ({"model": {"name": "vgg"}}, ["model.name", "'simcnn'", "'vgg'"]),
    ({"model": {"dropout": "none"}}, ["model.dropout", "float or null"]),
    ({"data": {"classes": 3}}, ["data.classes", "a list of int"]),
    ({"data": {"classes": [0, "b"]}}, ["data.classes", "a list of int", "'b'"]),
    ({"patch": {"strong_classes": [0, 1.5]}}, ["patch.strong_classes[1]", "expected int"]),
    ({"search": {"num_valid": "all"}}, ["search.num_valid", "int or null"]),
    ({"search": {"thresholds": [0.9]}}, ["search.thresholds", "null"]),
    ({"name": 3}, ["name", "expected str"]),
    ({"train": 5}, ["train", "mapping of TrainConfig"]),
])
def test_wrong_types_name_the_dotted_key_and_the_expected_type(data, needles):
    msg = _err(data)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("data, key", [
    ({"data": {"valid_fraction": 1.0}}, "data.valid_fraction"),
    ({"data": {"image_size": 4}}, "data.image_size"),
    ({"data": {"train_limit": 0}}, "data.train_limit"),
    ({"model": {"width": 0}}, "model.width"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"train": {"learning_rate": -0.1}}, "train.learning_rate"),
    ({"train": {"momentum": 1.0}}, "train.momentum"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"epochs": 3, "warmup_epochs": 3}}, "train.warmup_epochs"),
    ({"search": {"population_size": 1}}, "search.population_size"),
    ({"search": {"mutation_rate": 1.5}}, "search.mutation_rate"),
    ({"search": {"eval_cache_mib": -1}}, "search.eval_cache_mib"),
    ({"search": {"alpha": 0.0}}, "search.alpha"),
    ({"search": {"population_size": 10, "num_parents_mating": 11}}, "search.num_parents_mating"),
    ({"search": {"min_kept_ensembles": 600}}, "search.min_kept_ensembles"),
    ({"patch": {"strong_classes": [0]}}, "patch.strong_classes"),
    ({"patch": {"weak_classes": [4, 5]}}, "patch.weak_classes"),
    ({"patch": {"target_classes": [9]}}, "patch.target_classes"),
    ({"patch": {"calibrations": ["magic"]}}, "patch.calibrations"),
])
def test_out_of_range_values_name_the_dotted_key(data, key):
    assert _err(data).startswith(key + ":")


def test_ints_are_accepted_as_floats_and_lists_become_tuples():
    cfg = C.from_dict(C.Config, {"model": {"width": 1}, "data": {"classes": [3, 1]},
                                 "patch": {"target_classes": None}})
    assert cfg.model.width == 1.0 and isinstance(cfg.model.width, float)
    assert cfg.data.classes == (3, 1)
    assert cfg.patch.target_classes is None


def test_parse_overrides_types_and_nesting():
    tree = C.parse_overrides([
        "train.epochs=3", "model.width=0.25", "train.augment=true", "model.dropout=null",
        "data.classes=[0, 2, 4]", "name=my run", "train.optimizer=adam", "search.thresholds={2: 0.9}",
        "data.name=a=b",
    ])
    assert tree == {
        "train": {"epochs": 3, "augment": True, "optimizer": "adam"},
        "model": {"width": 0.25, "dropout": None},
        "data": {"classes": [0, 2, 4], "name": "a=b"},
        "name": "my run",
        "search": {"thresholds": {2: 0.9}},
    }
    cfg = C.from_dict(C.Config, {k: v for k, v in tree.items()})
    assert cfg.train.epochs == 3 and cfg.data.classes == (0, 2, 4) and cfg.model.dropout is None
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_overrides(["train.epochs"])
    with pytest.raises(C.ConfigError, match="name is not a section"):
        C.parse_overrides(["name=x", "name.y=1"])


def test_load_applies_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "train": {"epochs": 5, "batch_size": 16}}))
    cfg = C.load(path, ["train.epochs=7", "search.seed=3"])
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size, cfg.search.seed) == ("t", 7, 16, 3)
    assert cfg.train.learning_rate == C.TrainConfig().learning_rate
    assert C.merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(C.ConfigError, match="train.epochs"):
        C.load(path, ["train.epochs=-1"])
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="must hold a mapping, got list"):
        C.load(bad)
    bad.write_text("")  # an empty file is the defaults
    assert C.load(bad) == C.Config()


def test_every_shipped_config_round_trips(tmp_path):
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = C.load(path)
        assert C.from_dict(C.Config, C.to_dict(cfg)) == cfg, path.name
        C.save(cfg, tmp_path / path.name)
        assert C.load(tmp_path / path.name) == cfg, path.name
        assert C.to_json(cfg) == C.to_json(C.load(tmp_path / path.name))
