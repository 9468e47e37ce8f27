"""`jaxsplit modularize` / `report` / `evaluate` on a BatchNorm zoo run (ResNet-20), through the
generic (traced graph) path: the run-folder driver takes any model `load_model` rebuilds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxsplit import checkpoint as ckpt
from jaxsplit import cli, extract
from jaxsplit import modularize as modz
from jaxsplit.graph import trace

REPO = Path(__file__).resolve().parents[1]

TINY_RESNET = {
    "name": "tiny_resnet",
    "data": {"source": "synthetic", "name": "synthetic", "classes": [0, 1, 2, 3], "train_limit": 160},
    "model": {"name": "resnet20", "width": 0.25},
    "train": {"optimizer": "adam", "learning_rate": 0.003, "weight_decay": 0.0,
              "schedule": "constant", "epochs": 1, "batch_size": 32, "eval_batch_size": 100},
    "search": {"population_size": 4, "num_generations": 2, "num_valid": 32, "checkpoint_every": 1,
               "backend": "auto", "min_kept_ensembles": 5, "max_kept_ensembles": 20, "seed": 3},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny ResNet-20 trained in process (copy it before modularizing)."""
    root = tmp_path_factory.mktemp("zoo")
    config = root / "tiny_resnet.yaml"
    config.write_text(yaml.safe_dump(TINY_RESNET))
    run = root / "trained"
    assert cli.main(["train", "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.fixture(scope="module")
def searched(trained) -> Path:
    """The tiny ResNet-20 modularized (GA) through the CLI, in process (tests/test_cli_safety.py
    runs `jaxsplit modularize` in subprocesses)."""
    run = trained.with_name("run")
    shutil.copytree(trained, run)
    assert cli.main(["modularize", "--run", str(run), "--no-progress"]) == 0
    return run


def test_resnet_run_modularizes_through_the_traced_graph(searched):
    out = searched / "modularize"
    for name in ("importance.npz", "masks.npz", "modules.npz", "history.json", "summary.json",
                 "curves.png"):
        assert (out / name).is_file(), name
    loaded = ckpt.load_model(searched)
    graph = trace(loaded.apply_fn, loaded.variables, np.zeros((1, 32, 32, 1), np.float32))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generations_run"] == TINY_RESNET["search"]["num_generations"] + 1
    assert summary["model"]["family"] == "resnet20"
    # no reference settings for the zoo: no sensitive layer unless the config names some
    assert summary["sensitive_layers"] == []
    # the source model is the run's checkpoint, digest as `jaxsplit patch` checks it
    assert summary["source_model"]["params_sha256"] == ckpt.params_digest(loaded.params)
    with np.load(out / "masks.npz") as z:
        masks = {k: z[k] for k in z.files}
    assert set(masks) == set(graph.names)  # site names of the ResNet, not conv_i
    assert "stage1/block0/conv1" in masks
    for name, m in masks.items():
        assert m.shape == (4, graph.num_kernels[name]) and m.dtype == np.bool_
        assert m.any(axis=1).all(), name  # every module keeps a kernel in every site
    for p in summary["per_class"]:
        mask = {k: v[p["class"]] for k, v in masks.items()}
        expected = extract.module_stats(graph, mask)
        assert p["kept_kernels"] == expected["kept_kernels"]
        assert p["macs_fraction"] == pytest.approx(expected["macs_fraction"])
        assert 0 < p["macs_fraction"] <= 1 and 0 < p["params_fraction"] <= 1
        assert set(p["kept_per_layer"]) == set(graph.names)
    assert 0.0 <= summary["ensemble_test_accuracy"] <= 1.0
    # the modules file loads for this model and reproduces the masks
    modules = modz.Modules.load(out / "modules.npz", graph, apply_fn=loaded.apply_fn,
                                variables=loaded.variables)
    for name in graph.names:
        np.testing.assert_array_equal(modules.masks[name], masks[name])


def test_resnet_report_and_evaluate(searched, capsys):
    assert cli.main(["report", "--run", str(searched)]) == 0
    text = (searched / "report.md").read_text()
    assert "## Modularization" in text and "### Modules" in text
    assert "modularize/curves.png" in text
    # the per-site table names the ResNet's sites by their parameter paths
    assert "#### Kernels kept per site" in text
    assert "| search (modularize/config.yaml) | strategy=kernel_ga, population_size=4," in text
    assert "| stage1/block0/conv1 | 4 |" in text and "| stage3/block0/shortcut_conv | 16 |" in text
    for ref in [line.split("(", 1)[1].rstrip(")\n") for line in text.splitlines()
                if line.startswith("![")]:
        assert (searched / ref).is_file(), ref
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(searched), "--split", "valid"]) == 0
    assert "valid accuracy:" in capsys.readouterr().out


def test_estimates_count_the_macs_of_any_model():
    import jax

    from jaxsplit import config as jconfig
    from jaxsplit import pipeline
    from jaxsplit.models import inference_apply, init_variables, resnet20, weak_cnn

    net = resnet20(num_classes=10, in_channels=1, width=0.5, image_size=32)
    variables = init_variables(net, jax.random.key(0))
    graph = trace(inference_apply(net), variables, np.zeros((1, 32, 32, 1), np.float32))
    # ResNet-20 at width 0.5 on 32x32: 10.17 M MACs (convs + head), from weights or shapes alike
    assert pipeline.model_macs(graph) == pipeline.model_macs(net) == 10_166_592
    cnn = weak_cnn(num_classes=4, in_channels=1, width=0.25, image_size=32)
    cnn_vars = init_variables(cnn, jax.random.key(0))
    cnn_graph = trace(inference_apply(cnn), cnn_vars, np.zeros((1, 32, 32, 1), np.float32))
    assert pipeline.model_macs(cnn_graph) == pipeline.model_macs(cnn)  # the ConvNet count
    line = pipeline.search_estimate(graph, 10, 100, 10_000, 201, backend="reference", cores=2)
    assert "10.2 M MACs/image" in line and "'reference'" in line
    cfg = jconfig.load(REPO / "configs" / "fashion_mnist_resnet20_cpu.yaml")
    assert "10.2 M MACs/image" in pipeline.train_estimate(cfg, cores=2, threshold_s=0)
    with pytest.raises(TypeError, match="got int"):
        pipeline.model_macs(3)


@pytest.mark.slow  # ~25-45 s on 2 cores: compiling the masks' gradient through ResNet-20
def test_gradient_search_on_a_resnet_writes_modules_with_heads(trained, tmp_path):
    """The gradient searcher's run-folder driver on a BatchNorm zoo model (the traced graph)."""
    from jaxsplit import config as jconfig
    from jaxsplit import pipeline
    from jaxsplit.data.dataset import take
    from jaxsplit.search import driver as D

    run = tmp_path / "grad"
    shutil.copytree(trained, run)
    loaded = ckpt.load_model(run)
    cfg = jconfig.from_dict(jconfig.Config, {
        **jconfig.to_dict(loaded.cfg), "search": {
            "method": "gradient", "num_valid": 16, "checkpoint_every": 1, "seed": 0,
            "gradient": {"head_epochs": 0, "modular_epochs": 1, "cycle_mask_epochs": 1,
                         "cycle_head_epochs": 0, "batch_size": 16, "eval_batch_size": 64,
                         "num_train": 16}}})
    train, valid, test = (take(ds, 16) for ds in pipeline.prepare_data(cfg.data))
    summary = D.run_modularize(run, cfg, progress=False, data=(train, valid, test))
    assert summary["method"] == "gradient" and summary["epochs_run"] == 1
    assert summary["gradient"]["cycle_head_epochs"] == 0
    graph = trace(loaded.apply_fn, loaded.variables, np.zeros((1, 32, 32, 1), np.float32))
    modules = modz.Modules.load(run / "modularize" / "modules.npz", graph, apply_fn=loaded.apply_fn,
                                variables=loaded.variables)
    assert modules.method == "gradient" and set(modules.masks) == set(graph.names)
    assert modules.heads["dense_1"]["kernel"].shape == (4, 10, 1)
    x = np.asarray(test.images[:8], np.float32)
    for c in (0, 3):
        module_apply, module_vars = modules.extract(c)
        np.testing.assert_allclose(np.asarray(module_apply(module_vars, x)),
                                   np.asarray(modules.apply(c)(x)), rtol=1e-5, atol=1e-5)
    assert cli.main(["report", "--run", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "found by the gradient searcher (`search.method=gradient`" in text
    assert "| search (modularize/config.yaml) | method=gradient, seed=0, gradient.alpha=0.1," in text
