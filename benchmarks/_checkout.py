"""Run a benchmark script against another checkout of jaxsplit (same-run comparisons).

    .venv/bin/python benchmarks/_checkout.py /path/to/other/checkout \\
        benchmarks/bench_graph_evaluator.py --label before --out before.json

An editable install of this checkout maps `import jaxsplit` to itself ahead
of `PYTHONPATH`, so this drops that import hook and puts the other checkout
first on `sys.path`, then runs the script as `__main__`.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: _checkout.py CHECKOUT SCRIPT [ARGS...]")
    checkout, script = Path(sys.argv[1]).resolve(), sys.argv[2]
    if not (checkout / "jaxsplit" / "__init__.py").is_file():
        raise SystemExit(f"{checkout} is not a jaxsplit checkout (no jaxsplit/__init__.py)")
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, str(checkout))
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
