"""Test-wide settings.

On CPU, the suite compiles far more than it computes: hundreds of small XLA programs, each
run a few times on tiny inputs. LLVM's optimization passes are most of that compile time, so
the suite runs with `--xla_backend_optimization_level=0` (about 2.5x faster on CPU). The
programs are the same (XLA's HLO passes still run); only the machine code is less optimized,
which can change float results in the last bits, so a test that compares against values
recorded with the default optimization runs them in a subprocess with `default_xla_env()`.

The flag is set here, before any test starts a JAX backend, and is inherited by the
subprocesses the tests start. It is not set when an accelerator plugin is installed (unless
JAX_PLATFORMS=cpu), nor when JAXSPLIT_TEST_XLA_OPT=1 (the default optimization everywhere).
"""

from __future__ import annotations

import importlib.metadata
import os

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def _accelerator_plugin_installed() -> bool:
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    prefixes = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
    return any(n.startswith(prefixes)
               for n in names)


def _use_fast_compile() -> bool:
    if os.environ.get("JAXSPLIT_TEST_XLA_OPT") == "1":
        return False
    return os.environ.get("JAX_PLATFORMS") == "cpu" or not _accelerator_plugin_installed()


def without_fast_compile(flags: str) -> str:
    """XLA_FLAGS with the suite's fast-compile flag removed."""
    return " ".join(f for f in flags.split() if f != FAST_COMPILE_FLAG)


def default_xla_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) for a subprocess with XLA's default optimization.

    XLA_FLAGS lose the fast-compile flag, and JAXSPLIT_TEST_XLA_OPT=1 keeps this file from
    adding it back if the subprocess imports it.
    """
    env = dict(os.environ if env is None else env)
    env["JAXSPLIT_TEST_XLA_OPT"] = "1"
    flags = without_fast_compile(env.get("XLA_FLAGS", ""))
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


FAST_COMPILE = _use_fast_compile()
if FAST_COMPILE and FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()


def call_with_default_xla(module: str, function: str, *args: str) -> object:
    """`tests/<module>.py`'s `function(*args)` (JSON-ready result) with XLA's default optimization.

    In this process when the suite runs at the default optimization, else in a subprocess with
    `default_xla_env()`: for tests that compare against values recorded with it.
    """
    import importlib
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not FAST_COMPILE:
        return getattr(importlib.import_module(module), function)(*args)
    here = Path(__file__).resolve().parent
    code = (f"import json, sys, {module} as M; "
            f"print('RESULT ' + json.dumps(M.{function}(*sys.argv[1:])))")
    env = default_xla_env()
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=here, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
