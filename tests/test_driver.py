"""The modularization search driver: end to end, checkpoints, resume (search.driver)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import checkpoint as ckpt
from jaxsplit import config as jconfig
from jaxsplit import importance as imp_lib
from jaxsplit import masks as masks_lib
from jaxsplit.search import driver as D
from jaxsplit.train import train_and_evaluate

NUM_CLASSES = 4


def make_config(**search) -> jconfig.Config:
    """Synthetic 4-class task, a tiny weak CNN, a tiny search."""
    base = jconfig.Config(
        name="test",
        data=jconfig.DataConfig(source="synthetic", name="synthetic", classes=(0, 1, 2, 3),
                                train_limit=400),
        model=jconfig.ModelConfig(name="weak_cnn", width=0.25),
        train=jconfig.TrainConfig(optimizer="adam", epochs=3, batch_size=16, learning_rate=0.003,
                                  schedule="constant", weight_decay=0.0),
    )
    defaults = dict(population_size=6, num_generations=3, num_valid=48, checkpoint_every=1,
                    backend="reference", min_kept_ensembles=5, max_kept_ensembles=20, seed=3)
    defaults.update(search)
    return dataclasses.replace(base, search=dataclasses.replace(base.search, **defaults))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("model")
    train_and_evaluate(make_config(), run, progress=False)
    return run


def copy_model(model_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir / "checkpoint", dest / "checkpoint")
    return dest


@pytest.fixture(scope="module")
def searched(model_dir, tmp_path_factory):
    run = copy_model(model_dir, tmp_path_factory.mktemp("search"))
    cfg = make_config()
    summary = D.run_modularize(run, cfg, progress=False)
    return run, cfg, summary


def strip_times(history: dict) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in D.TIME_KEYS} for h in history["generations"]]


def test_end_to_end_search_beats_chance(searched):
    run, cfg, summary = searched
    out = run / D.MODULARIZE_DIRNAME
    for name in ("importance.npz", "masks.npz", "history.json", "summary.json", "curves.png"):
        assert (out / name).exists(), name
    # 4 classes: chance is 25%; the modules must be far better
    assert summary["ensemble_valid_accuracy"] >= 0.75
    assert summary["ensemble_test_accuracy"] >= 0.6
    assert summary["model_test_accuracy"] >= 0.6
    assert summary["generations_run"] == cfg.search.num_generations + 1
    model, _, _, _ = ckpt.load_model(run)
    spec = model.conv_spec()
    with np.load(out / "masks.npz") as z:
        masks = {k: z[k] for k in z.files}
    assert set(masks) == set(spec.names)
    masks_lib.validate({k: jnp.asarray(v) for k, v in masks.items()}, spec, batch_shape=(NUM_CLASSES,))
    assert len(summary["per_class"]) == NUM_CLASSES
    for c, row in enumerate(summary["per_class"]):
        kept = {n: int(masks[n][c].sum()) for n in spec.names}
        assert row["kept_kernels"] == sum(kept.values())
        assert 0 < row["macs_fraction"] <= 1 and 0 < row["params_fraction"] <= 1
    history = json.loads((out / "history.json").read_text())
    gens = history["generations"]
    assert [h["generation"] for h in gens] == list(range(cfg.search.num_generations + 1))
    assert summary["best_valid_fitness"] == pytest.approx(max(h["best_valid_fitness"] for h in gens))
    assert history["compile_time_s"] > 0 and all(h["time_s"] > 0 for h in gens)
    with np.load(out / "importance.npz") as z:
        assert z["conv_0"].shape == (NUM_CLASSES, spec.layer("conv_0").num_kernels)
    # the same masks as a Modules file, for the traced graph of the run's model
    from functools import partial

    from jaxsplit.graph import trace
    from jaxsplit.modularize import Modules

    params = ckpt.load_model(run)[1]
    graph = trace(partial(model.apply, train=False), {"params": params}, model.dummy_input())
    modules = Modules.load(out / D.MODULES_FILE, graph)
    for k in spec.names:
        np.testing.assert_array_equal(modules.masks[k], masks[k])
    assert modules.class_names == tuple(r["name"] for r in summary["per_class"])
    assert len(modules.history) == len(gens)


def test_keeps_the_latest_two_checkpoints_and_refuses_to_overwrite(searched):
    run, cfg, summary = searched
    ckpts = D.list_checkpoints(run / D.MODULARIZE_DIRNAME / D.CKPT_DIRNAME)
    total = cfg.search.num_generations + 1
    assert [n for n, _ in ckpts] == [total - 1, total]
    with pytest.raises(D.SearchError, match="resume"):
        D.run_modularize(run, cfg, progress=False)


def test_resume_of_a_finished_search_changes_nothing(searched):
    run, cfg, summary = searched
    out = run / D.MODULARIZE_DIRNAME
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    again = D.run_modularize(run, cfg, resume=True, progress=False)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    assert before == after
    for key in ("ensemble_valid_accuracy", "ensemble_test_accuracy", "best_generation",
                "per_class"):
        assert again[key] == summary[key]


def test_resume_refuses_a_different_config_or_a_truncated_checkpoint(searched, tmp_path):
    run, cfg, _ = searched
    other = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, mutation_rate=0.1))
    with pytest.raises(D.ResumeError, match=r"search config: mutation_rate 0\.05 -> 0\.1"):
        D.run_modularize(run, other, resume=True, progress=False)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_seed=7))
    with pytest.raises(D.ResumeError, match="data config: split_seed"):
        D.run_modularize(run, other, resume=True, progress=False)
    # truncate one array file of the latest checkpoint (on a copy)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    latest = D.list_checkpoints(copy / D.MODULARIZE_DIRNAME / D.CKPT_DIRNAME)[-1][1]
    files = sorted((p for p in (latest / "tree").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:
        f.truncate(max(0, files[-1].stat().st_size // 2))
    with pytest.raises(D.ResumeError, match="cannot resume"):
        D.run_modularize(copy, cfg, resume=True, progress=False)


def test_checkpoint_round_trip_continues_bit_identically(model_dir, tmp_path):
    """In process: save at generation 2, load into a fresh template, continue -> same result."""
    cfg = make_config(num_valid=32)
    model, params, _, _ = ckpt.load_model(model_dir)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(32, 32, 32, 1)).astype(np.float32))
    labels = jnp.asarray(np.arange(32) % NUM_CLASSES, jnp.int32)
    classes = jnp.arange(NUM_CLASSES, dtype=jnp.int32)
    importance = imp_lib.kernel_importance(model, params, images, labels).importance
    problem, settings = D.build_problem(model, "weak_cnn", importance, cfg.search)
    base = jax.random.key(cfg.search.seed)
    k_init, k_pop = jax.random.split(base)

    def fresh():
        bits = D.initial_population(k_pop, problem, cfg.search.population_size, settings)
        return D.init_carry(k_init, problem, bits)

    step = D.make_step(problem)
    carry, metrics = fresh(), []
    for g in range(5):
        carry, m = step(D._strong(carry), D.generation_key(base, g), {"params": params}, images, labels, classes)
        metrics.append(D._to_host(m))
        if g == 1:
            path = D.save_search_checkpoint(tmp_path, 2, carry, base, {"fingerprint": {}})
    resumed, _ = D.load_search_checkpoint(path, jax.eval_shape(fresh), base, {})
    for g in range(2, 5):
        resumed, m = step(D._strong(resumed), D.generation_key(base, g), {"params": params}, images, labels,
                          classes)
        assert D._to_host(m) == metrics[g]
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ckpt.CheckpointExistsError):  # never overwritten
        D.save_search_checkpoint(tmp_path, 2, carry, base, {})


def test_fingerprint_ignores_settings_that_cannot_change_the_result(model_dir):
    _, params, _, _ = ckpt.load_model(model_dir)
    base = make_config()
    fp = D.fingerprint(base, {"width": 1.0}, params)
    for change in ({"checkpoint_every": 7}, {"eval_cache_mib": 0}):
        other = dataclasses.replace(base, search=dataclasses.replace(base.search, **change))
        assert D.compare_fingerprints(fp, D.fingerprint(other, {"width": 1.0}, params)) == []
    other = dataclasses.replace(base, search=dataclasses.replace(base.search, share_first_conv=False))
    assert D.compare_fingerprints(fp, D.fingerprint(other, {"width": 1.0}, params)) == [
        "search config: share_first_conv None -> False"]


def test_compare_fingerprints_names_the_difference():
    a = {"model": {"width": 1.0}, "search": {"population_size": 8}, "data": {}, "params": {"sha256": "x"}}
    b = {"model": {"width": 1.0}, "search": {"population_size": 10}, "data": {}, "params": {"sha256": "y"}}
    diffs = D.compare_fingerprints(a, b)
    assert diffs[0] == "search config: population_size 8 -> 10"
    assert "param hash" in diffs[1]
    assert D.compare_fingerprints(a, a) == []


SCRIPT = """
import sys
from jaxsplit import config as jconfig
from jaxsplit.search.driver import run_modularize
cfg = jconfig.load(sys.argv[2])
run_modularize(sys.argv[1], cfg, resume=True, progress=False)
"""


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(model_dir, tmp_path):
    """SIGKILL a search subprocess after its first checkpoint, resume it, compare."""
    cfg = make_config(num_generations=24, checkpoint_every=2)
    cfg_path = tmp_path / "config.yaml"
    jconfig.save(cfg, cfg_path)
    script = tmp_path / "search.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run_a = copy_model(model_dir, tmp_path / "a")
    run_b = copy_model(model_dir, tmp_path / "b")
    subprocess.run([sys.executable, str(script), str(run_a), str(cfg_path)], check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, str(script), str(run_b), str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_root = run_b / D.MODULARIZE_DIRNAME / D.CKPT_DIRNAME
    deadline = time.time() + 300
    while not D.list_checkpoints(ckpt_root) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = D.list_checkpoints(ckpt_root)
    assert killed_at and killed_at[-1][0] < cfg.search.num_generations + 1, "killed too late"
    assert not (run_b / D.MODULARIZE_DIRNAME / "masks.npz").exists()
    subprocess.run([sys.executable, str(script), str(run_b), str(cfg_path)], check=True, env=env,
                   capture_output=True)
    out_a, out_b = run_a / D.MODULARIZE_DIRNAME, run_b / D.MODULARIZE_DIRNAME
    with np.load(out_a / "masks.npz") as za, np.load(out_b / "masks.npz") as zb:
        assert za.files == zb.files
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k])
    hist_a = json.loads((out_a / "history.json").read_text())
    hist_b = json.loads((out_b / "history.json").read_text())
    assert strip_times(hist_a) == strip_times(hist_b)
    sum_a = json.loads((out_a / "summary.json").read_text())
    sum_b = json.loads((out_b / "summary.json").read_text())
    for key in ("ensemble_valid_accuracy", "ensemble_test_accuracy", "per_class", "best_generation"):
        assert sum_a[key] == sum_b[key]
