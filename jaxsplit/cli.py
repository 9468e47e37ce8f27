"""The `jaxsplit` command line: train, modularize, patch, report, evaluate, bench, demo.

Every stage reads and writes one run folder (`runs/NAME/`):

    jaxsplit train --config configs/fashion_mnist_cpu.yaml --out runs/fmnist
    jaxsplit modularize --run runs/fmnist [--set search.num_generations=10] [--resume | --restart]
    jaxsplit patch --run runs/fmnist
    jaxsplit report --run runs/fmnist
    jaxsplit evaluate --run runs/fmnist --split test
    jaxsplit demo --out runs/demo        # all of the above on the embedded CPU preset

Config precedence (later wins): built-in defaults < the run folder's `config.yaml` (for
modularize / patch) < `modularize/config.yaml` (for `modularize --resume`: the settings the
search started with) < `--config FILE` < `--set key=value` (dotted keys, YAML values, e.g.
`--set train.epochs=3 --set model.width=0.25`) < `--data-dir`. `train` without `--config`
uses the CPU preset (`configs/fashion_mnist_cpu.yaml`) and says so.

Bad input (config, data, checkpoint, run folder: jaxsplit's own error types, see
`jaxsplit.errors`) prints `jaxsplit CMD: error: ...` to stderr (multi-line messages keep their
lines) and exits with status 2; `--debug` shows the traceback instead. Any other exception is
a bug and shows its traceback. Ctrl-C exits with 130 and prints the command that continues.
A stage holds its run folder's lock (`jaxsplit.io.run_lock`) while it writes there.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxsplit import config as jconfig
from jaxsplit.errors import JaxsplitError

__all__ = ["main", "build_parser", "resolve_config", "EXIT_USAGE", "BenchmarkNotFoundError"]

EXIT_OK = 0
EXIT_USAGE = 2  # bad input: config, data, checkpoint, run folder
EXIT_INTERRUPTED = 130

# Output that marks a stage as done (the demo skips stages whose output exists and parses).
STAGE_OUTPUTS = {
    "train": Path("checkpoint"),
    "modularize": Path("modularize") / "summary.json",
    "patch": Path("patch") / "patch_results.json",
    "report": Path("report.md"),
}
CPU_PRESET = "configs/fashion_mnist_cpu.yaml"  # = jaxsplit.presets.DEMO

EXAMPLES = {
    "train": """examples:
  jaxsplit train --config configs/fashion_mnist_cpu.yaml --out runs/fm
  jaxsplit train --out runs/fm --set train.epochs=2     # no --config: the CPU preset
  jaxsplit train --config configs/simcnn_cifar10.yaml --out runs/c10 --overwrite

Without --config, train uses the CPU preset (configs/fashion_mnist_cpu.yaml: SimCNN x0.125 on
Fashion-MNIST, about 2 min on 2 cores), never the full-width model. A run expected to take
more than 15 minutes prints an estimate first.""",
    "modularize": """examples:
  jaxsplit modularize --run runs/fm
  jaxsplit modularize --run runs/fm --set search.population_size=30 --set search.num_generations=30
  jaxsplit modularize --run runs/fm --resume     # continue; the saved --set values are reused
  jaxsplit modularize --run runs/fm --restart    # move modularize/ to modularize.old-<time>/, start over""",
    "patch": """examples:
  jaxsplit patch --run runs/fm
  jaxsplit patch --run runs/fm --set patch.target_classes=[0,1]""",
    "report": """examples:
  jaxsplit report --run runs/fm          # writes runs/fm/report.md""",
    "evaluate": """examples:
  jaxsplit evaluate --run runs/fm --split test
  jaxsplit evaluate --run runs/fm --split valid --data-dir /data/fashion-mnist""",
    "bench": """examples:
  jaxsplit bench --quick          # every argument after `bench` goes to the benchmark""",
    "demo": """examples:
  jaxsplit demo --out runs/demo
  jaxsplit demo --out runs/demo --data-dir /data/fashion-mnist --no-progress

Stages whose results exist (and parse) are skipped, so running it again after an interruption
continues where it stopped.""",
}


class BenchmarkNotFoundError(JaxsplitError, FileNotFoundError):
    """The benchmark script is not next to the installed package."""


# -- config resolution ---------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    """The mapping in a YAML file, or ConfigError."""
    if not path.is_file():
        raise jconfig.ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise jconfig.ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from e
    if not isinstance(loaded, Mapping):
        raise jconfig.ConfigError(
            f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    return dict(loaded)


def resolve_config(*, base: Mapping | None = None, run_dir: Path | None = None,
                   saved: Path | None = None, config_path: str | Path | None = None,
                   sets: Sequence[str] = (), data_dir: str | Path | None = None) -> jconfig.Config:
    """The config of a command: defaults < `base` < run's config.yaml < `saved` < file < `--set`
    < data dir.

    Args:
      base: a config dict under everything else (the demo's embedded preset).
      run_dir: a run folder whose `config.yaml` is read when it exists.
      saved: a config file saved by an earlier stage (`modularize/config.yaml` for `--resume`).
      config_path: a YAML file (`--config`).
      sets: `key=value` overrides (`--set`).
      data_dir: `--data-dir`, sets `data.data_dir`.

    Raises:
      ConfigError: naming the bad key or file.
    """
    data: dict = dict(base or {})
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        data = jconfig.merge(data, _read_yaml(run_dir / "config.yaml"))
    if saved is not None:
        data = jconfig.merge(data, _read_yaml(saved))
    if config_path is not None:
        data = jconfig.merge(data, _read_yaml(Path(config_path)))
    data = jconfig.merge(data, jconfig.parse_overrides(list(sets)))
    cfg = jconfig.from_dict(jconfig.Config, data)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(data_dir)))
    return cfg


def _check_matches_run(cfg: jconfig.Config, run_dir: Path) -> None:
    """The model and data sections must be the trained run's (data_dir may differ)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    trained = jconfig.from_dict(jconfig.Config, _read_yaml(path))
    if cfg.model != trained.model:
        raise jconfig.ConfigError(
            f"model: {jconfig.to_dict(cfg.model)} differs from the trained run's "
            f"{jconfig.to_dict(trained.model)} ({path}); the checkpoint defines the model")
    mine = dataclasses.replace(cfg.data, data_dir=None)
    theirs = dataclasses.replace(trained.data, data_dir=None)
    if mine != theirs:
        diff = sorted(k for k, v in jconfig.to_dict(mine).items() if jconfig.to_dict(theirs)[k] != v)
        raise jconfig.ConfigError(
            f"data.{diff[0]}: differs from the trained run's ({path}); only data.data_dir may "
            f"change after training")


def _require_run(run_dir: Path) -> None:
    from jaxsplit import checkpoint

    if not run_dir.is_dir():
        raise checkpoint.CheckpointNotFoundError(
            f"run folder {str(run_dir)!r} does not exist; {checkpoint.TRAIN_HINT}")
    if not checkpoint.checkpoint_path(run_dir).exists():
        raise checkpoint.CheckpointNotFoundError(
            f"run folder {str(run_dir)!r} has no checkpoint/; {checkpoint.TRAIN_HINT}")


def _print_summary(title: str, result: Any) -> None:
    """The scalar entries of a stage's result dict, one per line."""
    print(title)
    if isinstance(result, Mapping):
        for k, v in result.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")


def _command(*parts: str) -> str:
    return "jaxsplit " + shlex.join(parts)


# -- commands ---------------------------------------------------------------------------------------


def _train(cfg: jconfig.Config, out: Path, *, progress: bool, overwrite: bool = False) -> dict:
    from jaxsplit import io as jio
    from jaxsplit import pipeline, train

    estimate = pipeline.train_estimate(cfg)
    if estimate is not None:
        print(estimate, flush=True)
    with jio.run_lock(out, "jaxsplit train"):
        result = train.train_and_evaluate(cfg, out, progress=progress, overwrite=overwrite)
    m = result.metrics
    print(f"trained {cfg.model.name} (width {cfg.model.width}, {m['num_params']:,} params) on "
          f"{cfg.data.name} in {m['train_time_s']:.1f} s")
    print(f"  best valid accuracy {m['valid_accuracy']:.4f} (epoch {m['best_epoch']}/{m['epochs']}), "
          f"test accuracy {m['test_accuracy']:.4f}")
    print(f"  wrote {out / 'config.yaml'}, {out / 'metrics.json'}, {out / 'checkpoint'}")
    return m


def cmd_train(args: argparse.Namespace) -> int:
    from jaxsplit import presets

    base = None
    if args.config is None:
        base = presets.DEMO
        print(f"no --config: using the CPU preset ({CPU_PRESET}, model {base['model']['name']} "
              f"width {base['model']['width']}); pass --config for another model "
              f"(configs/*.yaml)", flush=True)
    cfg = resolve_config(base=base, config_path=args.config, sets=args.set, data_dir=args.data_dir)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    args.interrupt_hint = ("training cannot be resumed and nothing was saved; run the same "
                           "command again")
    _train(cfg, out, progress=not args.no_progress, overwrite=args.overwrite)
    return EXIT_OK


def _run_config(args: argparse.Namespace, saved: Path | None = None) -> tuple[Path, jconfig.Config]:
    run_dir = Path(args.run)
    _require_run(run_dir)
    cfg = resolve_config(run_dir=run_dir, saved=saved, config_path=getattr(args, "config", None),
                         sets=getattr(args, "set", ()), data_dir=getattr(args, "data_dir", None))
    _check_matches_run(cfg, run_dir)
    return run_dir, cfg


def cmd_modularize(args: argparse.Namespace) -> int:
    from jaxsplit.search import driver

    run_dir = Path(args.run)
    saved = run_dir / driver.MODULARIZE_DIRNAME / driver.CONFIG_FILE
    saved = saved if args.resume and saved.is_file() else None
    run_dir, cfg = _run_config(args, saved)
    if saved is not None:
        print(f"resuming with the settings saved in {saved} (--config/--set still apply on top)")
    again = ["modularize", "--run", str(run_dir), "--resume"]
    if args.data_dir is not None:
        again += ["--data-dir", str(args.data_dir)]
    args.interrupt_hint = (f"the search is saved every {cfg.search.checkpoint_every} "
                           f"generation(s); continue it with:\n  {_command(*again)}")
    result = driver.run_modularize(run_dir, cfg, resume=args.resume, restart=args.restart,
                                   progress=not args.no_progress)
    _print_summary(f"modularized {run_dir} -> {run_dir / driver.MODULARIZE_DIRNAME}", result)
    return EXIT_OK


def cmd_patch(args: argparse.Namespace) -> int:
    from jaxsplit import io as jio
    from jaxsplit import patch

    from jaxsplit import pipeline

    run_dir, cfg = _run_config(args)
    estimate = pipeline.patch_estimate(cfg)
    if estimate is not None:
        print(estimate, flush=True)
    args.interrupt_hint = (f"finished weak models are kept in {run_dir / 'patch'}; continue with:"
                           f"\n  {_command('patch', '--run', str(run_dir))}")
    with jio.run_lock(run_dir, "jaxsplit patch"):
        result = patch.run_patch(run_dir, cfg, progress=not args.no_progress)
    _print_summary(f"patched with {run_dir} -> {run_dir / 'patch'}", result)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from jaxsplit import io as jio
    from jaxsplit import report
    from jaxsplit.errors import RunFolderError

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {str(run_dir)!r} does not exist")
    with jio.run_lock(run_dir, "jaxsplit report"):
        print(f"wrote {report.write_report(run_dir)}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from jaxsplit import checkpoint, pipeline, train

    run_dir = Path(args.run)
    model, params, cfg, metrics = checkpoint.load_model(run_dir)
    data_cfg = cfg.data
    if args.data_dir is not None:
        data_cfg = dataclasses.replace(data_cfg, data_dir=str(args.data_dir))
    train_ds, valid_ds, test_ds = pipeline.prepare_data(data_cfg)
    ds = {"test": test_ds, "valid": valid_ds, "train": train_ds}[args.split]
    res = train.evaluate(model, params, ds, args.batch_size or cfg.train.eval_batch_size)
    print(f"{args.split} accuracy: {res['accuracy']:.4f} ({res['num_examples']} images, "
          f"loss {res['loss']:.4f})")
    recorded = metrics.get(f"{args.split}_accuracy")
    if recorded is not None:
        print(f"  recorded at training time: {recorded:.4f}")
    return EXIT_OK


def _find_bench_script() -> Path | None:
    """`benchmarks/bench_evaluator.py` next to the installed `jaxsplit` package (a source
    checkout or an editable install), never a file of the current directory."""
    import jaxsplit

    script = Path(jaxsplit.__file__).resolve().parent.parent / "benchmarks" / "bench_evaluator.py"
    return script if script.is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    script = _find_bench_script()
    if script is None:
        import jaxsplit

        raise BenchmarkNotFoundError(
            f"the benchmark is not part of this installation: it is benchmarks/bench_evaluator.py "
            f"of the source checkout, next to the jaxsplit package ({Path(jaxsplit.__file__).parent}); "
            f"install jaxsplit from a checkout with `pip install -e .`")
    spec = importlib.util.spec_from_file_location("jaxsplit_bench_evaluator", script)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    main_fn = getattr(module, "main", None)
    if main_fn is None:
        raise BenchmarkNotFoundError(f"{script} has no main()")
    bench_args = list(args.bench_args)
    if inspect.signature(main_fn).parameters:
        rc = main_fn(bench_args)
    else:
        saved, sys.argv = sys.argv, [str(script), *bench_args]
        try:
            rc = main_fn()
        finally:
            sys.argv = saved
    return int(rc or 0)


def stage_done(out: Path, stage: str) -> bool:
    """Whether `stage`'s result exists in `out` and parses (a truncated or empty result file, e.g.
    after a full disk, does not count: the stage runs again)."""
    from jaxsplit import checkpoint

    path = out / STAGE_OUTPUTS[stage]
    if not path.exists():
        return False
    if stage == "train":
        checkpoint.load_model(out)  # a corrupt checkpoint is an error naming it, never "done"
        return True
    try:
        if path.suffix == ".json":
            if not isinstance(json.loads(path.read_text()), dict):
                raise ValueError("not a JSON object")
        elif path.stat().st_size == 0:
            raise ValueError("empty file")
    except (OSError, ValueError) as e:
        print(f"[{stage}] {path} is unreadable ({e}); running the stage again")
        return False
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    from jaxsplit import io as jio
    from jaxsplit import patch, presets, report
    from jaxsplit.search import driver

    out = Path(args.out)
    cfg = resolve_config(base=presets.DEMO, config_path=args.config, sets=args.set,
                         data_dir=args.data_dir)
    progress = not args.no_progress
    print(f"jaxsplit demo: {cfg.model.name} (width {cfg.model.width}) on {cfg.data.name}, "
          f"run folder {out}")
    args.interrupt_hint = ("finished stages are skipped and the search resumes from its last "
                           f"checkpoint; continue with:\n  {_command(*args.argv)}")

    def done(stage: str) -> bool:
        if stage_done(out, stage):
            print(f"[{stage}] skipped: {out / STAGE_OUTPUTS[stage]} exists")
            return True
        print(f"[{stage}] running", flush=True)
        return False

    with jio.run_lock(out, "jaxsplit demo"):
        if not done("train"):
            _train(cfg, out, progress=progress)
        if not done("modularize"):
            result = driver.run_modularize(out, cfg, resume=True, progress=progress)
            _print_summary(f"[modularize] done -> {out / 'modularize'}", result)
        if not done("patch"):
            result = patch.run_patch(out, cfg, progress=progress)
            _print_summary(f"[patch] done -> {out / 'patch'}", result)
        if not done("report"):
            print(f"[report] wrote {report.write_report(out)}")
    print(f"jaxsplit demo: done; see {out / 'report.md'}")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `jaxsplit`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bars (for logs and CI)")
    parser = argparse.ArgumentParser(
        prog="jaxsplit",
        description="Modularize trained CNNs into per-class modules and patch weak models (CNNSplitter in JAX).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help,
                              epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def add_set(p):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")

    def add_data_dir(p):
        p.add_argument("--data-dir", default=None, metavar="DIR",
                       help="where the datasets are (sets data.data_dir; must exist)")

    def add_run(p, over_config: bool = False):  # --run [--config over the run's config.yaml]
        p.add_argument("--run", required=True, metavar="DIR", help="run folder (runs/NAME)")
        if over_config:
            p.add_argument("--config", default=None, metavar="PATH",
                           help="YAML config over the run's config.yaml")

    p = add("train", "train a model into a run folder")
    p.add_argument("--config", default=None, metavar="PATH",
                   help=f"YAML config (see configs/); default: the CPU preset {CPU_PRESET}")
    add_set(p)
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<name>)")
    add_data_dir(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.set_defaults(handler=cmd_train)

    p = add("modularize", "search per-class modules of a trained run")
    add_run(p, over_config=True)
    add_set(p)
    add_data_dir(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the latest search checkpoint, with the settings the "
                            "search started with (modularize/config.yaml)")
    again.add_argument("--restart", action="store_true",
                       help="move an existing modularize/ to modularize.old-<time>/ and start over")
    p.set_defaults(handler=cmd_modularize)

    p = add("patch", "patch weak models with the run's modules")
    add_run(p, over_config=True)
    add_set(p)
    add_data_dir(p)
    p.set_defaults(handler=cmd_patch)

    p = add("report", "write runs/NAME/report.md")
    add_run(p)
    p.set_defaults(handler=cmd_report)

    p = add("evaluate", "accuracy of a run's checkpoint")
    add_run(p)
    p.add_argument("--split", choices=("test", "valid", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.eval_batch_size")
    add_data_dir(p)
    p.set_defaults(handler=cmd_evaluate)

    p = add("bench", "run the evaluator benchmark (benchmarks/bench_evaluator.py next to the "
                     "installed package; every later argument is passed to it)")
    p.set_defaults(handler=cmd_bench, bench_args=[])

    p = add("demo", "train -> modularize -> patch -> report on the embedded CPU preset")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run folder (default runs/demo)")
    p.add_argument("--config", default=None, metavar="PATH", help="YAML config over the preset")
    add_set(p)
    add_data_dir(p)
    p.set_defaults(handler=cmd_demo)
    return parser


# Error types of modules this layer does not own that do not derive from JaxsplitError yet.

def _user_errors() -> tuple[type[BaseException], ...]:
    """jaxsplit's own error types: reported as a message with exit status 2."""
    return (JaxsplitError,)


def _print_error(command: str, err: BaseException) -> None:
    """`jaxsplit CMD: error: first line`, then the message's other lines as they are."""
    lines = (str(err).strip() or type(err).__name__).splitlines()
    print(f"jaxsplit {command}: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(line, file=sys.stderr)


def _show_library_logs() -> None:
    """The library logs its tables and notes (logger ``jaxsplit``, INFO); the CLI prints them."""
    logger = logging.getLogger("jaxsplit")
    if not any(getattr(h, "_jaxsplit_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._jaxsplit_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, here, even when a library configured the root logger


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `jaxsplit ARGS`; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] | None = None
    if "bench" in argv and all(a == "--debug" for a in argv[: argv.index("bench")]):
        # everything after `bench` belongs to the benchmark script (argparse's REMAINDER
        # cannot take arguments that start with "-"), except jaxsplit's own --no-progress
        i = argv.index("bench")
        rest = argv[i + 1:]
        own = [a for a in rest if a in ("--no-progress", "-h", "--help")]
        argv, bench_args = argv[: i + 1] + own, [a for a in rest if a not in own]
    args = parser.parse_args(argv)
    args.argv = argv
    if bench_args is not None:
        args.bench_args = bench_args
    debug = bool(getattr(args, "debug", False))
    _show_library_logs()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = getattr(args, "interrupt_hint", None)
        print(f"jaxsplit {args.command}: interrupted" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as e:
        if debug:
            raise
        _print_error(args.command, e)
        return EXIT_USAGE


def console_main() -> None:
    """The `jaxsplit` program: `main()`'s status as the exit status.

    After Ctrl-C the process ends with `os._exit` once the message is out: a checkpoint save
    that was in flight runs on orbax's background threads, which would otherwise print
    tracebacks while the interpreter shuts down. Nothing saved is lost: finished checkpoints are
    complete (written atomically), and the unfinished one is a temporary that the next run
    removes.
    """
    status = main()
    if status == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    console_main()
