"""The first hour and the bad day: the `jaxsplit` command line in subprocesses on tiny data.

Each test runs `python -m jaxsplit.cli ...` (or `cli.main`) on a synthetic 4-class task with a
tiny CNN and a tiny search, so every call takes seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import jaxsplit
from jaxsplit import checkpoint as ckpt
from jaxsplit import cli, patch, pipeline, presets
from jaxsplit import config as jconfig
from jaxsplit import io as jio
from jaxsplit.errors import JaxsplitError
from jaxsplit.search import driver as D

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "data": {"source": "synthetic", "name": "synthetic", "classes": [0, 1, 2, 3], "train_limit": 200},
    "model": {"name": "weak_cnn", "width": 0.25},
    "train": {"optimizer": "adam", "learning_rate": 0.003, "weight_decay": 0.0,
              "schedule": "constant", "epochs": 1, "batch_size": 20, "eval_batch_size": 100},
    "search": {"population_size": 4, "num_generations": 2, "num_valid": 32, "checkpoint_every": 1,
               "backend": "reference", "min_kept_ensembles": 5, "max_kept_ensembles": 20, "seed": 3},
}


def jaxsplit_cli(*args: str, check_rc: int | None = None, timeout: float = 240,
                 **kwargs) -> subprocess.CompletedProcess:
    """`python -m jaxsplit.cli ARGS` with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k != jconfig_env()}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONHASHSEED"] = "0"
    res = subprocess.run([sys.executable, "-m", "jaxsplit.cli", *args], capture_output=True,
                         text=True, env=env, timeout=timeout, **kwargs)
    if check_rc is not None:
        assert res.returncode == check_rc, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    return res


def jconfig_env() -> str:
    from jaxsplit.data import DATA_DIR_ENV

    return DATA_DIR_ENV


def assert_one_error(res: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    err = res.stderr
    assert "Traceback" not in err, err
    assert err.startswith(f"jaxsplit {command}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli.main(["train", "--config", str(tiny_config), "--out", str(out), "--no-progress"]) == 0
    return out


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(jio.LOCK_NAME))
    return dest


@pytest.fixture(scope="module")
def searched(trained, tmp_path_factory) -> Path:
    """A finished tiny search (through the CLI, in a subprocess), with a --set override."""
    run = copy_run(trained, tmp_path_factory.mktemp("searched") / "run")
    jaxsplit_cli("modularize", "--run", str(run), "--no-progress",
                 "--set", "search.num_generations=3", check_rc=0)
    return run


# -- 2b. multi-line messages ---------------------------------------------------------------------


def test_multi_line_error_messages_keep_their_lines(tmp_path, tiny_config):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = jaxsplit_cli("train", "--config", str(tiny_config), "--out", str(tmp_path / "run"),
                       "--set", "data.source=idx", "--set", "data.name=mnist", "--set",
                       "data.classes=null", "--data-dir", str(empty), "--no-progress")
    err = assert_one_error(res, "train", "not found")
    lines = err.splitlines()
    assert len(lines) > 3  # the places looked at and the ways to get the data, one per line
    assert any(line.strip() == str(empty) for line in lines), err
    assert any(line.lstrip().startswith("(3)") for line in lines), err
    assert not (tmp_path / "run").exists()  # nothing left behind by a refused stage


# -- 4. data dir and provenance ------------------------------------------------------------------


def write_idx(directory: Path, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10, dtype=np.uint8), n // 10 + 1)[:n]
    images = (rng.random((n, 28, 28)) * 60).astype(np.uint8) + labels[:, None, None] * 19
    prefix = {"train": "train", "test": "t10k"}[split]
    header = lambda magic, dims: magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(header(0x803, images.shape) + images.tobytes()))
    (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(header(0x801, labels.shape) + labels.tobytes()))


def test_missing_data_dir_is_an_error_and_metrics_record_the_data(tmp_path, tiny_config):
    res = jaxsplit_cli("train", "--config", str(tiny_config), "--out", str(tmp_path / "run"),
                       "--data-dir", str(tmp_path / "no_such_dir"), "--no-progress")
    assert_one_error(res, "train", "no_such_dir", "does not exist")
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    write_idx(data_dir, "train", 100, 0)
    write_idx(data_dir, "test", 30, 1)
    run = tmp_path / "idx_run"
    jaxsplit_cli("train", "--config", str(tiny_config), "--out", str(run), "--no-progress",
                 "--set", "data.source=idx", "--set", "data.name=mnist", "--set", "data.classes=null",
                 "--set", "data.train_limit=null", "--data-dir", str(data_dir), check_rc=0)
    record = json.loads((run / "metrics.json").read_text())["data"]
    assert record["source"] == "idx" and record["name"] == "mnist"
    files = {Path(f["path"]).name: f for s in record["splits"].values() for f in s["files"]}
    assert sorted(files) == sorted(p.name for p in data_dir.iterdir())
    for p in data_dir.iterdir():
        assert files[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert Path(files[p.name]["path"]) == p.resolve()


# -- 5. train without --config; estimates --------------------------------------------------------


def test_train_without_config_uses_the_cpu_preset(tmp_path):
    res = jaxsplit_cli("train", "--out", str(tmp_path / "run"), "--data-dir",
                       str(tmp_path / "nowhere"), "--no-progress")
    assert "no --config: using the CPU preset (configs/fashion_mnist_cpu.yaml" in res.stdout
    assert "estimate:" not in res.stdout  # the preset is minutes, not hours
    assert_one_error(res, "train", "nowhere")
    help_text = jaxsplit_cli("train", "--help", check_rc=0).stdout
    assert "default: the CPU preset" in " ".join(help_text.split())


def test_long_stages_print_an_estimate_first(tmp_path):
    full = jconfig.load(REPO / "configs" / "simcnn_fashion_mnist.yaml")
    line = pipeline.train_estimate(full, cores=2)
    assert line is not None and "per epoch" in line and " h " in line  # hours on 2 cores
    assert pipeline.train_estimate(jconfig.from_dict(jconfig.Config, presets.DEMO), cores=2) is None
    res = jaxsplit_cli("train", "--config", str(REPO / "configs" / "simcnn_fashion_mnist.yaml"),
                       "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nowhere"))
    out_lines = res.stdout.splitlines()
    assert out_lines and out_lines[0].startswith("estimate: training takes about"), res.stdout
    assert_one_error(res, "train", "nowhere")  # printed before any work started
    model = pipeline.build_model(full.model, 10, 1, 32)
    assert "estimate: the search" in pipeline.search_estimate(model, 10, 100, 10_000, 201, cores=2)
    assert pipeline.search_estimate(model, 10, 4, 32, 3, cores=2) is None
    self_patch = jconfig.load(REPO / "configs" / "fashion_mnist_self_patch.yaml")
    heavy = jconfig.from_dict(jconfig.Config, jconfig.merge(jconfig.to_dict(self_patch), {
        "patch": {"weak_width": 1.0, "weak_model": "simcnn", "weak_epochs": 30}}))
    assert "estimate: patching takes more than" in pipeline.patch_estimate(heavy, cores=2)
    assert pipeline.patch_estimate(self_patch, cores=2) is None


# -- 6. --no-progress, examples, saved overrides, Ctrl-C, --restart, CLI words -----------------


@pytest.mark.parametrize("command", ["train", "modularize", "patch", "report", "evaluate", "bench", "demo"])
def test_every_subcommand_has_no_progress_and_its_own_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--no-progress" in text
    assert "examples:" in text and f"jaxsplit {command}" in text.split("examples:")[1]


def test_modularize_saves_its_overrides_and_speaks_cli(searched, capsys):
    out = searched / D.MODULARIZE_DIRNAME
    saved = jconfig.load(out / D.CONFIG_FILE)
    assert saved.search.num_generations == 3 and saved.search.population_size == 4
    # a second plain run: refused in CLI words
    res = jaxsplit_cli("modularize", "--run", str(searched), "--no-progress")
    err = assert_one_error(res, "modularize", "--resume", "--restart")
    assert "resume=True" not in err
    # --resume needs no retyping of --set: the saved settings match the finished checkpoint
    assert cli.main(["modularize", "--run", str(searched), "--resume", "--no-progress"]) == 0
    assert "resuming with the settings saved in" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert len(history["generations"]) == 4  # 3 generations + the initial population


def test_restart_moves_old_results_aside(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    old_masks = (run / "modularize" / "masks.npz").read_bytes()
    res = jaxsplit_cli("modularize", "--run", str(run), "--restart", "--no-progress", check_rc=0)
    moved = sorted(run.glob("modularize.old-*"))
    assert len(moved) == 1 and f"moved the previous search to {moved[0]}" in res.stdout
    assert (moved[0] / "masks.npz").read_bytes() == old_masks  # never deleted
    assert (run / "modularize" / "summary.json").is_file()
    assert jconfig.load(run / "modularize" / D.CONFIG_FILE).search.num_generations == 2
    res = jaxsplit_cli("modularize", "--run", str(run), "--resume", "--restart")
    assert res.returncode == 2 and "not allowed with argument" in res.stderr


def test_ctrl_c_says_how_to_resume(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxsplit.cli", "modularize", "--run", str(run),
                             "--no-progress", "--set", "search.num_generations=100000",
                             "--set", "search.early_stop=0"],  # runs until interrupted
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell running the suite in the background starts it with SIGINT
                            # ignored, which the child would inherit: give it the default back
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt_root = run / D.MODULARIZE_DIRNAME / D.CKPT_DIRNAME
    deadline = time.time() + 120
    while not D.list_checkpoints(ckpt_root) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert f"jaxsplit modularize --run {run} --resume" in err
    assert not (run / jio.LOCK_NAME).read_text()  # the lock was released


@pytest.mark.slow  # the CLI's wording only: weak-model reuse and per-TC results are covered in the
# default suite by tests/test_patch.py::test_run_patch_end_to_end_on_synthetic
def test_patch_names_the_target_class_and_says_when_it_reuses_a_weak_model(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    sets = ["patch.strong_classes=[0,1,2,3]", "patch.weak_classes=[4,5,6,7]",
            "patch.target_classes=[1]", "patch.tc_train_images=10", "patch.weak_width=0.25",
            "patch.weak_epochs=1", "patch.calibrations=[min_max]", "patch.poor_fit=false"]
    args = ["patch", "--run", str(run), "--no-progress"] + [a for s in sets for a in ("--set", s)]
    first = jaxsplit_cli(*args, check_rc=0).stdout
    assert "[patch 1/1] target class 1 (class_1)" in first and "trained the weak model" in first
    results = json.loads((run / "patch" / "patch_results.json").read_text())
    assert results["target_classes"] == [1]
    again = jaxsplit_cli(*args, check_rc=0).stdout
    assert "reused the cached weak model" in again and "evaluating the patches of target class 1" in again


def test_bench_runs_the_package_benchmark_not_one_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_evaluator.py").write_text("def main(argv):\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    found = cli._find_bench_script()
    assert found == Path(jaxsplit.__file__).resolve().parent.parent / "benchmarks" / "bench_evaluator.py"
    assert found.is_file()


# -- 7. own errors are messages, bugs are tracebacks --------------------------------------------


def test_project_errors_derive_from_jaxsplit_error():
    seen = 0
    for info in pkgutil.walk_packages(jaxsplit.__path__, "jaxsplit."):
        if info.name.startswith("jaxsplit.interop"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == info.name
                    and name.endswith("Error")):
                assert issubclass(obj, JaxsplitError), f"{info.name}.{name}"
                seen += 1
    assert seen >= 20


def test_user_input_failures_are_one_message(tmp_path, tiny_config, searched):
    res = jaxsplit_cli("train", "--config", str(tiny_config), "--set", "x=[1",
                       "--out", str(tmp_path / "r"))
    assert_one_error(res, "train", "--set 'x=[1'", "not valid YAML")
    # a .npz dataset with float64 labels
    bad = tmp_path / "bad_{split}.npz"
    for split in ("train", "test"):
        np.savez(str(bad).format(split=split), images=np.zeros((20, 8, 8, 1), np.float32),
                 labels=np.zeros(20, np.float64))
    res = jaxsplit_cli("train", "--config", str(tiny_config), "--out", str(tmp_path / "r"),
                       "--set", "data.source=npz", "--set", f"data.name={bad}",
                       "--set", "data.classes=null")
    assert_one_error(res, "train", "bad_train.npz", "integer dtype")
    # a truncated modules file
    run = copy_run(searched, tmp_path / "run")
    modules = run / "modularize" / "modules.npz"
    modules.write_bytes(modules.read_bytes()[:100])
    res = jaxsplit_cli("patch", "--run", str(run), "--no-progress")
    assert_one_error(res, "patch", str(modules), "cannot read modules file",
                     f"jaxsplit modularize --run {run} --restart")


def test_an_internal_bug_shows_its_traceback(trained, monkeypatch):
    from jaxsplit import report

    def buggy(run_dir):
        raise ValueError("an internal bug")

    monkeypatch.setattr(report, "write_report", buggy)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["report", "--run", str(trained)])


# -- 8. module validation ------------------------------------------------------------------------


def _edit_modules(path: Path, edit) -> None:
    """Edits the mask arrays of a modules file in place (its header kept as written)."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    edit(arrays)
    np.savez(path, **arrays)


def _strong(run: Path):
    loaded = ckpt.load_model(run)
    return loaded.apply_fn, loaded.variables, loaded.model.dummy_input(1)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update({"mask/conv_0": m["mask/conv_0"][:, :-1]}), "has shape"),
    (lambda m: m.pop("mask/conv_1"), "conv_1"),
    (lambda m: m["mask/conv_1"].__setitem__((2, slice(None)), False),
     "the module of class 2 keeps no kernel at site 'conv_1'"),
])
def test_hand_edited_modules_are_refused(searched, tmp_path, edit, needle):
    run = copy_run(searched, tmp_path / "run")
    path = run / "modularize" / "modules.npz"
    _edit_modules(path, edit)
    with pytest.raises(patch.PatchError, match="modules.npz") as e:
        patch.load_modules(run, *_strong(run), target_classes=[2])
    assert needle in str(e.value) and f"jaxsplit modularize --run {run} --restart" in str(e.value)


def test_patch_refuses_a_module_with_an_empty_site_before_training(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    _edit_modules(run / "modularize" / "modules.npz",
                  lambda m: m["mask/conv_0"].__setitem__((1, slice(None)), False))
    sets = ["patch.strong_classes=[0,1,2,3]", "patch.weak_classes=[4,5,6,7]", "patch.target_classes=[1]"]
    res = jaxsplit_cli("patch", "--run", str(run), "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert_one_error(res, "patch", "modules.npz", "class 1 keeps no kernel at site 'conv_0'")
    assert not (run / "patch" / "weak_tc1").exists()


def test_modules_of_other_classes_may_keep_no_kernel(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    _edit_modules(run / "modularize" / "modules.npz",
                  lambda m: m["mask/conv_0"].__setitem__((3, slice(None)), False))
    modules = patch.load_modules(run, *_strong(run), target_classes=[0, 1])
    assert modules.classes.tolist() == [0, 1, 2, 3] and not modules.mask(3)["conv_0"].any()


# -- 9. modules of a retrained model --------------------------------------------------------------


def test_patch_refuses_modules_of_a_retrained_model(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    summary = json.loads((run / "modularize" / "summary.json").read_text())
    model, params, _, _ = ckpt.load_model(run)
    assert summary["source_model"]["params_sha256"] == ckpt.params_digest(params)
    assert summary["source_model"]["class_ids"] == [0, 1, 2, 3]
    assert cli.main(["train", "--config", str(run / "config.yaml"), "--out", str(run),
                     "--overwrite", "--no-progress", "--set", "train.seed=5"]) == 0
    res = jaxsplit_cli("patch", "--run", str(run), "--no-progress")
    assert_one_error(res, "patch", "retrained", "--restart")


# -- 10. --resume without a checkpoint but with results ----------------------------------------


def test_resume_without_checkpoint_but_with_results_is_refused(searched, tmp_path, capsys):
    run = copy_run(searched, tmp_path / "run")
    shutil.rmtree(run / "modularize" / D.CKPT_DIRNAME)
    before = (run / "modularize" / "masks.npz").read_bytes()
    assert cli.main(["modularize", "--run", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no search checkpoint" in err and f"jaxsplit modularize --run {run} --restart" in err
    assert (run / "modularize" / "masks.npz").read_bytes() == before


# -- 11. atomic writes, stale temporaries -------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "patch_results.json"
    jio.atomic_write_json(path, {"ok": 1})

    def full_disk(f):
        f.write(b'{"half": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        jio.atomic_write_with(path, full_disk)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch_results.json"]
    assert "atomic_write_json" in inspect.getsource(patch.run_patch)


def test_stale_temporaries_are_removed_when_a_stage_takes_the_run(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    stale = [run / "modularize" / ".masks.npz.tmp-12345-abcd", run / ".checkpoint.new-1a2b3c4d",
             run / "modularize" / D.CKPT_DIRNAME / ".gen_00009.new-1a2b3c4d"]
    stale[0].write_bytes(b"half")
    for d in stale[1:]:
        (d / "tree").mkdir(parents=True)
    assert cli.main(["modularize", "--run", str(run), "--resume", "--no-progress"]) == 0
    assert not any(p.exists() for p in stale)
    assert (run / "checkpoint").is_dir() and ckpt.load_model(run)


def test_resume_rewrites_a_result_file_left_empty(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    summary = run / "modularize" / "summary.json"
    want = json.loads(summary.read_text())
    summary.write_text("")
    assert cli.main(["modularize", "--run", str(run), "--resume", "--no-progress"]) == 0
    got = json.loads(summary.read_text())
    assert got["per_class"] == want["per_class"]


# -- 12. run-folder lock --------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(searched, tmp_path):
    run = copy_run(searched, tmp_path / "run")
    with jio.run_lock(run, "test holder"):
        res = jaxsplit_cli("modularize", "--run", str(run), "--resume", "--no-progress")
        assert_one_error(res, "modularize", f"pid {os.getpid()}", "test holder", "in use")
        res = jaxsplit_cli("patch", "--run", str(run), "--no-progress")
        assert_one_error(res, "patch", f"pid {os.getpid()}")
    # released: the lock file stays, empty
    assert (run / jio.LOCK_NAME).read_text() == ""


# -- 13. checkpoint metadata digest --------------------------------------------------------------


def test_edited_checkpoint_metadata_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    meta_files = [p for p in (run / "checkpoint" / "meta").rglob("*") if p.is_file()
                  and b"normalization" in p.read_bytes()]
    assert len(meta_files) == 1
    record = json.loads(meta_files[0].read_text())
    record["metadata"]["config"]["data"]["split_seed"] = 7
    meta_files[0].write_text(json.dumps(record))
    res = jaxsplit_cli("evaluate", "--run", str(run), "--no-progress")
    assert_one_error(res, "evaluate", "metadata", "does not match the digest")


# -- 14. NaN / Inf images ----------------------------------------------------------------------


def test_nan_images_are_refused_naming_split_and_index(tmp_path, tiny_config):
    data = pipeline.jdata.synthetic(0, num_classes=4, num_per_class=10, size=8)
    for split, bad in (("train", None), ("test", 3)):
        images = data.images.copy()
        if bad is not None:
            images[bad, 2, 2, 0] = np.nan
        np.savez(tmp_path / f"d_{split}.npz", images=images, labels=data.labels)
    res = jaxsplit_cli("train", "--config", str(tiny_config), "--out", str(tmp_path / "r"),
                       "--set", "data.source=npz", "--set", f"data.name={tmp_path}/d_{{split}}.npz",
                       "--set", "data.classes=null", "--set", "data.image_size=8")
    assert_one_error(res, "train", "test split", "index 3", "NaN or Inf", "d_test.npz")
    images = data.images.copy()
    images[5, 0, 0, 0] = np.inf
    ds = pipeline.jdata.Dataset(images, data.labels, 4)
    with pytest.raises(pipeline.jdata.DataError, match="train split .* index 5"):
        pipeline.check_finite(ds, "train")


# -- 15. sizes beyond the machine or the data ---------------------------------------------------


def test_sizes_beyond_the_data_or_the_machine_are_refused(searched, tmp_path, capsys):
    run = copy_run(searched, tmp_path / "run")
    assert cli.main(["modularize", "--run", str(run), "--restart", "--no-progress",
                     "--set", "search.num_valid=100000"]) == 2
    err = capsys.readouterr().err
    assert "search.num_valid=100,000" in err and "valid split has only" in err
    assert not list(run.glob("modularize.old-*"))  # a refused --restart moves nothing
    assert cli.main(["modularize", "--run", str(run), "--restart", "--no-progress",
                     "--set", "search.population_size=10000000"]) == 2
    assert "search.population_size" in capsys.readouterr().err
    with pytest.raises(D.SearchError, match="GiB"):
        D.check_search_memory(10, 50_000, 10_000, 1_000, available=64 * 2**30)
    D.check_search_memory(10, 100, 10_000, 1_000, available=64 * 2**30)


# -- 18b. no hedges; a fast kill-and-resume -----------------------------------------------------


def test_the_hedges_are_gone():
    from jaxsplit.search import evaluate

    assert not hasattr(D, "module_stats_fallback")
    assert not hasattr(cli, "StageUnavailableError") and not hasattr(cli, "_stage_function")
    assert not hasattr(evaluate, "fast_backend_available")


def test_killed_modularize_resumes_to_the_uninterrupted_result(trained, tmp_path):
    """SIGKILL a `jaxsplit modularize` subprocess mid-search, `--resume` it, compare."""
    sets = ["--set", "search.num_generations=8"]
    run_a, run_b = copy_run(trained, tmp_path / "a"), copy_run(trained, tmp_path / "b")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "jaxsplit.cli", "modularize", "--no-progress"]
    proc = subprocess.Popen([*cmd, "--run", str(run_b), *sets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_root = run_b / D.MODULARIZE_DIRNAME / D.CKPT_DIRNAME
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = D.list_checkpoints(ckpt_root)
        if done and done[-1][0] >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = D.list_checkpoints(ckpt_root)
    assert killed_at and killed_at[-1][0] < 9, "killed too late"
    assert not (run_b / D.MODULARIZE_DIRNAME / "masks.npz").exists()
    # the uninterrupted run and the resumed one, side by side
    uninterrupted = subprocess.Popen([*cmd, "--run", str(run_a), *sets], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    jaxsplit_cli("modularize", "--run", str(run_b), "--resume", "--no-progress", check_rc=0)
    _, err = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, err[-3000:]
    out_a, out_b = run_a / D.MODULARIZE_DIRNAME, run_b / D.MODULARIZE_DIRNAME
    with np.load(out_a / "masks.npz") as za, np.load(out_b / "masks.npz") as zb:
        assert za.files == zb.files
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k])
    strip = lambda h: [{k: v for k, v in g.items() if k not in D.TIME_KEYS} for g in h["generations"]]
    assert strip(json.loads((out_a / "history.json").read_text())) == \
        strip(json.loads((out_b / "history.json").read_text()))
    sa, sb = (json.loads((o / "summary.json").read_text()) for o in (out_a, out_b))
    for key in ("ensemble_valid_accuracy", "ensemble_test_accuracy", "per_class", "best_generation"):
        assert sa[key] == sb[key]
