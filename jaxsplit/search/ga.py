"""The reference's binary genetic algorithm as an evosax algorithm (SPEC §5).

CNNSplitter evolves each class's population with a modified PyGAD
(`src/ga.py`, after Gad 2021, https://arxiv.org/abs/2106.06158) set to:
steady-state selection ("sss") of `num_parents_mating` (50) parents,
`keep_parents` (20) best kept unchanged at the front of the next population,
the other `P - keep_parents` offspring made by single-point crossover of
parents `k % num_parents` and `(k + 1) % num_parents` (PyGAD's default
pairing; the crossover point is uniform in `[0, G)`, so point 0 copies the
second parent), then "random" mutation of `floor(5% · G)` (at least 1) genes
per offspring, chosen without replacement, each set to a random value of the
gene space {0, 1} (so about half of them change). `mutation="flip"` sets
them to their complement instead (an option, not the reference).

evosax conventions: fitness is MINIMISED (pass `-score`), `init/ask/tell`
are the jitted methods of the base class and this class only writes
`_init/_ask/_tell`. Genes are float32 0/1 (evosax ravels solutions as
floats); cast with `genes > 0.5` to decode.

Selection ties: PyGAD sorts fitness ascending (stable) and reverses, so among
equal fitness the HIGHER index comes first; `select_parents` reproduces this
(many individuals tie at fitness 0 in the cooperative fitness, so it matters).

All classes evolve together through `PerClass`, a vmap of init/ask/tell over
a leading class axis: one compiled step for the `(C, P, G)` populations.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
from evosax.algorithms.population_based.base import (
    Params as BaseParams,
    PopulationBasedAlgorithm,
    State as BaseState,
)
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from evosax.types import Fitness, Population, Solution
from flax import struct

from jaxsplit.errors import JaxsplitError

Mutation = Literal["random", "flip"]


class GAConfigError(JaxsplitError, ValueError):
    """GA settings that do not fit together."""


@struct.dataclass
class State(BaseState):
    population: jax.Array  # (P, G) float32 0/1, the last told population
    fitness: jax.Array  # (P,) float32, its (minimised) fitness


@struct.dataclass
class Params(BaseParams):
    mutation_rate: float  # fraction of genes chosen for mutation per offspring (reference 0.05)


def num_mutated_genes(mutation_rate: jax.Array | float, num_genes: int) -> jax.Array:
    """PyGAD's count: `floor(rate · G)`, at least 1 when rate > 0 (0 when rate is 0)."""
    count = jnp.floor(jnp.asarray(mutation_rate, jnp.float32) * num_genes + 1e-4).astype(jnp.int32)
    return jnp.where(jnp.asarray(mutation_rate) > 0, jnp.maximum(count, 1), 0)


def select_parents(fitness: jax.Array, num_parents: int) -> jax.Array:
    """Indices of the `num_parents` best (lowest) fitness, best first.

    Ties are broken like PyGAD's reversed stable sort: higher index first.
    """
    num = fitness.shape[0]
    order_rev = jnp.argsort(fitness[::-1], stable=True)  # ascending; ties: higher original idx first
    return (num - 1 - order_rev)[:num_parents]


def crossover(key: jax.Array, parent_a: Solution, parent_b: Solution) -> Solution:
    """Single-point crossover: `child[:point] = a[:point]`, `child[point:] = b[point:]`.

    The point is uniform in `[0, G)` (PyGAD's `randint(0, G)`).
    """
    num_genes = parent_a.shape[-1]
    point = jax.random.randint(key, (), 0, num_genes)
    return jnp.where(jnp.arange(num_genes) < point, parent_a, parent_b)


def mutation(key: jax.Array, genes: Solution, mutation_rate: jax.Array | float,
             mode: Mutation = "random") -> Solution:
    """Mutate `num_mutated_genes(rate, G)` distinct genes of one genome.

    "random" (reference): each chosen gene is set to a uniform random bit;
    "flip": each chosen gene is complemented.
    """
    num_genes = genes.shape[-1]
    key_pick, key_bit = jax.random.split(key)
    count = num_mutated_genes(mutation_rate, num_genes)
    # A uniform subset of size `count`: the genes whose random key ranks below `count`.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key_pick, (num_genes,))))
    chosen = ranks < count
    if mode == "flip":
        new = 1.0 - genes
    elif mode == "random":
        new = jax.random.bernoulli(key_bit, 0.5, (num_genes,)).astype(genes.dtype)
    else:
        raise GAConfigError(f"mutation must be 'random' or 'flip', got {mode!r}")
    return jnp.where(chosen, new, genes)


class KernelGA(PopulationBasedAlgorithm):
    """Binary steady-state GA of CNNSplitter (PyGAD "sss", single point, random mutation).

    Attributes:
      population_size: P.
      num_parents_mating: parents selected each generation (reference 50).
      keep_parents: best parents copied unchanged to the next population (reference 20).
      mutation: "random" (reference) or "flip".
    """

    def __init__(self, population_size: int, solution: Solution, *, num_parents_mating: int,
                 keep_parents: int, mutation: Mutation = "random",
                 fitness_shaping_fn: Callable = identity_fitness_shaping_fn,
                 metrics_fn: Callable | None = None):
        if not 2 <= num_parents_mating <= population_size:
            raise GAConfigError(
                f"num_parents_mating must be in [2, population_size={population_size}], got "
                f"{num_parents_mating}")
        if not 0 <= keep_parents <= num_parents_mating:
            raise GAConfigError(
                f"keep_parents must be in [0, num_parents_mating={num_parents_mating}], got "
                f"{keep_parents}")
        if keep_parents >= population_size:
            raise GAConfigError(
                f"keep_parents={keep_parents} leaves no offspring in a population of "
                f"{population_size}")
        if mutation not in ("random", "flip"):
            raise GAConfigError(f"mutation must be 'random' or 'flip', got {mutation!r}")
        kwargs: dict[str, Any] = {"fitness_shaping_fn": fitness_shaping_fn}
        if metrics_fn is not None:
            kwargs["metrics_fn"] = metrics_fn
        super().__init__(population_size, solution, **kwargs)
        self.num_parents_mating = int(num_parents_mating)
        self.keep_parents = int(keep_parents)
        self.mutation = mutation

    @property
    def _default_params(self) -> Params:
        return Params(mutation_rate=0.05)

    @property
    def num_offspring(self) -> int:
        return self.population_size - self.keep_parents

    def _init(self, key: jax.Array, params: Params) -> State:
        return State(
            population=jnp.full((self.population_size, self.num_dims), jnp.nan, jnp.float32),
            fitness=jnp.full((self.population_size,), jnp.inf, jnp.float32),
            best_solution=jnp.full((self.num_dims,), jnp.nan, jnp.float32),
            best_fitness=jnp.asarray(jnp.inf, jnp.float32),
            generation_counter=jnp.asarray(0, jnp.int32),
        )

    def _ask(self, key: jax.Array, state: State, params: Params) -> tuple[Population, State]:
        parents = state.population[select_parents(state.fitness, self.num_parents_mating)]
        k = jnp.arange(self.num_offspring)
        parent_a = parents[k % self.num_parents_mating]
        parent_b = parents[(k + 1) % self.num_parents_mating]
        key_cross, key_mut = jax.random.split(key)
        children = jax.vmap(crossover)(jax.random.split(key_cross, self.num_offspring),
                                       parent_a, parent_b)
        children = jax.vmap(partial(mutation, mode=self.mutation), in_axes=(0, 0, None))(
            jax.random.split(key_mut, self.num_offspring), children, params.mutation_rate)
        population = jnp.concatenate([parents[: self.keep_parents], children], axis=0)
        return population, state

    def _tell(self, key: jax.Array, population: Population, fitness: Fitness, state: State,
              params: Params) -> State:
        return state.replace(population=population, fitness=fitness)


class PerClass:
    """Run one evosax algorithm on C independent populations at once (vmap over classes).

    Populations are `(C, P, ...)`, fitness `(C, P)` (minimised); the state
    gets a leading C axis. Every class gets its own key (`split(key, C)`).
    """

    def __init__(self, algorithm, num_classes: int):
        if num_classes < 1:
            raise GAConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.algorithm = algorithm
        self.num_classes = int(num_classes)

    @property
    def default_params(self):
        return self.algorithm.default_params

    def _keys(self, key: jax.Array) -> jax.Array:
        return jax.random.split(key, self.num_classes)

    def init(self, key: jax.Array, population: Population, fitness: Fitness, params) -> Any:
        """Population-based init from an evaluated `(C, P, ...)` population."""
        return jax.vmap(self.algorithm.init, in_axes=(0, 0, 0, None))(
            self._keys(key), population, fitness, params)

    def init_mean(self, key: jax.Array, mean: Solution, params) -> Any:
        """Distribution-based init from a `(C, ...)` mean."""
        return jax.vmap(self.algorithm.init, in_axes=(0, 0, None))(self._keys(key), mean, params)

    def ask(self, key: jax.Array, state, params) -> tuple[Population, Any]:
        return jax.vmap(self.algorithm.ask, in_axes=(0, 0, None))(self._keys(key), state, params)

    def tell(self, key: jax.Array, population: Population, fitness: Fitness, state, params):
        """Returns `(state, metrics)` with a leading C axis."""
        return jax.vmap(self.algorithm.tell, in_axes=(0, 0, 0, 0, None))(
            self._keys(key), population, fitness, state, params)


def kernel_ga_from_config(search_cfg, num_genes: int, *, mutation: Mutation = "random") -> tuple[KernelGA, Params]:
    """A `KernelGA` and its `Params` from a `SearchConfig`."""
    ga = KernelGA(search_cfg.population_size, jnp.zeros(num_genes, jnp.float32),
                  num_parents_mating=search_cfg.parents_mating, keep_parents=search_cfg.parents_kept,
                  mutation=mutation)
    return ga, Params(mutation_rate=jnp.asarray(search_cfg.mutation_rate, jnp.float32))
