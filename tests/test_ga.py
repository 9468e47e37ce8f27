"""The reference binary GA as an evosax algorithm, and the other strategies (search.ga, strategies)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit.config import ConfigError
from jaxsplit.search import ga as G
from jaxsplit.search.config import SearchConfig
from jaxsplit.search.strategies import STRATEGIES, make_strategy


def test_num_mutated_genes_is_pygad_floor_with_minimum_one():
    assert int(G.num_mutated_genes(0.05, 940)) == 47
    assert int(G.num_mutated_genes(0.05, 10)) == 1
    assert int(G.num_mutated_genes(0.10, 630)) == 63
    assert int(G.num_mutated_genes(0.0, 100)) == 0


def test_crossover_is_prefix_of_a_and_suffix_of_b():
    num_genes = 12
    a = jnp.zeros(num_genes)
    b = jnp.ones(num_genes)
    points = []
    for seed in range(200):
        child = np.asarray(G.crossover(jax.random.key(seed), a, b))
        point = int(np.sum(child == 0))
        np.testing.assert_array_equal(child, np.r_[np.zeros(point), np.ones(num_genes - point)])
        points.append(point)
    assert min(points) == 0 and max(points) == num_genes - 1  # uniform in [0, G)


def test_mutation_counts():
    num_genes, rate = 200, 0.05
    genes = jnp.asarray(np.random.default_rng(0).integers(0, 2, num_genes), jnp.float32)
    changed_random = []
    for seed in range(100):
        flipped = G.mutation(jax.random.key(seed), genes, rate, "flip")
        assert int(jnp.sum(flipped != genes)) == 10  # exactly floor(5% of 200)
        mutated = G.mutation(jax.random.key(seed), genes, rate, "random")
        assert set(np.unique(np.asarray(mutated))) <= {0.0, 1.0}
        changed_random.append(float(jnp.mean(mutated != genes)))
    # random bits: a chosen gene changes with probability 1/2 -> about 2.5% of genes
    assert np.mean(changed_random) == pytest.approx(rate / 2, abs=0.005)
    assert max(changed_random) <= rate


def test_select_parents_best_first_ties_to_higher_index():
    fitness = jnp.asarray([3.0, 0.0, 1.0, 0.0, 2.0, 1.0])
    np.testing.assert_array_equal(G.select_parents(fitness, 4), [3, 1, 5, 2])


def _ga(population_size=10, parents=4, kept=2, mutation="random"):
    return G.KernelGA(population_size, jnp.zeros(16), num_parents_mating=parents,
                      keep_parents=kept, mutation=mutation)


def test_ask_keeps_elites_and_breeds_consecutive_parents():
    ga = _ga()
    params = G.Params(mutation_rate=0.0)  # isolate crossover
    rng = np.random.default_rng(0)
    for seed in range(10):
        pop = jnp.asarray(rng.integers(0, 2, (10, 16)), jnp.float32)
        fitness = jnp.asarray(rng.permutation(10), jnp.float32)
        state = ga.init(jax.random.key(seed), pop, fitness, params)
        new, _ = ga.ask(jax.random.key(100 + seed), state, params)
        order = np.argsort(np.asarray(fitness))
        parents = np.asarray(pop)[order[:4]]
        np.testing.assert_array_equal(new[:2], parents[:2])  # elitism: best 2 unchanged, in order
        for k, child in enumerate(np.asarray(new[2:])):
            a, b = parents[k % 4], parents[(k + 1) % 4]
            ok = [np.array_equal(child, np.r_[a[:p], b[p:]]) for p in range(16)]
            assert any(ok), (seed, k)


def test_tell_then_ask_mutates_at_the_configured_rate():
    ga = _ga(population_size=40, parents=20, kept=4, mutation="flip")
    params = G.Params(mutation_rate=0.25)
    pop = jnp.zeros((40, 16))  # all parents equal: any change is a mutation
    state = ga.init(jax.random.key(0), pop, jnp.arange(40.0), params)
    new, _ = ga.ask(jax.random.key(1), state, params)
    changed = np.asarray(new != 0).sum(-1)
    assert (changed[:4] == 0).all() and (changed[4:] == 4).all()  # 25% of 16 genes


def test_perclass_evolves_each_class_independently_and_improves_onemax():
    num_classes, population_size, num_genes = 3, 12, 24
    ga = G.KernelGA(population_size, jnp.zeros(num_genes), num_parents_mating=6, keep_parents=2)
    per_class = G.PerClass(ga, num_classes)
    params = ga.default_params
    pop = jax.random.bernoulli(jax.random.key(0), 0.2, (num_classes, population_size, num_genes))
    pop = pop.astype(jnp.float32)
    state = per_class.init(jax.random.key(1), pop, jnp.full(pop.shape[:2], jnp.inf), params)
    target = jnp.asarray(np.random.default_rng(0).integers(0, 2, (num_classes, 1, num_genes)),
                         jnp.float32)

    @jax.jit
    def step(state, pop, key):
        score = jnp.sum(pop == target, -1)  # each class has its own optimum
        state, _ = per_class.tell(key, pop, -score.astype(jnp.float32), state, params)
        pop, state = per_class.ask(jax.random.fold_in(key, 1), state, params)
        return state, pop, score

    first = None
    for g in range(30):
        state, pop, score = step(state, pop, jax.random.key(g))
        first = score.max(-1) if first is None else first
        assert set(np.unique(np.asarray(pop))) <= {0.0, 1.0}
    assert (np.asarray(score.max(-1)) > np.asarray(first)).all()
    assert state.population.shape == (num_classes, population_size, num_genes)


def test_bad_config_errors():
    with pytest.raises(G.GAConfigError, match="num_parents_mating"):
        _ga(population_size=4, parents=6, kept=2)
    with pytest.raises(G.GAConfigError, match="keep_parents"):
        _ga(population_size=10, parents=4, kept=5)
    with pytest.raises(G.GAConfigError, match="no offspring"):
        _ga(population_size=4, parents=4, kept=4)
    with pytest.raises(G.GAConfigError, match="mutation"):
        _ga(mutation="gaussian")
    with pytest.raises(ConfigError, match="num_parents_mating"):
        SearchConfig(population_size=10, num_parents_mating=20)
    with pytest.raises(G.GAConfigError, match="unknown strategy"):
        make_strategy("nsga", 8, 4, num_classes=2)
    with pytest.raises(G.GAConfigError, match="population_size >= 4"):
        make_strategy("de", 3, 4, num_classes=2)


def test_kernel_ga_from_config_uses_reference_defaults():
    cfg = SearchConfig()
    ga, params = G.kernel_ga_from_config(cfg, 940)
    assert (ga.population_size, ga.num_parents_mating, ga.keep_parents) == (100, 50, 20)
    assert float(params.mutation_rate) == pytest.approx(0.05)
    cfg = dataclasses.replace(cfg, population_size=30)
    ga, _ = G.kernel_ga_from_config(cfg, 10)
    assert (ga.num_parents_mating, ga.keep_parents) == (15, 6)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategies_improve_onemax(name):
    num_classes, population_size, num_genes = 2, 10, 16
    strategy = make_strategy(name, population_size, num_genes, num_classes=num_classes)
    bits = jax.random.bernoulli(jax.random.key(0), 0.25, (num_classes, population_size, num_genes))
    state = strategy.init(jax.random.key(1), bits)
    x = strategy.from_bits(bits)
    np.testing.assert_array_equal(strategy.to_bits(x), bits)  # the decoding inverts the init

    @jax.jit
    def step(state, x, key):
        score = strategy.to_bits(x).sum(-1).astype(jnp.float32)
        state = strategy.tell(key, x, -score, state)
        x, state = strategy.ask(jax.random.fold_in(key, 1), state)
        return state, x, score

    best = []
    for g in range(12):
        state, x, score = step(state, x, jax.random.key(g))
        best.append(np.asarray(score.max(-1)))
    assert x.shape == (num_classes, population_size, num_genes)
    assert (best[-1] > best[0]).all() or (best[-1] == num_genes).all(), (name, best[0], best[-1])
