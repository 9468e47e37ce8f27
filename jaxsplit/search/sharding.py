"""Multi-device population evaluation: the P axis of an evaluator sharded over devices.

The logit table `L (C, P, N)` (docs/method.md §6 step 1) is independent per
individual, so the population axis P splits across devices with no
communication: every device gets the variables, the images and the classes
(replicated) and a `P / D` slice of the masks, runs the wrapped evaluator on
its slice, and the slices of L are the shards of one global array. P is
padded up to a multiple of the device count D (with copies of individual 0)
and the padding is cut from the result, so callers see exactly the `(C, P,
N)` of the single-device evaluator; values agree with it up to float
rounding (each device evaluates a smaller batch).

Two implementations, chosen by the wrapped evaluator:

* jit-able evaluators (the "reference" backend): `jax.shard_map` over a 1-D
  `Mesh` of the devices (axis "population"), with `in_specs = (P(),
  P(None, "population"), P(), P())` and `out_specs = P(None, "population")`,
  inside `jax.jit`. It also works inside an outer `jit`.
* host-side evaluators (`evaluate_fn.host_side`, the "fast" backend, which
  plans each module's shapes on the host from concrete masks): the masks are
  split into D slices on the host and each slice is evaluated on its own
  device (inputs put there, `jax.default_device`), one Python thread per
  device so the devices run concurrently; the slices of L are concatenated
  and returned replicated over the mesh. Called with tracers (inside an
  outer `jit`), a host-side evaluator goes through `shard_map` like the
  others (and takes its traced, slower path).

Either way the wrapped evaluator sees ordinary `(C, P / D)` masks.

Use:

    evaluate_fn = make_sharded_evaluator(model, "auto")   # all local devices
    L = evaluate_fn(variables, masks, images, classes)       # same contract as make_evaluator

or wrap an existing evaluator with `shard_evaluator(evaluate_fn)`. The
search picks it up from the config: `search.shard: true` (the default)
shards over all local devices whenever there is more than one
(`make_evaluator_from_config`); with one device nothing changes.

Inside an outer `jit` (the search driver's compiled generation step) every
input of that jit must live on the same devices as the mesh: put them there
with `jax.device_put(x, evaluate_fn.replicated)` (the driver does this for
its carry, params and data). Everything in the step other than the
evaluator (fitness, GA) then runs replicated on every device, which costs
nothing extra in wall time on accelerators.

Running on several devices:

* CPU (tests, trying it out): `XLA_FLAGS=--xla_force_host_platform_device_count=4`
  before JAX starts makes one CPU look like 4 devices (same cores, so no
  speed-up; it checks the code path).
* One host with several GPUs or TPU chips (an 8xH100 box, a TPU v4-8 /
  v5e-8 / v5p-8 VM, i.e. a single-host pod slice): nothing to change. Install
  the matching JAX (`pip install "jax[cuda12]"` or `"jax[tpu]"`), check
  `python -c "import jax; print(jax.local_devices())"`, and run the usual
  `jaxsplit modularize --run RUN` (or `make_sharded_evaluator`): the
  population is split over all local devices. Pick `search.population_size
  + 1` (the hall-of-fame slot) as a multiple of the device count to avoid
  padding, e.g. 127 on 8 devices.
* Several processes / hosts (a multi-host GPU cluster, a TPU pod slice such
  as v4-32 or v5p-16): the same code path over a global mesh. Start the same
  command on every host, with identical config, seed, data and run folder
  (a copy on each host's disk, or a shared one):

      python -m jaxsplit.search.multihost --coordinator HOST0:PORT \
          --num-processes N --process-id I -- modularize --run RUN

  (`jaxsplit.search.multihost.initialize` calls `jax.distributed.initialize`
  before anything else; without `--coordinator` JAX auto-detects Cloud TPU
  pod slices, SLURM and Open MPI, e.g. `gcloud compute tpus tpu-vm ssh NAME
  --worker=all --command="python -m jaxsplit.search.multihost --
  modularize --run RUN"`, or `srun python -m jaxsplit.search.multihost --
  modularize ...`). `jax.devices()` then lists every process's devices, the
  default mesh spans them all, and `search.shard: true` wraps the evaluator
  whenever `jax.device_count() > 1`. The jit-able backends run one SPMD
  program; the host-side "fast" backend evaluates each process's slices on
  its own devices and assembles the global L with
  `jax.make_array_from_single_device_arrays`. On CPU the cross-process
  collectives are gloo over TCP (`jax_cpu_collectives_implementation`);
  GPUs use NCCL, TPUs ICI. Tested with 2 CPU processes on 127.0.0.1
  (`tests/test_multihost.py`: `multihost.run_search`, the driver's loop
  without files, gives the masks and history of one process, for both
  backends); the whole `modularize` command across processes is not tested
  here. Each process writes its own copy of the run folder's outputs: on a
  shared file system give each host its own run folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from jaxsplit.errors import JaxsplitError
from jaxsplit.models.convnet import ConvNet
from jaxsplit.search.evaluate import Backend, Evaluator, check_eval_inputs, is_traced, make_evaluator

AXIS = "population"


class ShardingError(JaxsplitError, ValueError):
    """Bad devices or masks for the sharded evaluator."""


def population_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D `Mesh` with axis "population" over `devices` (default: `jax.devices()`, i.e.
    every process's devices after `jax.distributed.initialize`, else the local ones)."""
    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
        raise ShardingError("devices is empty; expected at least one jax.Device")
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise ShardingError(f"devices must be jax.Device objects, got {bad[:3]!r}")
    if len(set(devices)) != len(devices):
        raise ShardingError(f"devices has duplicates: {devices}")
    return Mesh(np.asarray(devices, dtype=object), (AXIS,))


def padded_size(num_individuals: int, num_devices: int) -> int:
    """`num_individuals` rounded up to a multiple of `num_devices`."""
    return -(-num_individuals // num_devices) * num_devices


def _pad_population(masks: Mapping[str, jax.Array], size: int) -> dict[str, jax.Array]:
    """Pad axis 1 (P) of every `(C, P, K)` mask to `size` with copies of individual 0."""
    out = {}
    for name, m in masks.items():
        extra = size - m.shape[1]
        if extra:
            xp = np if isinstance(m, np.ndarray) else jnp  # numpy stays on the host
            m = xp.concatenate([m, xp.broadcast_to(m[:, :1], (m.shape[0], extra, m.shape[2]))],
                               axis=1)
        out[name] = m
    return out


class ShardedEvaluator:
    """An `Evaluator` whose population axis is split over the devices of a mesh.

    `evaluate_fn(variables, masks, images, classes) -> L (C, P, N)` as the
    wrapped evaluator; masks `{conv: bool[C, P, K_l]}` are padded to
    `P' = padded_size(P, D)` and sharded `(C, P' / D, K_l)` per device; L is
    returned with the padding cut, sharded along P.

    Called on concrete arrays, inputs are first placed on the mesh (variables,
    images, classes replicated; arrays committed to one device are moved).
    Called with tracers (inside an outer `jit`), the caller must have
    placed its inputs on the mesh's devices (`replicated`).

    Attributes:
      evaluate_fn: the wrapped single-device evaluator.
      mesh: the 1-D mesh (axis "population").
      num_devices: D.
      replicated: `NamedSharding` replicating an array over the mesh.
      population_sharding: `NamedSharding` splitting axis 1 (P) of a `(C, P, ...)` array.
      model: optional `ConvNet`, for input checks that name the global shapes.
      host_side: the wrapped evaluator's `host_side` (call outside `jit` for speed).
    """

    def __init__(self, evaluate_fn: Evaluator, devices: Sequence[jax.Device] | None = None, *,
                 model: ConvNet | None = None):
        if not callable(evaluate_fn):
            raise ShardingError(f"evaluate_fn must be callable, got {type(evaluate_fn).__name__}")
        self.evaluate_fn = evaluate_fn
        self.model = model
        self.mesh = population_mesh(devices)
        self.num_devices = int(self.mesh.devices.size)
        self.replicated = NamedSharding(self.mesh, PS())
        self.population_sharding = NamedSharding(self.mesh, PS(None, AXIS))
        self.host_side = bool(getattr(evaluate_fn, "host_side", False))
        self.num_traces = 0
        self._local = jax.shard_map(
            self._local_evaluate, mesh=self.mesh,
            in_specs=(PS(), PS(None, AXIS), PS(), PS()), out_specs=PS(None, AXIS),
            check_vma=False)
        self._jitted = jax.jit(self._evaluate)
        self._cut_fns: dict[int, Any] = {}

    @property
    def devices(self) -> tuple[jax.Device, ...]:
        return tuple(self.mesh.devices.flat)

    def _local_evaluate(self, variables, masks, images, classes):
        return self.evaluate_fn(variables, masks, images, classes)

    def _evaluate(self, variables, masks, images, classes) -> jax.Array:
        self.num_traces += 1
        first = next(iter(masks.values()))
        num_rows, num_individuals = int(first.shape[0]), int(first.shape[1])
        size = padded_size(num_individuals, self.num_devices)
        L = self._local(variables, _pad_population(masks, size), images, classes)
        L = L[:, :num_individuals]
        chex.assert_shape(L, (num_rows, num_individuals, images.shape[0]))
        return L

    def __call__(self, variables: Mapping, masks: Mapping[str, jax.Array], images: jax.Array,
                 classes: jax.Array) -> jax.Array:
        """See `jaxsplit.search.evaluate.Evaluator`."""
        if not isinstance(masks, Mapping) or not masks:
            raise ShardingError(
                f"masks must be a non-empty dict {{conv_name: bool[C, P, K_l]}}, got {masks!r:.80}")
        if self.model is not None:
            check_eval_inputs(self.model, masks, images, classes)
        else:
            shapes = {k: tuple(np.shape(v)) for k, v in masks.items()}
            if any(len(s) != 3 for s in shapes.values()):
                raise ShardingError(f"masks must have shape (C, P, K_l) per layer, got {shapes}")
        if not is_traced((variables, masks, images, classes)):
            if self.host_side:
                return self._call_host(variables, masks, images, classes)
            variables, images, classes = jax.device_put((variables, images, classes), self.replicated)
            masks = jax.device_put(dict(masks), self.replicated)
        return self._jitted(variables, masks, images, classes)


    def _call_host(self, variables, masks, images, classes) -> jax.Array:
        """Host-side evaluators: one P slice per local device, one thread per device.

        With several processes each evaluates the slices of its own devices;
        the slices form one global `(C, P', N)` array sharded along P, cut to
        P and replicated by a small jitted gather.
        """
        np_masks = {k: np.asarray(v) for k, v in masks.items()}
        first = next(iter(np_masks.values()))
        num_individuals = int(first.shape[1])
        per = padded_size(num_individuals, self.num_devices) // self.num_devices
        padded = _pad_population(np_masks, per * self.num_devices)
        devices = self.devices
        local = [d for d in range(self.num_devices)
                 if devices[d].process_index == jax.process_index()]
        variables, images, classes = (_local_copy(t) for t in (variables, images, classes))

        def run(d: int) -> np.ndarray:
            part = {k: v[:, d * per:(d + 1) * per] for k, v in padded.items()}
            with jax.default_device(devices[d]):
                p, x, c = jax.device_put((variables, images, classes), devices[d])
                return np.asarray(self.evaluate_fn(p, part, x, c))

        if len(local) == 1:
            parts = [run(local[0])]
        else:
            with ThreadPoolExecutor(len(local)) as pool:
                parts = list(pool.map(run, local))
        if jax.process_count() == 1:
            L = np.concatenate(parts, axis=1)[:, :num_individuals]
            return jax.device_put(L, self.replicated)
        shape = (parts[0].shape[0], per * self.num_devices, parts[0].shape[2])
        arrays = [jax.device_put(part, devices[d]) for d, part in zip(local, parts)]
        L = jax.make_array_from_single_device_arrays(shape, self.population_sharding, arrays)
        return self._cut(L, num_individuals)

    def _cut(self, L: jax.Array, num_individuals: int) -> jax.Array:
        fn = self._cut_fns.get(num_individuals)
        if fn is None:
            fn = jax.jit(lambda x: x[:, :num_individuals], out_shardings=self.replicated)
            self._cut_fns[num_individuals] = fn
        return fn(L)


def _local_copy(tree: Any) -> Any:
    """Host numpy copies of (possibly global, replicated) arrays: each process reads its own
    replica, so a host-side evaluator can put them on its local devices."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return x

    return jax.tree_util.tree_map(get, tree)


def shard_evaluator(evaluate_fn: Evaluator, devices: Sequence[jax.Device] | None = None, *,
                    model: ConvNet | None = None) -> ShardedEvaluator:
    """Wrap `evaluate_fn` so its population axis is split over `devices`.

    Args:
      evaluate_fn: any `Evaluator` (`make_evaluator(model, backend)`).
      devices: the devices (default: `jax.local_devices()`); see the module
        docstring for multi-host slices.
      model: optional, for input checks before padding.

    Returns:
      a `ShardedEvaluator` (same call contract as `evaluate_fn`).
    """
    return ShardedEvaluator(evaluate_fn, devices, model=model)


def make_sharded_evaluator(model: ConvNet, backend: Backend = "auto", *,
                           devices: Sequence[jax.Device] | None = None,
                           chunk_individuals: int = 16,
                           chunk_images: int = 1000) -> ShardedEvaluator:
    """`make_evaluator(model, backend, ...)` sharded over `devices` (default: all local)."""
    inner = make_evaluator(model, backend, chunk_individuals=chunk_individuals,
                           chunk_images=chunk_images)
    return ShardedEvaluator(inner, devices, model=model)


def input_placement(evaluate_fn: Any) -> jax.sharding.Sharding | jax.Device:
    """Where the inputs of a jitted computation calling `evaluate_fn` must live.

    The mesh-replicated sharding for a `ShardedEvaluator`, else the first device.
    """
    sharding = getattr(evaluate_fn, "replicated", None)
    return sharding if isinstance(sharding, jax.sharding.Sharding) else jax.devices()[0]
