"""Multi-process (multi-host) search: the population axis sharded across processes.

The same code path as several local devices (`jaxsplit.search.sharding`):
after `jax.distributed.initialize`, `jax.devices()` lists every process's
devices, `population_mesh()` spans all of them, and the jitted generation step
runs as one SPMD program (params, images and the GA state replicated, the
masks and the logit table `L (C, P, N)` split along P; XLA's collectives move
L's slices to where the fitness needs them: NCCL on GPUs, ICI on TPUs, gloo
over TCP on CPUs). Every process must build identical inputs (same config,
seed, data and params): that is what the replicated specs mean.

Use:

    python -m jaxsplit.search.multihost --coordinator HOST:PORT --num-processes N \\
        --process-id I -- modularize --run RUN     # on every host, I = 0..N-1

initializes `jax.distributed`, then runs `jaxsplit <args after -->` (the
ordinary command line) in that process. With no `--coordinator`, JAX's cluster
auto-detection is used (Cloud TPU pod slices, SLURM, Open MPI). In Python:
`initialize(...)` first, then `run_search(...)` (the search loop without run
folders) or the usual `run_modularize`.

`run_search` is the driver's generation loop without file I/O; it returns
host numpy values (masks, history) that are equal on every process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxsplit.errors import JaxsplitError

# driver/sharding are imported inside run_search: importing them starts a JAX backend, and
# jax.distributed.initialize must come first.

ENV_COORDINATOR = "JAXSPLIT_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSPLIT_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSPLIT_PROCESS_ID"


class MultiHostError(JaxsplitError, ValueError):
    """Bad distributed settings."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300, cpu_collectives: str = "gloo") -> None:
    """`jax.distributed.initialize` with jaxsplit's defaults; call before any other JAX use.

    Arguments left `None` are read from `JAXSPLIT_COORDINATOR`,
    `JAXSPLIT_NUM_PROCESSES`, `JAXSPLIT_PROCESS_ID`; if all three are still
    unset, JAX auto-detects the cluster (TPU pod slice, SLURM, Open MPI).

    Args:
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: total processes (hosts).
      process_id: this process's index in `[0, num_processes)`.
      local_device_ids: the local devices this process uses (default all).
      timeout_s: how long to wait for the other processes (`initialization_timeout`).
      cpu_collectives: the CPU cross-process collectives ("gloo" or "mpi"),
        set as `jax_cpu_collectives_implementation` (used when the platform is CPU).

    Raises:
      MultiHostError: a half-specified setting or bad values.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = _int_env(ENV_NUM_PROCESSES)
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = _int_env(ENV_PROCESS_ID)
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise MultiHostError(
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}: expected all three or none (none = auto-detect)")
    if num_processes is not None:
        if not isinstance(num_processes, int) or num_processes < 1:
            raise MultiHostError(f"num_processes must be an int >= 1, got {num_processes!r}")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise MultiHostError(
                f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
        if ":" not in coordinator_address:
            raise MultiHostError(
                f"coordinator_address must be 'host:port', got {coordinator_address!r}")
    if cpu_collectives not in ("gloo", "mpi"):
        raise MultiHostError(f"cpu_collectives must be 'gloo' or 'mpi', got {cpu_collectives!r}")
    if timeout_s < 1:
        raise MultiHostError(f"timeout_s must be >= 1, got {timeout_s!r}")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=int(timeout_s))


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise MultiHostError(f"{name}={value!r}: expected an integer") from None


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `run_search` returns (host values, equal on every process).

    Attributes:
      best_masks: `{conv: bool[C, K_l]}` the best ensemble's masks.
      best_bits: `(C, G)` bool.
      history: one dict per evaluated generation (driver's metrics; no timings).
      num_devices: devices the population was split over.
      num_processes: `jax.process_count()`.
    """

    best_masks: dict[str, np.ndarray]
    best_bits: np.ndarray
    history: list[dict[str, Any]]
    num_devices: int
    num_processes: int


def run_search(problem: Any, settings: Mapping[str, Any], params: Any,
               images: np.ndarray, labels: np.ndarray, classes: np.ndarray, *, seed: int,
               population_size: int, num_generations: int) -> SearchResult:
    """The driver's generation loop (`run_modularize` minus files): same keys, same step.

    Generation g uses `fold_in(key(seed), g)` and the initial population the
    driver's `INIT_STREAM` keys, so a run equals `run_modularize`'s search
    for the same problem. Works on one device, several local devices and
    several processes alike (the evaluator decides: wrap it with
    `sharding.shard_evaluator` over `jax.devices()`).

    Args:
      problem, settings: from `driver.build_problem` (a `driver.SearchProblem`).
      params: model params (host or device arrays, identical on every process).
      images `(N, H, W, Cin)`, labels `(N,)`, classes `(C,)`: identical on every process.
      seed: `search.seed`.
      population_size: P.
      num_generations: evaluates generations `0..num_generations` unless early stopping.
    """
    from jaxsplit.search import driver as D
    from jaxsplit.search import sharding as S

    base_key = jax.random.key(seed)
    key_init, key_pop = jax.random.split(jax.random.fold_in(base_key, D.INIT_STREAM))
    bits0 = D.initial_population(key_pop, problem, population_size, settings)
    carry = D.init_carry(key_init, problem, bits0)
    place = S.input_placement(problem.evaluate_fn)
    carry = D._strong(carry, place)
    dev_params = D._strong(params, place)
    dev = D._strong((np.asarray(images, np.float32), np.asarray(labels, np.int32),
                     np.asarray(classes, np.int32)), place)
    step = D.compile_step(D.make_step(problem), carry, D.generation_key(base_key, 0), dev_params,
                          *dev)
    history = []
    for g in range(num_generations + 1):
        carry, metrics = step(D._strong(carry, place), D.generation_key(base_key, g), dev_params,
                              *dev)
        history.append({"generation": g, **D._to_host(metrics)})
        if history[-1]["stop"]:
            break
    best_bits = np.asarray(jax.device_get(carry.best_bits))
    masks = problem.decode(best_bits[:, None])
    best_masks = {k: np.asarray(jax.device_get(v))[:, 0] for k, v in masks.items()}
    mesh = getattr(problem.evaluate_fn, "num_devices", 1)
    return SearchResult(best_masks, best_bits, history, int(mesh), jax.process_count())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxsplit.search.multihost [distributed options] -- JAXSPLIT_ARGS...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m jaxsplit.search.multihost",
        description="initialize jax.distributed, then run a jaxsplit command in this process")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=300, help="seconds to wait for peers")
    args = parser.parse_args(argv)
    if not rest:
        parser.error("give the jaxsplit command after '--', e.g. -- modularize --run RUN")
    initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
    from jaxsplit import cli

    return cli.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
