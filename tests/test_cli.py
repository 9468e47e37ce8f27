"""The `jaxsplit` command line (called through `main([...])`) and the presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jaxsplit import cli, presets
from jaxsplit import config as jconfig

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "data": {"source": "synthetic", "name": "synthetic"},  # 1000 train / 200 test, 32x32x1
    "model": {"name": "weak_cnn", "width": 0.25},
    "train": {"optimizer": "adam", "learning_rate": 0.003, "weight_decay": 0.0,
              "schedule": "constant", "epochs": 1, "batch_size": 50, "eval_batch_size": 100},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli.main(["train", "--config", str(tiny_config), "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_writes_the_run_folder(trained_run):
    assert (trained_run / "checkpoint").is_dir()
    cfg = jconfig.load(trained_run / "config.yaml")
    assert cfg.model.name == "weak_cnn" and cfg.train.epochs == 1
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test_accuracy", "valid_accuracy", "best_epoch", "train_time_s", "history",
                "num_params", "machine"):
        assert key in metrics
    assert len(metrics["history"]) == 1
    assert metrics["test_accuracy"] > 0.2  # 10 separable classes, chance 0.1


def test_train_refuses_to_overwrite(trained_run, tiny_config, capsys):
    rc = cli.main(["train", "--config", str(tiny_config), "--out", str(trained_run), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1


def test_evaluate_prints_the_accuracy(trained_run, capsys):
    assert cli.main(["evaluate", "--run", str(trained_run)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert f"test accuracy: {metrics['test_accuracy']:.4f} (200 images" in out
    assert cli.main(["evaluate", "--run", str(trained_run), "--split", "valid"]) == 0
    assert f"valid accuracy: {metrics['valid_accuracy']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("override, needle", [
    ("train.epochz=3", "train.epochz"),
    ("train.epochs=three", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("model.width", "key=value"),
])
def test_bad_set_exits_2_naming_the_key(tmp_path, tiny_config, capsys, override, needle):
    rc = cli.main(["train", "--config", str(tiny_config), "--set", override,
                   "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_exception(tiny_config, tmp_path):
    with pytest.raises(jconfig.ConfigError, match="train.epochz"):
        cli.main(["train", "--debug", "--config", str(tiny_config), "--set", "train.epochz=1",
                  "--out", str(tmp_path / "run")])


def test_missing_config_and_run(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    for cmd in ("modularize", "patch", "evaluate"):
        assert cli.main([cmd, "--run", str(tmp_path / "no_run")]) == 2
        err = capsys.readouterr().err
        assert "no_run" in err and "jaxsplit train" in err


def test_config_precedence(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"name": "from_run", "train": {"epochs": 5, "batch_size": 32}, "search": {"population_size": 10}}))
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"train": {"epochs": 7}, "search": {"population_size": 20}}))
    cfg = cli.resolve_config(run_dir=run, config_path=extra, sets=["search.population_size=30"],
                             data_dir=tmp_path)
    assert cfg.name == "from_run"
    assert cfg.train.batch_size == 32  # run's config.yaml over the defaults
    assert cfg.train.epochs == 7  # --config over the run's
    assert cfg.search.population_size == 30  # --set over --config
    assert cfg.train.learning_rate == jconfig.TrainConfig().learning_rate  # defaults below all
    assert cfg.data.data_dir == str(tmp_path)


def test_modularize_rejects_a_different_model(trained_run, capsys):
    rc = cli.main(["modularize", "--run", str(trained_run), "--set", "model.width=0.5"])
    assert rc == 2
    assert "model" in capsys.readouterr().err


def test_stage_handlers_call_the_stage_functions(trained_run, monkeypatch, capsys):
    from jaxsplit import patch, report
    from jaxsplit.search import driver

    calls = []

    def fake(stage):
        def fn(*args, **kwargs):
            calls.append((stage, args, kwargs))
            return {"stage": stage} if stage != "report" else trained_run / "report.md"
        return fn

    monkeypatch.setattr(driver, "run_modularize", fake("modularize"))
    monkeypatch.setattr(patch, "run_patch", fake("patch"))
    monkeypatch.setattr(report, "write_report", fake("report"))
    assert cli.main(["modularize", "--run", str(trained_run), "--set", "search.population_size=12",
                     "--resume"]) == 0
    stage, (run_dir, cfg), kwargs = calls[-1]
    assert stage == "modularize" and run_dir == trained_run
    assert kwargs == {"resume": True, "restart": False, "progress": True}
    assert cfg.search.population_size == 12 and cfg.model.name == "weak_cnn"
    assert cli.main(["patch", "--run", str(trained_run), "--no-progress"]) == 0
    assert calls[-1][0] == "patch" and calls[-1][2] == {"progress": False}
    assert cli.main(["report", "--run", str(trained_run)]) == 0
    assert "report.md" in capsys.readouterr().out


def test_demo_runs_stages_and_skips_finished_ones(tmp_path, monkeypatch, capsys):
    """The demo on a tiny override of the preset, with fake later stages."""
    from jaxsplit import patch, report
    from jaxsplit.search import driver

    out = tmp_path / "demo"
    calls = []

    def fake(stage):
        def fn(run_dir, *args, **kwargs):
            calls.append(stage)
            target = run_dir / cli.STAGE_OUTPUTS[stage]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}")
            return target if stage == "report" else {"ok": 1}
        return fn

    monkeypatch.setattr(driver, "run_modularize", fake("modularize"))
    monkeypatch.setattr(patch, "run_patch", fake("patch"))
    monkeypatch.setattr(report, "write_report", fake("report"))
    tiny_sets = [f"data.{k}={v}" for k, v in TINY["data"].items()]
    tiny_sets += [f"model.{k}={v}" for k, v in TINY["model"].items()]
    tiny_sets += [f"train.{k}={v}" for k, v in TINY["train"].items()]
    argv = ["demo", "--out", str(out), "--no-progress"] + [a for s in tiny_sets for a in ("--set", s)]
    assert cli.main(argv) == 0
    assert calls == ["modularize", "patch", "report"]
    assert (out / "checkpoint").is_dir() and (out / "metrics.json").is_file()
    assert cli.main(argv) == 0  # everything exists now: nothing runs again
    assert calls == ["modularize", "patch", "report"]
    assert capsys.readouterr().out.count("skipped") == 4
    # a result file left empty (a full disk) is not "done": that stage runs again
    (out / cli.STAGE_OUTPUTS["patch"]).write_text("")
    assert cli.main(argv) == 0
    assert calls == ["modularize", "patch", "report", "patch"]
    assert "unreadable" in capsys.readouterr().out


def test_bench_runs_the_benchmark_main(tmp_path, monkeypatch):
    script = tmp_path / "bench_evaluator.py"
    record = tmp_path / "args.json"
    script.write_text(
        "import json, sys\n"
        f"def main(argv):\n    open({str(record)!r}, 'w').write(json.dumps(argv))\n    return 0\n")
    monkeypatch.setattr(cli, "_find_bench_script", lambda: script)
    assert cli.main(["bench", "--sizes", "3", "4"]) == 0
    assert json.loads(record.read_text()) == ["--sizes", "3", "4"]
    monkeypatch.setattr(cli, "_find_bench_script", lambda: None)
    assert cli.main(["bench"]) == 2


# -- presets --------------------------------------------------------------------------------------


def test_embedded_demo_preset_equals_the_yaml_file():
    on_disk = yaml.safe_load((REPO / "configs" / "fashion_mnist_cpu.yaml").read_text())
    assert presets.DEMO == on_disk
    assert jconfig.from_dict(jconfig.Config, presets.DEMO) == jconfig.load(REPO / "configs" / "fashion_mnist_cpu.yaml")


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {
        "simcnn_cifar10.yaml", "rescnn_cifar10.yaml", "simcnn_svhn.yaml", "rescnn_svhn.yaml",
        "simcnn_fashion_mnist.yaml", "fashion_mnist_cpu.yaml"}
    for path in paths:
        cfg = jconfig.load(path)
        assert cfg.name == yaml.safe_load(path.read_text())["name"]
