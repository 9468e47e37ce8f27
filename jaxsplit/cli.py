"""The `jaxsplit` command line: train, modularize, patch, report, evaluate, bench, demo.

Every stage reads and writes one run folder (`runs/NAME/`):

    jaxsplit train --config configs/fashion_mnist_cpu.yaml --out runs/fmnist
    jaxsplit modularize --run runs/fmnist [--set search.num_generations=10] [--resume]
    jaxsplit patch --run runs/fmnist
    jaxsplit report --run runs/fmnist
    jaxsplit evaluate --run runs/fmnist --split test
    jaxsplit demo --out runs/demo        # all of the above on the embedded CPU preset

Config precedence (later wins): built-in defaults < the run folder's `config.yaml` (for
modularize / patch) < `--config FILE` < `--set key=value` (dotted keys, YAML values, e.g.
`--set train.epochs=3 --set model.width=0.25`) < `--data-dir`.

Bad input (config, data, checkpoint, run folder) prints one line `jaxsplit CMD: error: ...` to
stderr and exits with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxsplit import config as jconfig

__all__ = ["main", "build_parser", "resolve_config", "StageUnavailableError", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_USAGE = 2  # bad input: config, data, checkpoint, run folder
EXIT_INTERRUPTED = 130

# Output that marks a stage as done (the demo skips stages whose output exists).
STAGE_OUTPUTS = {
    "train": Path("checkpoint"),
    "modularize": Path("modularize") / "summary.json",
    "patch": Path("patch") / "patch_results.json",
    "report": Path("report.md"),
}


class StageUnavailableError(RuntimeError):
    """A pipeline stage whose module is not part of this installation."""


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
                   config_path: str | Path | None = None, sets: Sequence[str] = (),
                   data_dir: str | Path | None = None) -> jconfig.Config:
    """The config of a command: defaults < `base` < run's config.yaml < file < `--set` < data dir.

    Args:
      base: a config dict under everything else (the demo's embedded preset).
      run_dir: a run folder whose `config.yaml` is read when it exists.
      config_path: a YAML file (`--config`).
      sets: `key=value` overrides (`--set`).
      data_dir: `--data-dir`, sets `data.data_dir`.

    Raises:
      ConfigError: naming the bad key or file.
    """
    data: dict = dict(base or {})
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        data = jconfig.merge(data, _read_yaml(run_dir / "config.yaml"))
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


def _stage_function(module: str, name: str, stage: str) -> Callable:
    """`module.name`, imported lazily; StageUnavailableError when the module is missing."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise StageUnavailableError(
                f"the {stage} stage is not available: module {module} is missing") from e
        raise
    fn = getattr(mod, name, None)
    if fn is None:
        raise StageUnavailableError(f"the {stage} stage is not available: {module}.{name} is missing")
    return fn


def _print_summary(title: str, result: Any) -> None:
    """The scalar entries of a stage's result dict, one per line."""
    print(title)
    if isinstance(result, Mapping):
        for k, v in result.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")


# -- commands ---------------------------------------------------------------------------------------


def _train(cfg: jconfig.Config, out: Path, *, progress: bool, overwrite: bool = False) -> dict:
    from jaxsplit import train

    result = train.train_and_evaluate(cfg, out, progress=progress, overwrite=overwrite)
    m = result.metrics
    print(f"trained {cfg.model.name} (width {cfg.model.width}, {m['num_params']:,} params) on "
          f"{cfg.data.name} in {m['train_time_s']:.1f} s")
    print(f"  best valid accuracy {m['valid_accuracy']:.4f} (epoch {m['best_epoch']}/{m['epochs']}), "
          f"test accuracy {m['test_accuracy']:.4f}")
    print(f"  wrote {out / 'config.yaml'}, {out / 'metrics.json'}, {out / 'checkpoint'}")
    return m


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(config_path=args.config, sets=args.set, data_dir=args.data_dir)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    _train(cfg, out, progress=not args.no_progress, overwrite=args.overwrite)
    return EXIT_OK


def _run_config(args: argparse.Namespace) -> tuple[Path, jconfig.Config]:
    run_dir = Path(args.run)
    _require_run(run_dir)
    cfg = resolve_config(run_dir=run_dir, config_path=getattr(args, "config", None),
                         sets=getattr(args, "set", ()), data_dir=getattr(args, "data_dir", None))
    _check_matches_run(cfg, run_dir)
    return run_dir, cfg


def cmd_modularize(args: argparse.Namespace) -> int:
    run_dir, cfg = _run_config(args)
    run_modularize = _stage_function("jaxsplit.search.driver", "run_modularize", "modularize")
    result = run_modularize(run_dir, cfg, resume=args.resume)
    _print_summary(f"modularized {run_dir} -> {run_dir / 'modularize'}", result)
    return EXIT_OK


def cmd_patch(args: argparse.Namespace) -> int:
    run_dir, cfg = _run_config(args)
    run_patch = _stage_function("jaxsplit.patch", "run_patch", "patch")
    result = run_patch(run_dir, cfg)
    _print_summary(f"patched with {run_dir} -> {run_dir / 'patch'}", result)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    write_report = _stage_function("jaxsplit.report", "write_report", "report")
    print(f"wrote {write_report(run_dir)}")
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
    name = Path("benchmarks") / "bench_evaluator.py"
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / name).is_file():
            return base / name
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    script = _find_bench_script()
    if script is None:
        raise StageUnavailableError(
            "benchmarks/bench_evaluator.py was not found (run from the repository root)")
    spec = importlib.util.spec_from_file_location("jaxsplit_bench_evaluator", script)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    main_fn = getattr(module, "main", None)
    if main_fn is None:
        raise StageUnavailableError(f"{script} has no main()")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from jaxsplit import presets

    out = Path(args.out)
    cfg = resolve_config(base=presets.DEMO, config_path=args.config, sets=args.set,
                         data_dir=args.data_dir)
    progress = not args.no_progress
    print(f"jaxsplit demo: {cfg.model.name} (width {cfg.model.width}) on {cfg.data.name}, "
          f"run folder {out}")

    def done(stage: str) -> bool:
        if (out / STAGE_OUTPUTS[stage]).exists():
            print(f"[{stage}] skipped: {out / STAGE_OUTPUTS[stage]} exists")
            return True
        print(f"[{stage}] running")
        return False

    if not done("train"):
        _train(cfg, out, progress=progress)
    stages: list[tuple[str, str, str, Callable[[Callable], Any]]] = [
        ("modularize", "jaxsplit.search.driver", "run_modularize",
         lambda fn: fn(out, cfg, resume=(out / "modularize" / "search_ckpt").exists(),
                    progress=progress)),
        ("patch", "jaxsplit.patch", "run_patch", lambda fn: fn(out, cfg, progress=progress)),
        ("report", "jaxsplit.report", "write_report", lambda fn: fn(out)),
    ]
    for stage, module, name, call in stages:
        if done(stage):
            continue
        try:
            fn = _stage_function(module, name, stage)
        except StageUnavailableError as e:
            print(f"note: {e}; the demo stops here (results so far are in {out})", file=sys.stderr)
            return EXIT_OK
        result = call(fn)
        if stage == "report":
            print(f"[report] wrote {result}")
        else:
            _print_summary(f"[{stage}] done -> {out / stage}", result)
    print(f"jaxsplit demo: done; see {out / 'report.md'}")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `jaxsplit`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    parser = argparse.ArgumentParser(
        prog="jaxsplit",
        description="Modularize trained CNNs into per-class modules and patch weak models (CNNSplitter in JAX).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_set(p):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")

    def add_data_dir(p):
        p.add_argument("--data-dir", default=None, metavar="DIR",
                       help="where the datasets are (sets data.data_dir)")

    def add_run(p, over_config: bool = False):  # --run [--config over the run's config.yaml]
        p.add_argument("--run", required=True, metavar="DIR", help="run folder (runs/NAME)")
        if over_config:
            p.add_argument("--config", default=None, metavar="PATH",
                           help="YAML config over the run's config.yaml")

    def add_no_progress(p):
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("train", parents=[common], help="train a model into a run folder")
    p.add_argument("--config", default=None, metavar="PATH", help="YAML config (see configs/)")
    add_set(p)
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<name>)")
    add_data_dir(p)
    add_no_progress(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("modularize", parents=[common], help="search per-class modules of a trained run")
    add_run(p, over_config=True)
    add_set(p)
    add_data_dir(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest search checkpoint")
    p.set_defaults(handler=cmd_modularize)

    p = sub.add_parser("patch", parents=[common], help="patch weak models with the run's modules")
    add_run(p, over_config=True)
    add_set(p)
    add_data_dir(p)
    p.set_defaults(handler=cmd_patch)

    p = sub.add_parser("report", parents=[common], help="write runs/NAME/report.md")
    add_run(p)
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("evaluate", parents=[common], help="accuracy of a run's checkpoint")
    add_run(p)
    p.add_argument("--split", choices=("test", "valid", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.eval_batch_size")
    add_data_dir(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("bench", parents=[common], add_help=False,
                       help="run benchmarks/bench_evaluator.py (every later argument is passed to it)")
    p.set_defaults(handler=cmd_bench, bench_args=[])

    p = sub.add_parser("demo", parents=[common],
                       help="train -> modularize -> patch -> report on the embedded CPU preset")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run folder (default runs/demo)")
    p.add_argument("--config", default=None, metavar="PATH", help="YAML config over the preset")
    add_set(p)
    add_data_dir(p)
    add_no_progress(p)
    p.set_defaults(handler=cmd_demo)
    return parser


_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, StageUnavailableError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxsplit.train import TrainingError

    return (*_USER_ERRORS, TrainingError)


def _show_library_logs() -> None:
    """The library logs its tables and notes (logger ``jaxsplit``, INFO); the CLI prints them."""
    logger = logging.getLogger("jaxsplit")
    if not any(getattr(h, "_jaxsplit_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._jaxsplit_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `jaxsplit ARGS`; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] | None = None
    if "bench" in argv and all(a == "--debug" for a in argv[: argv.index("bench")]):
        # everything after `bench` belongs to the benchmark script (argparse's REMAINDER
        # cannot take arguments that start with "-")
        i = argv.index("bench")
        argv, bench_args = argv[: i + 1], argv[i + 1:]
    args = parser.parse_args(argv)
    if bench_args is not None:
        args.bench_args = bench_args
    debug = bool(getattr(args, "debug", False))
    _show_library_logs()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"jaxsplit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jaxsplit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
