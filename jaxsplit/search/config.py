"""Search hyper-parameters (docs/method.md §4-6); reference values are the defaults."""

from __future__ import annotations

import dataclasses
from typing import Literal


MAX_POPULATION_SIZE = 100_000  # far above any useful search; the driver also checks memory


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        from jaxsplit.config import ConfigError  # late import: config imports this module

        raise ConfigError(f"{key}: {msg}")


@dataclasses.dataclass(frozen=True)
class GradientConfig:
    """The gradient searcher (GradSplitter, docs/method.md §10); reference values are the defaults.

    Schedule: `head_epochs` epochs training the heads only (lr `lr_head_warmup`), then
    `modular_epochs` epochs in cycles of `cycle_mask_epochs` epochs on masks + heads (lr
    `lr_modular`, mask loss weight `alpha`) and `cycle_head_epochs` epochs on the heads only
    (lr `lr_head`). A fresh Adam starts at every phase change, as in the reference.
    """

    init: Literal["ones", "normal", "zeros"] = "ones"  # initial real mask values
    init_scale: float = 1.0  # standard deviation of init="normal"
    estimator: Literal["hardtanh", "sigmoid"] = "hardtanh"  # straight-through backward
    head: Literal["mlp", "none"] = "mlp"  # per-module head on the N logits / own class logit
    head_hidden: int = 10
    alpha: float = 0.1  # weight of the mean kept-kernel bit in the loss
    head_epochs: int = 5
    modular_epochs: int = 140
    cycle_mask_epochs: int = 5
    cycle_head_epochs: int = 2
    lr_head_warmup: float = 0.01
    lr_head: float = 0.001
    lr_modular: float = 0.001
    batch_size: int = 64
    eval_batch_size: int = 1000
    num_train: int | None = None  # train on at most this many modularization-train images (None: all)

    def __post_init__(self):
        p = "search.gradient."
        _check(self.num_train is None or self.num_train > 0, p + "num_train", f"must be > 0, got {self.num_train}")
        _check(self.init_scale > 0, p + "init_scale", f"must be > 0, got {self.init_scale}")
        _check(self.head_hidden >= 1, p + "head_hidden", f"must be >= 1, got {self.head_hidden}")
        _check(self.alpha >= 0, p + "alpha", f"must be >= 0, got {self.alpha}")
        for name in ("head_epochs", "modular_epochs", "cycle_mask_epochs", "cycle_head_epochs"):
            value = getattr(self, name)
            _check(value >= 0, p + name, f"must be >= 0, got {value}")
        _check(self.cycle_mask_epochs + self.cycle_head_epochs >= 1, p + "cycle_mask_epochs",
               "cycle_mask_epochs + cycle_head_epochs must be >= 1, got "
               f"{self.cycle_mask_epochs} + {self.cycle_head_epochs}")
        _check(self.num_epochs >= 1, p + "head_epochs",
               f"head_epochs + modular_epochs must be >= 1, got {self.head_epochs} + {self.modular_epochs}")
        for name in ("lr_head_warmup", "lr_head", "lr_modular"):
            value = getattr(self, name)
            _check(value > 0, p + name, f"must be > 0, got {value}")
        _check(self.batch_size >= 1, p + "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, p + "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")

    @property
    def num_epochs(self) -> int:
        return self.head_epochs + self.modular_epochs

    def phases(self) -> tuple[int, ...]:
        """Per epoch: 1 trains masks + heads, 0 the heads only."""
        cycle = (1,) * self.cycle_mask_epochs + (0,) * self.cycle_head_epochs
        return (0,) * self.head_epochs + tuple(cycle[e % len(cycle)] for e in range(self.modular_epochs))


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The modularization search.

    Reference (CNNSplitter) values are the defaults: 200 generations, 100
    individuals, 50 parents mating, 20 kept, 5% mutation, alpha = gamma = 0.9,
    early stop after 20 generations without a better valid fitness.
    """

    method: Literal["ga", "gradient"] = "ga"  # the GA (docs/method.md §5) or gradient masks (§10)
    gradient: GradientConfig = GradientConfig()  # method="gradient" only
    strategy: Literal["kernel_ga", "simple_ga", "de", "cma_es", "pso"] = "kernel_ga"
    population_size: int = 100
    num_generations: int = 200
    num_parents_mating: int | None = None  # None: population_size // 2 (reference 50 of 100)
    keep_parents: int | None = None  # None: population_size // 5 (reference 20 of 100)
    mutation_rate: float = 0.05
    mutation: Literal["random", "flip"] = "random"  # chosen genes get a random bit (reference) / flipped
    alpha: float = 0.9
    gamma: float = 0.9
    early_stop: int = 20  # generations without a better valid fitness; 0 disables
    num_valid: int | None = None  # use at most this many valid images (None: all)
    # encoding (docs/method.md §4)
    groups_small: int = 10  # groups for layers with fewer than `group_threshold` kernels
    groups_large: int = 100
    group_threshold: int = 256
    sensitive_layers: tuple[int, ...] | None = None  # None: the reference's layers for the model
    init_ratios_sensitive: tuple[float, ...] | None = None  # None: per-family reference list
    init_ratios_other: tuple[float, ...] | None = None
    # softmax((n - 1 - group) / init_temperature) picks the initial groups (reference 10; with
    # 10-group layers that is a weak preference for the important groups, see encoding.py)
    init_temperature: float = 10.0  # = encoding.REFERENCE_INIT_TEMPERATURE (not imported: no jax here)
    importance_confidence: float = 0.9
    sensitivity: bool = False  # compute layer-sensitivity curves (and pick sensitive layers when unset)
    empty_layer: Literal["repair", "kernel0"] = "repair"  # empty layer: force its top group on / keep kernel 0 (reference)
    # cooperative fitness (docs/method.md §6)
    ensemble: Literal["hierarchical", "sampled"] = "hierarchical"
    min_kept_ensembles: int = 50
    max_kept_ensembles: int = 500
    thresholds: dict | None = None  # {num_classes_in_ensemble: acc threshold}; None: reference
    num_sampled_ensembles: int = 2000  # for ensemble="sampled"
    # evaluator
    backend: Literal["auto", "reference", "fast", "device"] = "auto"
    chunk_individuals: int = 16
    chunk_images: int = 1000
    # "fast" backend only (search/fast_graph.py): run the first conv segment once at full width
    # for all modules and, when the first site has <= 32 kernels, the second one for groups of
    # 16 modules at once (None: decided by the model; True: group whatever the width; False:
    # neither), and memory for the logit rows it reuses when a (class, mask) comes back (0: off;
    # results never depend on it)
    share_first_conv: bool | None = None
    eval_cache_mib: int = 256
    # "device" backend only (search/device_evaluate.py): float32, or tensorfloat32 / bfloat16
    # operands with float32 accumulation
    compute_dtype: Literal["float32", "tensorfloat32", "bfloat16"] = "float32"
    shard: bool = True  # split the population over all local devices when there are several (search/sharding.py)
    # driver
    checkpoint_every: int = 5
    seed: int = 0

    def __post_init__(self):
        _check(self.method in ("ga", "gradient"), "search.method", f"must be 'ga' or 'gradient', got {self.method!r}")
        _check(isinstance(self.gradient, GradientConfig), "search.gradient",
               f"must be a GradientConfig, got {type(self.gradient).__name__}")
        _check(self.population_size >= 2, "search.population_size", f"must be >= 2, got {self.population_size}")
        _check(self.population_size <= MAX_POPULATION_SIZE, "search.population_size",
               f"must be <= {MAX_POPULATION_SIZE:,} (the reference uses 100; every generation "
               f"evaluates classes x population x images module outputs), got {self.population_size:,}")
        _check(self.num_generations >= 1, "search.num_generations", f"must be >= 1, got {self.num_generations}")
        _check(2 <= self.parents_mating <= self.population_size, "search.num_parents_mating",
               f"must be in [2, population_size={self.population_size}], got {self.num_parents_mating}")
        _check(0 <= self.parents_kept <= self.parents_mating, "search.keep_parents",
               f"must be in [0, num_parents_mating={self.parents_mating}], got {self.keep_parents}")
        _check(0.0 <= self.mutation_rate <= 1.0, "search.mutation_rate", f"must be in [0, 1], got {self.mutation_rate}")
        _check(0.0 < self.alpha <= 1.0, "search.alpha", f"must be in (0, 1], got {self.alpha}")
        _check(0.0 <= self.gamma <= 1.0, "search.gamma", f"must be in [0, 1], got {self.gamma}")
        _check(self.early_stop >= 0, "search.early_stop", f"must be >= 0, got {self.early_stop}")
        _check(self.num_valid is None or self.num_valid > 0, "search.num_valid", f"must be > 0, got {self.num_valid}")
        _check(1 <= self.min_kept_ensembles <= self.max_kept_ensembles, "search.min_kept_ensembles",
               f"must be in [1, max_kept_ensembles={self.max_kept_ensembles}], got {self.min_kept_ensembles}")
        _check(self.chunk_individuals >= 1, "search.chunk_individuals", f"must be >= 1, got {self.chunk_individuals}")
        _check(self.chunk_images >= 1, "search.chunk_images", f"must be >= 1, got {self.chunk_images}")
        _check(self.eval_cache_mib >= 0, "search.eval_cache_mib", f"must be >= 0, got {self.eval_cache_mib}")
        _check(isinstance(self.shard, bool), "search.shard", f"must be true or false, got {self.shard!r}")
        _check(self.init_temperature > 0, "search.init_temperature", f"must be > 0, got {self.init_temperature}")
        _check(self.checkpoint_every >= 1, "search.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(0.0 <= self.importance_confidence < 1.0, "search.importance_confidence",
               f"must be in [0, 1), got {self.importance_confidence}")

    @property
    def parents_mating(self) -> int:
        """Resolved number of parents mating."""
        if self.num_parents_mating is None:
            return max(2, self.population_size // 2)
        return self.num_parents_mating

    @property
    def parents_kept(self) -> int:
        """Resolved number of parents kept (elitism)."""
        if self.keep_parents is None:
            return min(self.parents_mating, self.population_size // 5)
        return self.keep_parents
