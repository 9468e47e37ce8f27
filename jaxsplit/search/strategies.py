"""Pluggable evosax strategies for the binary kernel-group genomes (docs/method.md §5).

`make_strategy(name, population_size, num_genes, search_cfg)` returns a
`BinaryStrategy`: one evosax algorithm run on all C class populations at once
(`ga.PerClass`) plus the genotype -> bits decoding.

* "kernel_ga" (reference): `ga.KernelGA`, genes are 0/1 floats; bits = x > 0.5.
  The repaired bits are what is told back (`tell_repaired`), so the GA's
  population always holds valid genomes.
* real-valued strategies, "simple_ga" (`SimpleGA`, Gaussian mutation with
  std 0.5), "de" (`DifferentialEvolution`, defaults), "cma_es" (`CMA_ES`,
  std_init 0.5), "pso" (`PSO`, defaults): a genotype x is real and its bits
  are the signs, **bit = x > 0** (deterministic, so an individual's fitness
  depends on x only — a sigmoid-probability decoding would make it noisy).
  The initial real population is the heuristic bits mapped to ±1 (bit 1 ->
  +1, 0 -> -1, times `scale`); CMA-ES starts at the mean of those points
  (per class) and is told the heuristic population first. The real x is told
  back unchanged (repair only changes the phenotype).

Every strategy minimises (evosax convention): tell `-score`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import CMA_ES, PSO, DifferentialEvolution, SimpleGA

from jaxsplit.search.ga import GAConfigError, KernelGA, Params as KernelGAParams, PerClass

STRATEGIES = ("kernel_ga", "simple_ga", "de", "cma_es", "pso")


@dataclasses.dataclass(frozen=True, eq=False)
class BinaryStrategy:
    """An evosax algorithm on `(C, P, G)` populations with a genotype -> bits map.

    Attributes:
      name: one of `STRATEGIES`.
      per_class: the algorithm vmapped over classes (`ga.PerClass`).
      params: the algorithm's params (shared by all classes).
      binary: genes are 0/1 (bits = x > 0.5) rather than reals (bits = x > 0).
      distribution: a distribution-based algorithm (init from a mean).
      scale: magnitude of the real genotype of a bit (real strategies).
    """

    name: str
    per_class: PerClass
    params: Any
    binary: bool
    distribution: bool = False
    scale: float = 1.0

    @property
    def tell_repaired(self) -> bool:
        """Whether the repaired phenotype (not the raw genotype) is told back."""
        return self.binary

    def to_bits(self, x: jax.Array) -> jax.Array:
        """Genotypes `(..., G)` -> bool bits."""
        return x > (0.5 if self.binary else 0.0)

    def from_bits(self, bits: jax.Array) -> jax.Array:
        """Bits `(..., G)` -> float32 genotypes (0/1, or ±scale)."""
        b = bits.astype(jnp.float32)
        return b if self.binary else (2.0 * b - 1.0) * self.scale

    def init(self, key: jax.Array, bits: jax.Array) -> Any:
        """State for the not-yet-evaluated initial population `bits (C, P, G)`.

        Population-based algorithms are seeded with fitness +inf (the first
        `tell` brings the real values); CMA-ES with the mean of the population.
        """
        x = self.from_bits(bits)
        if self.distribution:
            return self.per_class.init_mean(key, x.mean(axis=1), self.params)
        fitness = jnp.full(x.shape[:2], jnp.inf, jnp.float32)
        return self.per_class.init(key, x, fitness, self.params)

    def ask(self, key: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """`(x (C, P, G) float32, state)`."""
        x, state = self.per_class.ask(key, state, self.params)
        return x.astype(jnp.float32), state

    def tell(self, key: jax.Array, x: jax.Array, fitness: jax.Array, state: Any) -> Any:
        """Update with `fitness (C, P)` to MINIMISE; returns the new state."""
        state, _ = self.per_class.tell(key, x, fitness, state, self.params)
        return state


def make_strategy(name: str, population_size: int, num_genes: int, search_cfg=None, *,
                  num_classes: int, mutation: str = "random") -> BinaryStrategy:
    """A `BinaryStrategy` by name.

    Args:
      name: "kernel_ga" | "simple_ga" | "de" | "cma_es" | "pso".
      population_size: P per class.
      num_genes: G.
      search_cfg: a `SearchConfig` (parents, elitism, mutation rate of
        "kernel_ga"); None uses the reference values for P.
      num_classes: C, the number of populations.
      mutation: "random" (reference) or "flip", for "kernel_ga".

    Raises:
      GAConfigError: unknown name or settings that do not fit.
    """
    if name not in STRATEGIES:
        raise GAConfigError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
    if population_size < 2:
        raise GAConfigError(f"population_size must be >= 2, got {population_size}")
    if num_genes < 1:
        raise GAConfigError(f"num_genes must be >= 1, got {num_genes}")
    solution = jnp.zeros(num_genes, jnp.float32)
    if name == "kernel_ga":
        if search_cfg is not None:
            parents, kept, rate = search_cfg.parents_mating, search_cfg.parents_kept, search_cfg.mutation_rate
        else:
            parents = max(2, population_size // 2)
            kept, rate = min(parents, population_size // 5), 0.05
        algo = KernelGA(population_size, solution, num_parents_mating=parents, keep_parents=kept,
                        mutation=mutation)
        params = KernelGAParams(mutation_rate=jnp.asarray(rate, jnp.float32))
        return BinaryStrategy(name, PerClass(algo, num_classes), params, binary=True)
    if name == "simple_ga":
        algo = SimpleGA(population_size, solution, std_schedule=optax.constant_schedule(0.5))
        return BinaryStrategy(name, PerClass(algo, num_classes), algo.default_params, binary=False)
    if name == "de":
        if population_size < 4:
            raise GAConfigError(f"strategy 'de' needs population_size >= 4, got {population_size}")
        algo = DifferentialEvolution(population_size, solution)
        return BinaryStrategy(name, PerClass(algo, num_classes), algo.default_params, binary=False)
    if name == "pso":
        algo = PSO(population_size, solution)
        return BinaryStrategy(name, PerClass(algo, num_classes), algo.default_params, binary=False)
    algo = CMA_ES(population_size, solution)
    params = algo.default_params.replace(std_init=jnp.asarray(0.5, jnp.float32))
    return BinaryStrategy(name, PerClass(algo, num_classes), params, binary=False, distribution=True)
