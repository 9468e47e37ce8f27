"""Tests of jaxsplit.patch: mixed tasks, the patch path (compose + calibrations), end to end."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import calibration as calib
from jaxsplit import data as jdata
from jaxsplit import patch

# -- mixed tasks -------------------------------------------------------------------------------


def _tagged(num_classes: int, per_class: list[int] | int, offset: int = 0, size: int = 4) -> jdata.Dataset:
    """A dataset whose image i carries a unique id ``offset + i`` in pixel (0, 0, 0)."""
    counts = per_class if isinstance(per_class, list) else [per_class] * num_classes
    labels = np.repeat(np.arange(num_classes), counts)
    labels = np.random.default_rng(offset).permutation(labels)
    images = np.zeros((len(labels), size, size, 1), np.float32)
    images[:, 0, 0, 0] = offset + np.arange(len(labels))
    return jdata.Dataset.from_arrays(images, labels, num_classes=num_classes,
                                     class_names=[f"c{c}" for c in range(num_classes)])


def _ids(ds: jdata.Dataset) -> np.ndarray:
    return ds.images[:, 0, 0, 0].astype(int)


def test_self_task_labels_counts_and_tc_last():
    train, valid, test = _tagged(10, 30, 0), _tagged(10, 8, 10_000), _tagged(10, 5, 20_000)
    weak, tc = (7, 5, 9), 2
    task = patch.make_self_task(train, valid, test, strong_classes=(0, 1, 2, 3, 4),
                                weak_classes=weak, tc=tc, tc_train_images=11, seed=0)
    assert task.num_classes == 4 and task.tc_index == 3 and task.target_class == 2
    assert task.weak_classes == weak
    for split, src in (("train", train), ("valid", valid), ("test", test)):
        ds = getattr(task, split)
        assert ds.num_classes == 4
        assert ds.class_names == ("c7", "c5", "c9", "c2")
        # every image keeps its source label, mapped B -> 0..|B|-1 in the given order, TC -> |B|
        src_label = dict(zip(_ids(src), src.labels))
        mapping = {7: 0, 5: 1, 9: 2, 2: 3}
        assert all(mapping[src_label[i]] == l for i, l in zip(_ids(ds), ds.labels))
    # tc_train_images respected in train only; B untouched; valid and test keep everything
    np.testing.assert_array_equal(task.train.class_counts(), [30, 30, 30, 11])
    np.testing.assert_array_equal(task.valid.class_counts(), [8, 8, 8, 8])
    np.testing.assert_array_equal(task.test.class_counts(), [5, 5, 5, 5])
    assert task.counts()["train"] == [30, 30, 30, 11]
    # weak_images_per_class caps B's training images too (the TC keeps its own cap)
    capped = patch.make_self_task(train, valid, test, strong_classes=(0, 1, 2, 3, 4),
                                  weak_classes=weak, tc=tc, tc_train_images=11, seed=0,
                                  weak_images_per_class=9)
    np.testing.assert_array_equal(capped.train.class_counts(), [9, 9, 9, 11])
    np.testing.assert_array_equal(capped.valid.class_counts(), [8, 8, 8, 8])
    assert set(_ids(capped.train)) <= set(_ids(task.train)) and "9 per weak class" in capped.name


def test_self_task_subsample_is_seeded_and_capped():
    train, valid, test = _tagged(6, [20, 3, 20, 20, 20, 20], 0), _tagged(6, 2, 100), _tagged(6, 2, 200)
    a = patch.make_self_task(train, valid, test, (0, 1), (4, 5), 0, 7, seed=1)
    b = patch.make_self_task(train, valid, test, (0, 1), (4, 5), 0, 7, seed=1)
    c = patch.make_self_task(train, valid, test, (0, 1), (4, 5), 0, 7, seed=2)
    np.testing.assert_array_equal(_ids(a.train), _ids(b.train))
    assert set(_ids(a.train)) != set(_ids(c.train))
    # fewer TC images than the cap: all kept
    d = patch.make_self_task(train, valid, test, (0, 1), (4, 5), 1, 7, seed=1)
    assert d.train.class_counts()[-1] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tc": 5}, "not among strong_classes"),
        ({"weak_classes": (3, 4)}, "overlap"),
        ({"weak_classes": (4, 10)}, "out of range"),
        ({"weak_classes": (4, 4)}, "repeated"),
        ({"tc_train_images": 0}, "tc_train_images"),
        ({"weak_images_per_class": 0}, "weak_images_per_class"),
    ],
)
def test_self_task_bad_inputs(kwargs, match):
    ds = _tagged(10, 2)
    args = dict(strong_classes=(0, 1, 2, 3), weak_classes=(4, 5), tc=0, tc_train_images=5, seed=0)
    args.update(kwargs)
    with pytest.raises(patch.PatchError, match=match):
        patch.make_self_task(ds, ds, ds, **args)


def test_cifar100_cifar10_task_on_small_arrays():
    c100_train, c100_test = _tagged(20, 10, 0), _tagged(20, 4, 1000)
    c10_train, c10_test = _tagged(5, 40, 2000), _tagged(5, 12, 3000)
    weak = (0, 2, 5, 8, 9, 12, 15)
    task = patch.make_cifar100_cifar10_task(c100_train, c100_test, c10_train, c10_test, weak, tc=3,
                                            tc_train_images=25, tc_test_images=6, valid_fraction=0.2)
    k = len(weak) + 1
    assert task.num_classes == k and task.tc_index == k - 1 and task.target_class == 3
    # 10 images per CIFAR-100 class split 80/20 overall; 25 TC images split 20/5
    assert len(task.train) + len(task.valid) == 10 * len(weak) + 25
    assert task.train.class_counts()[-1] + task.valid.class_counts()[-1] == 25
    assert task.valid.class_counts()[-1] == 5
    np.testing.assert_array_equal(task.test.class_counts(), [4] * len(weak) + [6])
    assert task.test.class_names == tuple(f"c{c}" for c in weak) + ("c3",)
    # provenance: TC images come from CIFAR-10 class 3, weak ones from the CIFAR-100 class
    c10_label = dict(zip(_ids(c10_train), c10_train.labels))
    c100_label = dict(zip(_ids(c100_train), c100_train.labels))
    for i, l in zip(_ids(task.train), task.train.labels):
        if l == k - 1:
            assert c10_label[i] == 3
        else:
            assert c100_label[i] == weak[l]
    with pytest.raises(patch.PatchError, match="out of range"):
        patch.make_cifar100_cifar10_task(c100_train, c100_test, c10_train, c10_test, weak, tc=7)


# -- the patch path on known inputs ------------------------------------------------------------

# Weak model: uniform over K = 3 classes (softmax 1/3 each), except example 3 where class 0 wins.
WEAK = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
MODULE = np.array([9.0, 1.0, 6.0, 10.0, 4.0])
LABELS = np.array([2, 0, 2, 2, 1])
TC_FIT = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0])
HELD_SCORES = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 8.0])
HELD_LABELS = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
DATA = patch.CalibrationData(TC_FIT, HELD_SCORES, HELD_LABELS)


def test_patch_scores_uses_compose_semantics():
    out = np.asarray(patch.patch_scores(WEAK, MODULE, lambda s: s / 10.0, tc_index=2))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(WEAK), axis=-1))
    np.testing.assert_allclose(out[:, :2], probs[:, :2], rtol=1e-6)  # non-TC columns: weak softmax
    np.testing.assert_allclose(out[:, 2], MODULE / 10.0, rtol=1e-6)  # TC column: calibrated module
    # a TC in the middle column
    out1 = np.asarray(patch.patch_scores(WEAK, MODULE, None, tc_index=1))
    np.testing.assert_allclose(out1[:, 1], MODULE)


def _expected_tc_column(name: str, state: dict) -> np.ndarray:
    s = MODULE
    if name == "min_max":
        return (s - TC_FIT.min()) / (TC_FIT.max() - TC_FIT.min())
    if name == "percentile":
        lo, hi = np.percentile(TC_FIT, [10, 90])
        return (s - lo) / (hi - lo)
    if name == "iqr":
        q1, q3 = np.percentile(TC_FIT, [25, 75])
        lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        return (s - lo) / (hi - lo)
    if name == "z_norm":
        return 1 / (1 + np.exp(-(s - TC_FIT.mean()) / TC_FIT.std()))
    if name == "temperature":
        return 1 / (1 + np.exp(-s / np.exp(state["log_temperature"])))
    if name == "platt":
        return 1 / (1 + np.exp(-(state["slope"] * s + state["intercept"])))
    raise AssertionError(name)


@pytest.mark.parametrize("name", calib.NAMES)
def test_every_calibration_through_patch_path(name):
    out = patch.patch_metrics(WEAK, MODULE, LABELS, 2, [name], DATA)
    m = out["after"][name]
    expected_col = _expected_tc_column(name, m["calibration_state"])
    scores = np.asarray(patch.patch_scores(WEAK, MODULE, patch.fit_calibration(name, DATA), 2))
    np.testing.assert_allclose(scores[:, 2], expected_col, rtol=1e-4, atol=1e-5)
    preds = scores.argmax(-1)
    # the metrics are those of these predictions, computed by hand
    tp = np.sum((preds == 2) & (LABELS == 2))
    assert m["tc_precision"] == pytest.approx(tp / max(np.sum(preds == 2), 1))
    assert m["tc_recall"] == pytest.approx(tp / 3)
    non_tc = LABELS != 2
    assert m["non_tc_accuracy"] == pytest.approx(np.mean(preds[non_tc] == LABELS[non_tc]))
    probs = np.clip(expected_col, 0, 1)
    assert m["tc_ece"] == pytest.approx(
        float(calib.expected_calibration_error(probs, (LABELS == 2).astype(int))), abs=1e-5)
    if name in calib.SUPERVISED:  # fitted on separable held-out data: positive slope
        assert m["calibration_state"]
        assert np.all(np.diff(expected_col[np.argsort(MODULE)]) >= 0)


def test_patch_metrics_before_and_min_max_by_hand():
    out = patch.patch_metrics(WEAK, MODULE, LABELS, 2, ["min_max"], DATA)
    before = out["before"]
    # weak argmax: ties -> class 0 for rows 0,1,2,4; row 3 -> 0. All predicted 0.
    assert before["tc_recall"] == 0.0 and before["tc_precision"] == 0.0
    assert before["non_tc_accuracy"] == pytest.approx(1 / 2)  # row 1 (label 0) right, row 4 wrong
    assert before["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [3, 0, 0]]
    # min-max on [0, 12]: TC column = [0.75, 0.083, 0.5, 0.833, 0.333]; the weak non-TC columns are
    # 1/3 (rows 0, 1, 2, 4) and ~0.987 (row 3), so preds = [2, 0, 2, 0, 0]
    after = out["after"]["min_max"]
    assert after["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [1, 0, 2]]
    assert after["tc_precision"] == 1.0 and after["tc_recall"] == pytest.approx(2 / 3)
    assert after["calibration_state"] == {"low": 0.0, "high": 12.0}


def test_evaluate_patch_with_toy_models():
    # images (N, 2, 2, 1); the "module" is the mean pixel, the "weak model" is uniform over K=3
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 2, 0, 1, 2, 1])
    test_images = (np.zeros((8, 2, 2, 1)) + np.where(labels == 2, 3.0, 0.0)[:, None, None, None]).astype(np.float32)
    test_images += rng.uniform(0, 0.5, test_images.shape).astype(np.float32)
    valid_labels = np.array([0, 1, 2, 0, 1])
    valid_images = (np.zeros((5, 2, 2, 1)) + np.where(valid_labels == 2, 3.0, 0.0)[:, None, None, None]).astype(np.float32)
    ds = lambda x, y: jdata.Dataset(x, y.astype(np.int32), 3)
    task = patch.PatchTask(ds(test_images, labels), ds(valid_images, valid_labels), ds(test_images, labels),
                           target_class=7, weak_classes=(4, 5), name="toy")
    tc_valid = np.full((3, 2, 2, 1), 2.0, np.float32) + np.arange(3, dtype=np.float32)[:, None, None, None]

    def weak_apply(x):
        return jnp.zeros((x.shape[0], 3))

    def module_apply(x):
        return jnp.mean(x, axis=(1, 2, 3))

    out = patch.evaluate_patch(patch.batched(weak_apply, 3), patch.batched(module_apply, 3), task, tc_valid,
                               ["min_max", "platt"])
    # min-max fitted on the TC valid images only: their means are 2, 3, 4
    assert out["after"]["min_max"]["calibration_state"] == {"low": 2.0, "high": 4.0}
    # TC test images have mean in [3, 3.5] -> calibrated >= 0.5 > 1/3; others <= 0 -> non-TC
    for name in ("min_max", "platt"):
        m = out["after"][name]
        assert m["tc_precision"] == 1.0 and m["tc_recall"] == 1.0, name
    assert out["before"]["tc_recall"] == 0.0


def test_batched_pads_matches_and_compiles_once():
    x = np.arange(7 * 2 * 2 * 1, dtype=np.float32).reshape(7, 2, 2, 1)
    shapes = []

    def fn(b):
        shapes.append(b.shape)  # runs at trace time only
        return b.sum(axis=(1, 2, 3))

    predict = patch.batched(fn, batch_size=3)
    np.testing.assert_allclose(predict(x), x.sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(predict(x[:2]), x[:2].sum(axis=(1, 2, 3)))
    assert shapes == [(3, 2, 2, 1)]
    with pytest.raises(patch.PatchError):
        predict(x[:0])


# -- end to end on synthetic data ---------------------------------------------------------------


def test_renormalize_is_exact():
    ds = _tagged(3, 4)
    a = {"mean": [0.5], "std": [2.0]}
    b = {"mean": [-1.0], "std": [0.5]}
    out = patch._renormalize(ds, a, b)
    np.testing.assert_allclose(out.images, ((ds.images * 2.0 + 0.5) + 1.0) / 0.5, rtol=1e-6)
    assert patch._renormalize(ds, a, a) is ds


def _e2e_config(**patch_overrides):
    from jaxsplit import config

    p = {"strong_classes": [0, 1, 2, 3, 4], "weak_classes": [5, 6, 7, 8, 9], "target_classes": [1, 3],
         "tc_train_images": 10, "weak_model": "weak_cnn", "weak_width": 0.25, "weak_epochs": 2,
         "weak_learning_rate": 0.003, "calibrations": ["min_max", "platt"], "poor_fit": True,
         "underfit_epochs": 1, "overfit_epochs": 2, "poor_fit_images_per_class": 30,
         "valid_folds": 3}
    p.update(patch_overrides)
    return config.from_dict(config.Config, {
        "name": "tiny",
        # the faithful protocol: the strong model knows only classes 0-4, here in reversed order,
        # so TC 1 is the strong model's class 3 (exercises the class mapping)
        "data": {"source": "synthetic", "name": "synthetic", "classes": [4, 3, 2, 1, 0]},
        "model": {"name": "weak_cnn", "width": 0.25},
        "train": {"optimizer": "adam", "learning_rate": 0.003, "epochs": 1, "batch_size": 64,
                  "weight_decay": 0.0, "eval_batch_size": 256},
        "patch": p,
    })


def _write_whole_modules(run, **info):
    """Writes all-ones modules (each the whole model) of the run's model into
    ``modularize/modules.npz`` with a finished search's ``summary.json``; returns the Modules."""
    from jaxsplit import checkpoint
    from jaxsplit import masks as masks_lib
    from jaxsplit import modularize as modz

    loaded = checkpoint.load_model(run)
    apply_fn, variables = loaded.apply_fn, loaded.variables
    graph = modz.trace_graph(apply_fn, variables, loaded.model.dummy_input(1))
    c = graph.num_outputs
    modules = modz.Modules(
        masks={k: np.asarray(v) for k, v in masks_lib.full(graph, (c,)).items()},
        classes=np.arange(c, dtype=np.int32), class_names=tuple(str(i) for i in range(c)),
        stats=tuple({"class": i} for i in range(c)), history=(), graph=graph,
        info={"params_sha256": modz.variables_digest(variables), **info})
    modules.save(run / "modularize" / "modules.npz")
    (run / "modularize" / "summary.json").write_text(json.dumps({"source_model": {
        "params_sha256": checkpoint.params_digest(loaded.params), "class_ids": list(range(c))}}))
    return modules


def _run_with_whole_modules(cfg, run, **info):
    """A run of `cfg` with a random strong model (patching needs no trained one) and all-ones
    modules with a finished search's summary."""
    _save_untrained(run, cfg)
    return _write_whole_modules(run, **info)


def test_run_patch_end_to_end_on_synthetic(tmp_path):
    from jaxsplit import report

    cfg = _e2e_config()
    run = tmp_path / "tiny"
    # all-ones masks: each module is the whole model, so patching with it equals the baseline
    _run_with_whole_modules(cfg, run)

    res = patch.run_patch(run, cfg, progress=False, verbose=False)
    assert res["target_classes"] == [1, 3] and res["primary_calibration"] == "min_max"
    assert (run / "patch" / "patch_results.json").is_file()
    for png in ("patch_tc_bars.png", "patch_calibrations.png", "patch_module_size.png"):
        assert (run / "patch" / png).is_file()
    for tc, strong_class in (("1", 3), ("3", 1)):
        r = res["per_tc"][tc]
        assert r["strong_class"] == strong_class
        # weak task: 5 weak classes + TC; <= 10 TC train images; 20 test images per class
        assert r["task"]["counts"]["train"][-1] == 10
        assert r["task"]["counts"]["test"] == [20] * 6
        assert r["before"]["num_examples"] == 120 and r["before"]["num_tc"] == 20
        assert r["module"]["macs_fraction"] == pytest.approx(1.0)
        for name in ("min_max", "platt"):
            mod, whole = r["module_patch"][name], r["whole_model_patch"][name]
            assert mod["confusion_matrix"] == whole["confusion_matrix"], name
            assert 0.0 <= mod["tc_ece"] <= 1.0
        assert set(r["poor_fit"]) == {"underfit", "overfit"}
        assert r["poor_fit"]["underfit"]["weak"]["snapshot_epoch"] == 1
        assert r["poor_fit"]["overfit"]["weak"]["snapshot_epoch"] == 2
        assert not r["weak"]["reused"]
    for key in ("tc_precision", "tc_recall", "non_tc_accuracy"):
        expected = np.mean([res["per_tc"][t]["module_patch"]["min_max"][key] for t in ("1", "3")])
        assert res["average"]["module_patch"]["min_max"][key] == pytest.approx(expected)
    acc = res["acceptance"]
    assert acc["delta_tc_recall"] == pytest.approx(
        res["average"]["module_patch"]["min_max"]["tc_recall"] - res["average"]["before"]["tc_recall"])

    # the weak models are cached and reused; other calibrations do not retrain them
    again = patch.run_patch(run, _e2e_config(calibrations=["platt"], poor_fit=False), progress=False,
                            verbose=False, plots=False)
    assert all(again["per_tc"][t]["weak"]["reused"] for t in ("1", "3"))
    assert again["per_tc"]["1"]["before"] == {k: v for k, v in res["per_tc"]["1"]["before"].items()}
    assert again["per_tc"]["1"]["module_patch"]["platt"]["confusion_matrix"] == \
        res["per_tc"]["1"]["module_patch"]["platt"]["confusion_matrix"]

    text = report.write_report(run).read_text()
    assert "## Patching" in text and "Per target class" in text


def _random_variables(model, seed):
    """Random variables of `model`'s shapes, drawn with NumPy (initialising a ResNet eagerly
    takes seconds): kernels ~ N(0, 1/fan_in), biases small, BatchNorm scales near 1 and
    running averages away from their initial 0 / 1, so they matter."""
    from jaxsplit.models import init_variables

    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, sds):
        name, shape = path[-1].key, sds.shape
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, shape)
        return 0.2 * rng.normal(size=shape)  # bias, running mean

    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), s.dtype), shapes)


def _save_untrained(run, cfg, seed=0, width=None):
    """Saves a random strong model of `cfg` (5 classes, 32x32x1) as the run's checkpoint."""
    from jaxsplit import checkpoint, pipeline
    from jaxsplit.models import has_state

    model_cfg = cfg.model if width is None else dataclasses.replace(cfg.model, width=width)
    model = pipeline.build_model(model_cfg, 5, 1, 32)
    variables = _random_variables(model, seed)
    params = variables if has_state(model) else variables["params"]
    checkpoint.save_model(run, params, dataclasses.replace(cfg, model=model_cfg), {}, model=model,
                          overwrite=True)
    return model, variables


def test_run_patch_needs_modules(tmp_path):
    cfg = _e2e_config()
    run = tmp_path / "nomodules"
    _save_untrained(run, cfg)
    path = run / "modularize" / "modules.npz"
    with pytest.raises(FileNotFoundError) as e:
        patch.run_patch(run, cfg, progress=False, verbose=False)
    assert str(path) in str(e.value) and f"(`jaxsplit modularize --run {run}`)" in str(e.value)
    # a run an older jaxsplit modularized (masks.npz only): --resume writes the modules file
    path.parent.mkdir()
    np.savez(path.parent / "masks.npz", conv_0=np.ones((5, 4), bool))
    with pytest.raises(patch.PatchError, match="only masks.npz") as e:
        patch.run_patch(run, cfg, progress=False, verbose=False)
    assert f"`jaxsplit modularize --run {run} --resume`" in str(e.value)
    assert not (run / "patch").exists()


def test_run_patch_refuses_modules_of_another_model_or_weights(tmp_path):
    cfg = _e2e_config()
    run = tmp_path / "run"
    path = run / "modularize" / "modules.npz"
    restart = f"`jaxsplit modularize --run {run} --restart`"
    _save_untrained(run, cfg)
    _write_whole_modules(run)
    # the search did not finish: no summary.json
    (run / "modularize" / "summary.json").unlink()
    with pytest.raises(patch.PatchError, match="did not finish") as e:
        patch.run_patch(run, cfg, progress=False, verbose=False)
    assert f"`jaxsplit modularize --run {run} --resume`" in str(e.value)
    _write_whole_modules(run)
    # another model (other widths: another kernel graph)
    _save_untrained(run, cfg, width=0.5)
    with pytest.raises(patch.PatchError, match="another model") as e:
        patch.run_patch(run, cfg, progress=False, verbose=False)
    assert str(path) in str(e.value) and "graph fingerprint" in str(e.value) and restart in str(e.value)
    # the same architecture with other weights (retrained after modularize)
    _save_untrained(run, cfg, seed=0)
    patch.load_modules(run, *_strong(run))  # the weights the modules were made from: accepted
    _save_untrained(run, cfg, seed=5)
    with pytest.raises(patch.PatchError, match="other weights") as e:
        patch.run_patch(run, cfg, progress=False, verbose=False)
    assert str(path) in str(e.value) and "retrained" in str(e.value) and restart in str(e.value)
    assert not (run / "patch").exists()


def _strong(run):
    from jaxsplit import checkpoint

    loaded = checkpoint.load_model(run)
    return loaded.apply_fn, loaded.variables, loaded.model.dummy_input(1)


def _zoo_config(**patch_overrides):
    cfg = _e2e_config(**{"target_classes": [1], "poor_fit": False, "calibrations": ["min_max"],
                         "weak_epochs": 1, "decision_methods": ["min_max", "logistic"],
                         "valid_folds": 2, **patch_overrides})
    from jaxsplit import config

    return dataclasses.replace(cfg, model=config.ModelConfig(name="resnet20", width=0.25))


def _write_random_modules(run, keep_prob=0.5, **info):
    """Modules keeping each kernel with probability `keep_prob` (every site keeps one)."""
    from jaxsplit import masks as masks_lib
    from jaxsplit import modularize as modz

    whole = _write_whole_modules(run, **info)
    c = whole.num_classes
    masks = {k: np.asarray(v) for k, v in masks_lib.random(jax.random.key(3), whole.graph, keep_prob, (c,)).items()}
    modules = dataclasses.replace(whole, masks=masks)
    modules.save(run / "modularize" / "modules.npz")
    return modz.Modules.load(run / "modularize" / "modules.npz", whole.graph)


def test_tc_module_of_a_batchnorm_zoo_model_is_its_masked_tc_logit(tmp_path):
    run = tmp_path / "zoo"
    model, variables = _save_untrained(run, _zoo_config())
    _write_random_modules(run)
    apply_fn, variables, x1 = _strong(run)
    modules = patch.load_modules(run, apply_fn, variables, x1, target_classes=[3])
    assert "stage1/block0/conv1" in modules.graph.names and "batch_stats" in variables
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 1)).astype(np.float32)
    module_apply, module_vars, stats = patch.tc_module(modules, 3)
    got = patch.apply_predict(module_apply, module_vars, 4)(x)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, np.asarray(modules.apply(3)(x)), rtol=1e-4, atol=1e-4)
    assert 0 < stats["kept_fraction"] < 1 and 0 < stats["macs_fraction"] < 1
    assert stats["single_output_params"] < stats["params"] < stats["model_params"]
    # the whole-model predictor runs with the running averages, not init statistics
    whole = patch.apply_predict(lambda v, xb: apply_fn(v, xb)[:, 3], variables, 4)(x)
    np.testing.assert_allclose(whole, np.asarray(model.apply(variables, x, train=False))[:, 3], rtol=1e-5,
                               atol=1e-5)
    fresh = {**variables, "batch_stats": jax.tree_util.tree_map(
        lambda v: jnp.zeros_like(v), variables["batch_stats"])}
    assert not np.allclose(whole, np.asarray(model.apply(fresh, x, train=False))[:, 3], atol=1e-3)


def test_run_patch_on_a_batchnorm_zoo_model(tmp_path):
    from jaxsplit import report

    cfg = _zoo_config()
    run = tmp_path / "zoo"
    _save_untrained(run, cfg)
    _write_random_modules(run, method="gradient")
    res = patch.run_patch(run, cfg, progress=False, verbose=False, plots=False)
    assert res["strong_model"]["family"] == "resnet20" and res["strong_model"]["num_classes"] == 5
    assert res["modules"] == {"searcher": "gradient", "file": "modularize/modules.npz",
                              "params_sha256": res["modules"]["params_sha256"]}
    r = res["per_tc"]["1"]
    assert r["strong_class"] == 3  # data.classes [4, 3, 2, 1, 0]
    assert 0 < r["module"]["macs_fraction"] < 1
    assert r["before"]["num_examples"] == 120 and r["before"]["num_tc"] == 20
    assert set(r["module_patch"]) == set(r["whole_model_patch"]) == {"min_max"}
    assert r["decision"]["test"]
    text = report.write_report(run).read_text()
    assert "## Patching" in text and "gradient" in text


# -- valid-fitted patches, the validation gate, the summary ---------------------------------------


def _toy_split(seed, n=1200, k=4, weak_tc_recall_low=False, module_fires_on=None):
    """Labels 0..k-1 (TC = k-1); a weak model right ~90% of the time; a module score that
    separates the TC (and, with ``module_fires_on``, also fires on that non-TC class)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    logits[np.arange(n), labels] += 2.5
    if weak_tc_recall_low:  # the weak model rarely predicts its TC
        logits[:, k - 1] -= 2.5
    module = rng.normal(size=n).astype(np.float32) + 5.0 * (labels == k - 1)
    if module_fires_on is not None:
        module += 5.0 * (labels == module_fires_on)
    return patch.DecisionData(logits, module, labels)


def test_gate_reason_and_tolerance():
    before = {"tc_f1": 0.861, "non_tc_accuracy": 0.9}
    g = patch.gate(before, {"tc_f1": 0.840, "non_tc_accuracy": 0.9})
    assert not g["accepted"] and g["reason"].startswith("rejected on valid: F1 86.1 -> 84.0")
    g = patch.gate(before, {"tc_f1": 0.88, "non_tc_accuracy": 0.895})
    assert not g["accepted"] and "non-TC accuracy 90.0 -> 89.5" in g["reason"]
    assert patch.gate(before, {"tc_f1": 0.88, "non_tc_accuracy": 0.895}, non_tc_tolerance=0.01)["accepted"]
    assert not patch.gate(before, {"tc_f1": 0.865, "non_tc_accuracy": 0.9}, min_gain=0.01)["accepted"]
    with pytest.raises(patch.PatchError, match="gate objective"):
        patch.gate(before, before, objective="recall")


def test_gate_keeps_the_weak_model_when_the_patch_is_worse_on_valid():
    # the module also fires on non-TC class 0 (a class the strong model never saw): the
    # reference's min-max patch then calls class-0 images TC, F1 falls and the gate says no
    valid, test = _toy_split(0, module_fires_on=0), _toy_split(1, module_fires_on=0)
    out = patch.patch_decision(valid, test, 3, ["min_max"])
    m = out["valid"]["methods"]["min_max"]
    assert m["after"]["tc_f1"] < out["valid"]["before"]["tc_f1"]
    assert not m["gate"]["accepted"] and m["gate"]["reason"].startswith("rejected on valid: F1")
    t = out["test"]["methods"]["min_max"]
    assert t["final"] == out["test"]["before"] and t["patched"]["tc_f1"] < t["final"]["tc_f1"]
    # with the gate off the (worse) patch is applied
    off = patch.patch_decision(valid, test, 3, ["min_max"], gate_on=False)
    assert off["valid"]["methods"]["min_max"]["gate"]["accepted"]
    assert off["test"]["methods"]["min_max"]["final"] == off["test"]["methods"]["min_max"]["patched"]


def test_gate_applies_a_patch_that_is_better_on_valid():
    valid, test = _toy_split(2, weak_tc_recall_low=True), _toy_split(3, weak_tc_recall_low=True)
    # (a 1-point non-TC tolerance: the module-only rule trades 0.5 non-TC points for +55 F1 here)
    out = patch.patch_decision(valid, test, 3, ["logistic", "logistic+f1", "module+f1"], non_tc_tolerance=0.01)
    for spec in ("logistic", "logistic+f1", "module+f1"):
        v, t = out["valid"]["methods"][spec], out["test"]["methods"][spec]
        assert v["gate"]["accepted"], (spec, v["gate"]["reason"])
        assert t["final"] == t["patched"]
        assert t["final"]["tc_f1"] > out["test"]["before"]["tc_f1"] + 0.1
    # the logistic combination trusts the module (positive weight on its logit)
    assert out["valid"]["methods"]["logistic"]["state"]["weights"][0] > 0


def test_logistic_learns_to_distrust_the_module_on_classes_it_never_saw():
    valid, test = _toy_split(4, module_fires_on=0), _toy_split(5, module_fires_on=0)
    out = patch.patch_decision(valid, test, 3, ["min_max", "logistic+f1"])
    v = out["valid"]["methods"]
    assert v["logistic+f1"]["after"]["tc_f1"] > v["min_max"]["after"]["tc_f1"]
    t = out["test"]["methods"]
    assert t["logistic+f1"]["patched"]["tc_f1"] >= out["test"]["before"]["tc_f1"] - 0.02


def test_choices_never_read_the_test_split():
    valid, test = _toy_split(6, weak_tc_recall_low=True), _toy_split(7, weak_tc_recall_low=True)
    methods = ["min_max", "module+f1", "logistic", "logistic+f1"]
    ref = patch.patch_decision(valid, test, 3, methods)
    rng = np.random.default_rng(0)
    for poisoned in (np.full_like(test.labels, 3), np.zeros_like(test.labels), rng.permutation(test.labels)):
        out = patch.patch_decision(valid, test._replace(labels=poisoned), 3, methods)
        assert out["valid"] == ref["valid"]  # states, out-of-fold figures, accept/reject: all equal
    assert out["test"] != ref["test"]  # ... while the test figures do see the labels


def test_cross_fit_is_deterministic_and_out_of_fold():
    valid = _toy_split(8, weak_tc_recall_low=True)
    a = patch.cross_fit_predictions("logistic+f1", valid, 3, num_folds=4, seed=1)
    b = patch.cross_fit_predictions("logistic+f1", valid, 3, num_folds=4, seed=1)
    np.testing.assert_array_equal(a, b)
    folds = patch._fold_ids(valid.labels, 3, 4, 1)
    assert sorted(np.bincount(folds).tolist())[-1] - sorted(np.bincount(folds).tolist())[0] <= 2
    with pytest.raises(patch.PatchError, match="num_folds"):
        patch.cross_fit_predictions("logistic", valid, 3, num_folds=1)
    with pytest.raises(patch.PatchError, match="unknown patch method"):
        patch.decision_method("logistic+recall")


def test_decision_summary_counts_and_averages():
    per_tc = {}
    for tc, kw in ((0, {"weak_tc_recall_low": True}), (1, {"module_fires_on": 0})):
        d = patch.patch_decision(_toy_split(10 + tc, **kw), _toy_split(20 + tc, **kw), 3, ["min_max"])
        per_tc[str(tc)] = {"target_class": tc, "class_name": f"c{tc}", "decision": d}
    s = patch.decision_summary(per_tc, "min_max")
    assert s["num_tcs"] == 2 and [r["class_name"] for r in s["per_tc"]] == ["c0", "c1"]
    assert s["num_accepted"] == 1 and s["per_tc"][0]["accepted"] and not s["per_tc"][1]["accepted"]
    assert s["per_tc"][1]["delta_test"]["tc_f1"] == 0.0  # rejected: the weak model is kept
    assert s["num_improved_both"] + s["num_worse"] <= 2
    f1 = [r["test"]["final"]["tc_f1"] for r in s["per_tc"]]
    assert s["average"]["test"]["final"]["tc_f1"] == pytest.approx(np.mean(f1))
    text = patch.format_summary(s)
    assert "0 c0" in text and "rejected" in text and "1/2 accepted" in text


def test_run_patch_choices_ignore_poisoned_test_labels(tmp_path, monkeypatch):

    cfg = _e2e_config(poor_fit=False, calibrations=["min_max"])
    run = tmp_path / "tiny"
    _run_with_whole_modules(cfg, run)
    ref = patch.run_patch(run, cfg, progress=False, verbose=False, plots=False)
    assert set(ref["summary"]) >= {"method", "per_tc", "average", "num_improved_both", "num_worse"}
    assert ref["summary"]["method"] == cfg.patch.method
    assert set(ref["summary_by_method"]) == {cfg.patch.method, *cfg.patch.decision_methods}
    assert "gate" in patch.format_table(ref)

    original = patch.make_self_task

    def poisoned_task(*args, **kwargs):
        task = original(*args, **kwargs)
        bad = dataclasses.replace(task.test, labels=np.full_like(task.test.labels, task.tc_index))
        return dataclasses.replace(task, test=bad)

    monkeypatch.setattr(patch, "make_self_task", poisoned_task)
    out = patch.run_patch(run, cfg, progress=False, verbose=False, plots=False)
    for tc in ref["per_tc"]:
        assert out["per_tc"][tc]["weak"]["reused"]
        assert out["per_tc"][tc]["decision"]["valid"] == ref["per_tc"][tc]["decision"]["valid"]
        assert out["per_tc"][tc]["decision"]["test"] != ref["per_tc"][tc]["decision"]["test"]
    assert [r["accepted"] for r in out["summary"]["per_tc"]] == [r["accepted"] for r in ref["summary"]["per_tc"]]
