"""Gradient-trained kernel masks: the GradSplitter searcher (docs/method.md §10).

Qi et al.'s GradSplitter finds the same modules as the GA (one kernel subset per class, model
weights frozen) by gradient descent. Per class and free (untied) mask site there is one real
vector `m` with one entry per kernel. The forward pass keeps kernel k when `m_k > 0`; the
backward pass is straight-through, the incoming gradient clipped to [-1, 1] (hardtanh of the
gradient, as the reference's `MySign`). Each module runs the masked network, maps its N logits
through a small head `ReLU -> Linear(N, 10) -> ReLU -> Linear(10, 1) -> sigmoid` to one score,
and the N module scores are trained with cross-entropy against the label, plus
`alpha * mean(kept bits)` in the mask phases.

Everything is generic over the model: the searcher needs only

* `masked_apply_fn(variables, masks, x) -> logits (B, N)`, `masks = {site: float[K_site]}` with
  one entry per site (the masks multiply the sites' channels; differentiable in `masks`);
* a site description with the duck API of `ConvSpec` / the kernel graph: `names`,
  `num_kernels` (dict), `ties`, `representative(name)`, `free_layers`.

For jaxsplit's `ConvNet`: `GradSplitter.for_convnet(model, cfg)`; for any model traced into
a kernel graph: `GradSplitter.for_graph(graph, apply_fn, cfg)` (`graph_masked_apply`: the
traced evaluation of `jaxsplit.masks.masked_apply`, with real-valued masks).

Style (evosax/optax): the structure lives in the `GradSplitter` object, everything that changes
in an explicit `GradState` (a `flax.struct` dataclass):

    splitter = GradSplitter.for_convnet(model, GradientConfig())
    state = splitter.init(key, variables)
    state = splitter.begin_epoch(state)              # phase, learning rate, optimiser reset
    state, metrics = splitter.step(state, batch, variables)       # one jitted step, all classes
    acc = splitter.evaluate(state, variables, images, labels)
    state = splitter.end_epoch(state, acc)           # best-on-valid bookkeeping, epoch += 1
    result = splitter.result(state)                  # binary masks {site: bool[C, K]}, heads

or all of it with `train(...)` (checkpoints every k epochs, resume, tqdm progress).

Reference details kept (GradSplitter `src/grad_splitter.py`): a *fresh* Adam at each phase
change (heads-only phases after the warm-up use `lr_head`, reference `0.1 * 0.01`); the mask
loss is the mean of the bits over every site (tied members counted at each site, as the
reference concatenates all layers) and all modules; the cross-entropy is taken over the
sigmoid scores; the best epoch is the last one with the highest valid accuracy (`>=`);
PyTorch's default Linear init (uniform +-1/sqrt(fan_in)) for the heads; a partial last batch
is used (weighted), as a PyTorch DataLoader does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxsplit.errors import JaxsplitError
from jaxsplit.search.config import GradientConfig

__all__ = [
    "GradientError",
    "GradState",
    "GradResult",
    "GradSplitter",
    "head_logit",
    "straight_through",
    "train",
    "list_checkpoints",
]

Masks = dict[str, jax.Array]
MaskedApplyFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array]
CKPT_PREFIX = "epoch_"
KEEP_CHECKPOINTS = 2


class GradientError(JaxsplitError, ValueError):
    """Inputs the gradient searcher cannot use (shapes, sites, checkpoints)."""


# -- the straight-through estimator ------------------------------------------------------------


@jax.custom_vjp
def _ste_hardtanh(m: jax.Array) -> jax.Array:
    return (m > 0).astype(m.dtype)


def _ste_hardtanh_fwd(m):
    return _ste_hardtanh(m), None


def _ste_hardtanh_bwd(_, g):
    return (jnp.clip(g, -1.0, 1.0),)


_ste_hardtanh.defvjp(_ste_hardtanh_fwd, _ste_hardtanh_bwd)


@jax.custom_vjp
def _ste_sigmoid(m: jax.Array) -> jax.Array:
    return (m > 0).astype(m.dtype)


def _ste_sigmoid_fwd(m):
    return _ste_sigmoid(m), m


def _ste_sigmoid_bwd(m, g):
    s = jax.nn.sigmoid(m)
    return (g * s * (1.0 - s),)


_ste_sigmoid.defvjp(_ste_sigmoid_fwd, _ste_sigmoid_bwd)

_ESTIMATORS = {"hardtanh": _ste_hardtanh, "sigmoid": _ste_sigmoid}


def straight_through(m: jax.Array, estimator: str = "hardtanh") -> jax.Array:
    """Binary bits `(m > 0)` as floats, with a straight-through gradient.

    Args:
      m: real mask values, any shape.
      estimator: the backward pass: "hardtanh" (reference) passes the incoming gradient clipped
        to [-1, 1]; "sigmoid" multiplies it by sigmoid'(m).

    Returns:
      `float[m.shape]` of 0/1.

    Example:
      >>> straight_through(jnp.array([-0.5, 0.0, 2.0]))
      Array([0., 0., 1.], dtype=float32)
    """
    if estimator not in _ESTIMATORS:
        raise GradientError(f"estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}")
    return _ESTIMATORS[estimator](jnp.asarray(m, jnp.float32))


def head_logit(head_params: Mapping[str, Any], logits: jax.Array) -> jax.Array:
    """One module's MLP head before its sigmoid: `Linear(ReLU(Linear(ReLU(logits))))`.

    The module's score is `sigmoid(head_logit(...))` (`GradSplitter.apply_head`); the ensemble
    predicts the argmax of the C modules' sigmoid scores.

    Args:
      head_params: `{"dense_0": {"kernel": (N, H), "bias": (H,)}, "dense_1": {"kernel": (H, 1),
        "bias": (1,)}}` (one module's, no leading C axis).
      logits: `(B, N)` logits of the masked model.

    Returns:
      `(B,)` pre-sigmoid logits.
    """
    h = jax.nn.relu(logits)
    h = jax.nn.relu(h @ head_params["dense_0"]["kernel"] + head_params["dense_0"]["bias"])
    h = h @ head_params["dense_1"]["kernel"] + head_params["dense_1"]["bias"]
    return h[..., 0]


# -- state ---------------------------------------------------------------------------------------


@struct.dataclass
class GradState:
    """Everything the gradient search carries (all arrays; checkpointed as is).

    Shapes: C classes (= modules), K_s kernels of free site s.
    """

    masks: dict  # {free site: float32[C, K_s]} real mask values
    heads: dict  # per-module head params, leading axis C ({} for head="none")
    opt_state: Any  # optax state over {"masks", "heads"} (learning rate injected)
    key: jax.Array  # base key: epoch e shuffles with fold_in(key, e)
    epoch: jax.Array  # int32[]: epochs done
    phase: jax.Array  # int32[]: 1 masks + heads, 0 heads only (the current epoch's)
    num_steps: jax.Array  # int32[]
    best_valid_accuracy: jax.Array  # float32[]; -1 before the first epoch
    best_epoch: jax.Array  # int32[]; -1 before the first epoch
    best_masks: dict  # {free site: bool[C, K_s]} at the best epoch
    best_heads: dict  # heads at the best epoch


class GradResult(NamedTuple):
    """The modules found (at the best valid epoch).

    Attributes:
      masks: `{site: bool[C, K_site]}` for every site (tied members equal), the GA's format.
      head_params: per-module head params with leading axis C (for head="none",
        `{"class_index": int32[C]}`); `head_params_of(c)` picks module c's.
      best_epoch: the epoch (0-based) the masks come from.
      best_valid_accuracy: the module ensemble's valid accuracy there.
      kept_fraction: `float[C]`, kept kernels / all kernels (summed over all sites).
    """

    masks: dict
    head_params: dict
    best_epoch: int
    best_valid_accuracy: float
    kept_fraction: np.ndarray

    def head_params_of(self, c: int) -> dict:
        """Module c's head params (no leading axis)."""
        return jax.tree_util.tree_map(lambda a: a[c], self.head_params)

    def mask_of(self, c: int) -> dict:
        """Module c's mask `{site: bool[K_site]}`."""
        return {k: v[c] for k, v in self.masks.items()}


def _check_sites(sites: Any) -> None:
    for attr in ("names", "num_kernels", "ties", "representative", "free_layers"):
        if not hasattr(sites, attr):
            raise GradientError(
                f"sites must describe the mask sites like a ConvSpec or kernel Graph (names, "
                f"num_kernels, ties, representative, free_layers); {type(sites).__name__} has no {attr!r}")
    if not sites.names:
        raise GradientError("the model has no mask sites (no conv kernels to split)")


# -- the searcher ----------------------------------------------------------------------------


class GradSplitter:
    """Gradient-trained per-class kernel masks for a frozen N-class model.

    Attributes:
      sites: the mask sites (`ConvSpec` or kernel `Graph` duck API).
      masked_apply_fn: `(variables, {site: float[K]}, x (B, ...)) -> logits (B, N)`.
      num_classes: N (= number of modules C).
      cfg: a `GradientConfig`.
    """

    def __init__(self, sites: Any, masked_apply_fn: MaskedApplyFn, num_classes: int,
                 cfg: GradientConfig | None = None):
        _check_sites(sites)
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise GradientError(f"num_classes must be an int >= 2, got {num_classes!r}")
        cfg = GradientConfig() if cfg is None else cfg
        if not isinstance(cfg, GradientConfig):
            raise GradientError(f"cfg must be a GradientConfig, got {type(cfg).__name__}")
        self.sites = sites
        self.masked_apply_fn = masked_apply_fn
        self.num_classes = int(num_classes)
        self.cfg = cfg
        self.names = tuple(sites.names)
        self.free = tuple(sites.free_layers)
        self.num_kernels = {n: int(sites.num_kernels[n]) for n in self.names}
        self.rep = {n: sites.representative(n) for n in self.names}
        self.total_kernels = sum(self.num_kernels.values())
        self._phases = cfg.phases()
        self.tx = optax.inject_hyperparams(optax.adam)(learning_rate=cfg.lr_modular)
        self.step = jax.jit(self._step)
        self._init = jax.jit(self._init_impl)
        self._end_epoch = jax.jit(self._end_epoch_impl)
        self._fresh_opt = jax.jit(self._fresh_opt_impl)
        self._eval_chunk = jax.jit(self._eval_chunk_impl)

    # -- constructors for jaxsplit models -----------------------------------------------------

    @classmethod
    def for_convnet(cls, model: Any, cfg: GradientConfig | None = None, *,
                    num_classes: int | None = None) -> GradSplitter:
        """A searcher for a `jaxsplit.models.ConvNet` (activation masking, `conv_spec()` sites)."""
        def masked_apply(variables, masks, x):
            return model.apply(variables, x, masks=masks)

        return cls(model.conv_spec(), masked_apply,
                   model.num_classes if num_classes is None else num_classes, cfg)

    @classmethod
    def for_graph(cls, graph: Any, apply_fn: Callable, cfg: GradientConfig | None = None, *,
                  num_classes: int | None = None) -> GradSplitter:
        """A searcher for any model traced into a kernel graph (`jaxsplit.graph.trace`).

        Args:
          graph: `jaxsplit.graph.trace(apply_fn, variables, example_x)`.
          apply_fn: `(variables, x) -> logits (B, N)`, the traced inference apply.
        """
        fn = graph_masked_apply(graph, apply_fn)
        n = getattr(graph, "num_outputs", None) if num_classes is None else num_classes
        if n is None:
            raise GradientError("the graph does not give num_outputs; pass num_classes")
        return cls(graph, fn, int(n), cfg)

    @classmethod
    def for_model(cls, graph: Any, apply_fn: Callable, cfg: GradientConfig | None = None, *,
                  num_classes: int | None = None) -> GradSplitter:
        """The searcher for the model behind `apply_fn`: `for_convnet` for a jaxsplit `ConvNet`
        (the reference's masking of each conv's post-ReLU output before the pool, docs/method.md
        §10), `for_graph` for any other traced model.

        Raises:
          GradientError: a ConvNet whose mask sites differ from its traced graph's.
        """
        from jaxsplit.models.convnet import convnet_of

        model = convnet_of(apply_fn)
        if model is None:
            return cls.for_graph(graph, apply_fn, cfg, num_classes=num_classes)
        splitter = cls.for_convnet(model, cfg, num_classes=num_classes)
        if tuple(splitter.names) != tuple(graph.names):
            raise GradientError(f"the ConvNet's mask sites {list(splitter.names)} differ from its "
                                f"traced graph's {list(graph.names)}")
        return splitter

    # -- pieces -----------------------------------------------------------------------------------

    def phase_of(self, epoch: int) -> int:
        """1 when epoch trains masks + heads, 0 when the heads only."""
        return self._phases[epoch]

    def lr_of(self, epoch: int) -> float:
        if self._phases[epoch] == 1:
            return self.cfg.lr_modular
        return self.cfg.lr_head_warmup if epoch < self.cfg.head_epochs else self.cfg.lr_head

    def expand(self, free_masks: Mapping[str, jax.Array]) -> dict:
        """`{free site: x[..., K]}` -> `{site: x[..., K]}` for every site (tied members share)."""
        missing = [n for n in self.free if n not in free_masks]
        if missing:
            raise GradientError(f"masks have no entry for free site(s) {missing}")
        return {n: free_masks[self.rep[n]] for n in self.names}

    def init_heads(self, key: jax.Array) -> dict:
        """Per-module heads `{"dense_0": {kernel (C, N, H), bias (C, H)}, "dense_1": ...}`.

        PyTorch's default `nn.Linear` init (as the reference): kernel and bias uniform in
        +-1/sqrt(fan_in). One uniform draw, sliced (one RNG program compiles fast on CPU).
        """
        if self.cfg.head == "none":
            return {}
        c, n, h = self.num_classes, self.num_classes, self.cfg.head_hidden
        shapes = {("dense_0", "kernel"): ((c, n, h), n), ("dense_0", "bias"): ((c, h), n),
                  ("dense_1", "kernel"): ((c, h, 1), h), ("dense_1", "bias"): ((c, 1), h)}
        sizes = [math.prod(shape) for shape, _ in shapes.values()]
        u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
        out: dict = {"dense_0": {}, "dense_1": {}}
        offset = 0
        for ((layer, leaf), (shape, fan_in)), size in zip(shapes.items(), sizes):
            out[layer][leaf] = u[offset:offset + size].reshape(shape) / math.sqrt(fan_in)
            offset += size
        return out

    def init(self, key: jax.Array, variables: Any = None) -> GradState:
        """The initial state (jitted).

        Args:
          key: PRNG key (mask init for init="normal", head init, epoch shuffles).
          variables: unused (the model is frozen; accepted for symmetry with `step`).

        Returns:
          A `GradState` at epoch 0, masks `float32[C, K_s]` per free site.
        """
        del variables
        return self._init(key)

    def _init_impl(self, key: jax.Array) -> GradState:
        k_mask, k_head, k_data = jax.random.split(key, 3)
        c = self.num_classes
        sizes = [self.num_kernels[n] for n in self.free]
        if self.cfg.init == "ones":
            flat = jnp.ones((c, sum(sizes)), jnp.float32)
        elif self.cfg.init == "zeros":
            flat = jnp.zeros((c, sum(sizes)), jnp.float32)
        else:
            flat = self.cfg.init_scale * jax.random.normal(k_mask, (c, sum(sizes)), jnp.float32)
        splits = np.cumsum(sizes)[:-1].tolist()
        masks = dict(zip(self.free, jnp.split(flat, splits, axis=1)))
        heads = self.init_heads(k_head)
        trainable = {"masks": masks, "heads": heads}
        return GradState(
            masks=masks, heads=heads, opt_state=self.tx.init(trainable), key=k_data,
            epoch=jnp.zeros((), jnp.int32), phase=jnp.zeros((), jnp.int32),
            num_steps=jnp.zeros((), jnp.int32),
            best_valid_accuracy=jnp.full((), -1.0, jnp.float32), best_epoch=jnp.full((), -1, jnp.int32),
            best_masks={k: v > 0 for k, v in masks.items()}, best_heads=heads)

    def _scoring_heads(self, heads: dict) -> dict:
        if self.cfg.head == "none":
            return {"class_index": jnp.arange(self.num_classes, dtype=jnp.int32)}
        return heads

    def apply_head(self, head_params: Mapping[str, Any], logits: jax.Array) -> jax.Array:
        """One module's score from the masked network's logits.

        Args:
          head_params: one module's head (no leading C axis).
          logits: `(B, N)`.

        Returns:
          `(B,)`: sigmoid(Linear(ReLU(Linear(ReLU(logits))))) for head="mlp"; the module's own
          class logit for head="none".
        """
        if self.cfg.head == "none":
            return jnp.take(logits, head_params["class_index"], axis=-1)
        return jax.nn.sigmoid(head_logit(head_params, logits))

    def module_score(self, variables: Any, head_params: Mapping[str, Any],
                     mask_c: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
        """Module c's score on a batch: the masked model's N logits through c's head.

        Args:
          variables: the frozen model's variables.
          head_params: module c's head (`GradResult.head_params_of(c)`).
          mask_c: `{site: bool/float[K_site]}` (every site, or the free sites only).
          x: inputs `(B, ...)`.

        Returns:
          `(B,)` scores. `functools.partial(splitter.module_score, variables, head, mask)` is
          the `module_apply` that `jaxsplit.compose.compose` takes.
        """
        if set(mask_c) != set(self.names):
            mask_c = self.expand(mask_c)
        for n in self.names:
            chex.assert_shape(mask_c[n], (self.num_kernels[n],))
        masks = {n: jnp.asarray(mask_c[n]).astype(jnp.float32) for n in self.names}
        logits = self.masked_apply_fn(variables, masks, x)
        if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
            raise GradientError(f"masked_apply_fn returned logits of shape {tuple(logits.shape)}; "
                                f"expected (B, {self.num_classes})")
        return self.apply_head(head_params, logits)

    def scores(self, variables: Any, bits: Mapping[str, jax.Array], heads: dict,
               x: jax.Array) -> jax.Array:
        """All modules' scores `(B, C)` from free-site bits `{site: float[C, K]}`."""
        full = self.expand(bits)
        per_module = jax.vmap(self.module_score, in_axes=(None, 0, 0, None))(
            variables, self._scoring_heads(heads), full, x)  # (C, B)
        return per_module.T

    def kept_bits(self, bits: Mapping[str, jax.Array]) -> jax.Array:
        """`(C, sum_s K_s)`: every site's bits (tied members repeated), concatenated."""
        full = self.expand(bits)
        return jnp.concatenate([full[n] for n in self.names], axis=-1)

    def loss(self, trainable: dict, phase: jax.Array, variables: Any,
             batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """`CE(scores, labels) + phase * alpha * mean(bits)`, weighted over the batch."""
        bits = {k: straight_through(v, self.cfg.estimator) for k, v in trainable["masks"].items()}
        scores = self.scores(variables, bits, trainable["heads"], batch["image"])
        weight = batch["weight"].astype(jnp.float32)
        ce_each = optax.softmax_cross_entropy_with_integer_labels(scores, batch["label"])
        total_w = jnp.maximum(jnp.sum(weight), 1e-12)
        ce = jnp.sum(ce_each * weight) / total_w
        kept = jnp.mean(self.kept_bits(bits))
        loss = ce + phase.astype(jnp.float32) * self.cfg.alpha * kept
        acc = jnp.sum((jnp.argmax(scores, -1) == batch["label"]) * weight) / total_w
        return loss, {"loss": loss, "ce": ce, "kept_fraction": kept, "accuracy": acc}

    def _step(self, state: GradState, batch: Mapping[str, jax.Array],
              variables: Any) -> tuple[GradState, dict]:
        """One optimiser step of every module at once (see `step`)."""
        b = batch["image"].shape[0]
        chex.assert_shape(batch["label"], (b,))
        chex.assert_shape(batch["weight"], (b,))
        trainable = {"masks": state.masks, "heads": state.heads}
        grads, metrics = jax.grad(self.loss, has_aux=True)(trainable, state.phase, variables, batch)
        on = state.phase.astype(jnp.float32)  # heads-only phase: masks get no gradient, no update
        grads = {"masks": jax.tree_util.tree_map(lambda g: g * on, grads["masks"]), "heads": grads["heads"]}
        updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
        updates = {"masks": jax.tree_util.tree_map(lambda u: u * on, updates["masks"]),
                   "heads": updates["heads"]}
        new = optax.apply_updates(trainable, updates)
        return state.replace(masks=new["masks"], heads=new["heads"], opt_state=opt_state,
                             num_steps=state.num_steps + 1), metrics

    # The jitted public form; documented here for readers of the class.
    step: Callable[[GradState, Mapping[str, jax.Array], Any], tuple[GradState, dict]]
    """`step(state, batch, variables) -> (state, metrics)`: one jitted step of all C modules.

    batch: `{"image": (B, ...), "label": int32[B], "weight": float32[B]}` (weight 0 pads a short
    batch). metrics: loss, ce, kept_fraction (mean bit), accuracy (train batch), all scalars.
    """

    def begin_epoch(self, state: GradState) -> GradState:
        """Sets the epoch's phase and learning rate; a fresh optimiser when the phase changes."""
        e = int(state.epoch)
        if e >= len(self._phases):
            raise GradientError(f"epoch {e} is past the schedule's {len(self._phases)} epochs")
        phase = self.phase_of(e)
        opt_state = state.opt_state
        if e == 0 or self.phase_of(e - 1) != phase:
            opt_state = self._fresh_opt({"masks": state.masks, "heads": state.heads})
        hyper = {**opt_state.hyperparams, "learning_rate": np.float32(self.lr_of(e))}
        opt_state = opt_state._replace(hyperparams=hyper)
        return state.replace(opt_state=opt_state, phase=np.int32(phase))

    def _fresh_opt_impl(self, trainable: dict) -> Any:
        return self.tx.init(trainable)

    def _eval_chunk_impl(self, masks, heads, variables, images, labels, weight):
        bits = {k: (v > 0).astype(jnp.float32) for k, v in masks.items()}
        pred = jnp.argmax(self.scores(variables, bits, heads, images), -1)
        return jnp.sum((pred == labels) * weight)

    def evaluate(self, state_or_masks: GradState | Mapping[str, jax.Array], variables: Any,
                 images: np.ndarray, labels: np.ndarray, heads: dict | None = None) -> float:
        """Accuracy of the module ensemble (argmax of the C module scores) on `(images, labels)`.

        Args:
          state_or_masks: a `GradState` (its current masks and heads) or free-site masks
            `{site: [C, K]}` (real or bool; kept where > 0) with `heads`.
          images, labels: `(N, ...)`, `int[N]`; evaluated in chunks of `cfg.eval_batch_size`.
        """
        if isinstance(state_or_masks, GradState):
            masks, heads = state_or_masks.masks, state_or_masks.heads
        else:
            masks = {k: jnp.asarray(v).astype(jnp.float32) for k, v in state_or_masks.items()}
            heads = {} if heads is None else heads
        n = len(labels)
        if n == 0:
            raise GradientError("no images to evaluate")
        chunk = min(self.cfg.eval_batch_size, n)
        correct = 0.0
        for start in range(0, n, chunk):
            x, y, w = _padded(images, labels, np.arange(start, min(start + chunk, n)), chunk)
            correct += float(self._eval_chunk(masks, heads, variables, x, y, w))
        return correct / n

    def end_epoch(self, state: GradState, valid_accuracy: float) -> GradState:
        """Records the epoch's valid accuracy (best kept on `>=`) and counts the epoch done."""
        return self._end_epoch(state, np.float32(valid_accuracy))

    def _end_epoch_impl(self, state: GradState, acc: jax.Array) -> GradState:
        better = acc >= state.best_valid_accuracy
        pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), new, old)
        return state.replace(
            epoch=state.epoch + 1,
            best_valid_accuracy=jnp.where(better, acc, state.best_valid_accuracy),
            best_epoch=jnp.where(better, state.epoch, state.best_epoch),
            best_masks=pick({k: v > 0 for k, v in state.masks.items()}, state.best_masks),
            best_heads=pick(state.heads, state.best_heads))

    def result(self, state: GradState, best: bool = True) -> GradResult:
        """The modules of the best valid epoch (or the current ones with `best=False`)."""
        free = state.best_masks if best else {k: v > 0 for k, v in state.masks.items()}
        heads = state.best_heads if best else state.heads
        masks = {k: np.asarray(v) for k, v in self.expand(free).items()}
        kept = np.concatenate([masks[n] for n in self.names], axis=-1).mean(-1)
        return GradResult(masks=masks, head_params=jax.device_get(self._scoring_heads(heads)),
                          best_epoch=int(state.best_epoch if best else int(state.epoch) - 1),
                          best_valid_accuracy=float(state.best_valid_accuracy),
                          kept_fraction=kept)

    def keep_one_per_site(self, state: GradState, result: GradResult) -> tuple[GradResult, list[dict]]:
        """`result` with at least one kept kernel at every site of every module.

        The searcher may drop a whole site for some class (its loss allows it); such a module
        still computes (its channels there are zero) but cannot be physically extracted. Where
        that happened, the kernel with the largest real mask value at that site (the one
        closest to being kept) is kept. The ensemble then differs slightly from the one chosen
        on valid, so the repairs are returned to be reported.

        Returns:
          `(result, repairs)`, repairs a list of `{"class": c, "site": name, "kernel": k}` (empty
          when nothing was changed; `result` is then returned as is).
        """
        repairs: list[dict] = []
        free = {n: np.array(result.masks[n], dtype=bool, copy=True) for n in self.free}
        for n in self.free:
            real = np.asarray(state.masks[n], np.float32)
            for c in np.flatnonzero(~free[n].any(axis=-1)):
                k = int(np.argmax(real[c]))
                free[n][c, k] = True
                repairs.append({"class": int(c), "site": n, "kernel": k})
        if not repairs:
            return result, repairs
        masks = {k: np.asarray(v) for k, v in self.expand(free).items()}
        kept = np.concatenate([masks[n] for n in self.names], axis=-1).mean(-1)
        return result._replace(masks=masks, kept_fraction=kept), repairs

    def module_apply(self, result: GradResult, variables: Any, c: int) -> Callable[[jax.Array], jax.Array]:
        """`x -> (B,)` score of module c: the `module_apply` for `jaxsplit.compose.compose`."""
        head, mask = result.head_params_of(c), result.mask_of(c)
        return lambda x: self.module_score(variables, head, mask, x)


def graph_masked_apply(graph: Any, apply_fn: Callable | None = None) -> MaskedApplyFn:
    """`jaxsplit.masks.masked_apply` for real-valued masks (differentiable in the masks).

    `masks.masked_apply` takes boolean masks only; the searcher multiplies the channels by
    straight-through 0/1 floats and needs the gradient. Same traced evaluation: each consumer's
    input is multiplied by its channels' mask (tied sites read the representative's vector).

    Returns:
      `fn(variables, {site: float[K_site]}, x) -> logits (B, N)`.
    """
    from jaxsplit import graph as graph_lib
    from jaxsplit import masks as masks_lib

    fn_ = graph.apply_fn if apply_fn is None else apply_fn

    def fn(variables, mask, x):
        for n in graph.names:
            if n not in mask:
                raise GradientError(f"masks have no entry for site {n}; expected one per site {list(graph.names)}")
            chex.assert_shape(mask[n], (graph.num_kernels[n],), custom_message=f"mask of {n}")
        plan = graph.plan(tuple(x.shape), x.dtype, fn_)
        leaves = masks_lib._check_variables(graph, variables, plan)
        gid = graph.group_of(plan)
        vectors = {gid[n]: jnp.asarray(mask[n], jnp.float32) for n in graph.free_layers}
        return graph_lib.evaluate(graph, plan, leaves, x, vectors=vectors)

    return fn


def _padded(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, size: int):
    """`images[idx]`, `labels[idx]` padded to `size` rows, with weights 1 (real) / 0 (pad)."""
    k = len(idx)
    full = np.concatenate([idx, np.full(size - k, idx[0] if k else 0, idx.dtype)]) if k < size else idx
    w = np.zeros(size, np.float32)
    w[:k] = 1.0
    return (jnp.asarray(np.asarray(images)[full], jnp.float32), jnp.asarray(np.asarray(labels)[full], jnp.int32),
            jnp.asarray(w))


# -- the training loop (the I/O edge: progress, checkpoints) ---------------------------------


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """`[(epochs_done, path), ...]` ascending (hidden half-written directories ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        tail = p.name[len(CKPT_PREFIX):]
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and tail.isdigit():
            out.append((int(tail), p))
    return sorted(out)


def _settings_record(splitter: GradSplitter) -> dict:
    return {"gradient": dataclasses.asdict(splitter.cfg), "num_classes": splitter.num_classes,
            "sites": {n: [splitter.num_kernels[n], splitter.rep[n]] for n in splitter.names}}


@functools.partial(jax.jit, static_argnums=2)
def _permutation(key: jax.Array, epoch: int, n: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def _epoch_batches(splitter: GradSplitter, key: jax.Array, epoch: int, n: int):
    perm = np.asarray(_permutation(key, np.int32(epoch), n))
    b = splitter.cfg.batch_size
    return [perm[s:s + b] for s in range(0, n, b)]


def train(splitter: GradSplitter, state: GradState, variables: Any,
          train_data: tuple[np.ndarray, np.ndarray], valid_data: tuple[np.ndarray, np.ndarray], *,
          num_epochs: int | None = None, checkpoint_dir: str | Path | None = None,
          checkpoint_every: int = 5, resume: bool = False, progress: bool = False,
          fingerprint: Mapping[str, Any] | None = None,
          on_checkpoint: Callable[[int], None] | None = None) -> tuple[GradState, list[dict]]:
    """Runs the schedule: per epoch shuffled batches of `train_data`, then valid accuracy.

    Args:
      splitter, state: from `GradSplitter(...)` / `splitter.init(key)`; with `resume` and a
        checkpoint, `state` is only the template the checkpoint must fit.
      variables: the frozen model's variables.
      train_data, valid_data: `(images (N, ...), labels int[N])` numpy arrays. The best epoch is
        chosen on `valid_data` (never pass the test split).
      num_epochs: stop when this many epochs are done (default: the whole schedule).
      checkpoint_dir: write `epoch_XXXXX` orbax checkpoints there every `checkpoint_every`
        epochs and at the end (the latest two are kept).
      resume: continue from the latest checkpoint in `checkpoint_dir` (fresh when none). The
        result is bit-identical to an uninterrupted run: epoch e shuffles with
        `fold_in(state.key, e)`, and the checkpoint holds the whole state.
      progress: a tqdm bar (loss, valid accuracy, kept fraction).
      fingerprint: JSON-ready facts a resumed checkpoint must share (e.g. model and data
        digests), besides the searcher's settings and sites.
      on_checkpoint: called with the epochs done after each checkpoint (a test hook).

    Returns:
      `(state, history)`, history one dict per epoch (loss, ce, kept_fraction, train_accuracy,
      valid_accuracy, phase, learning_rate, time_s).
    """
    from jaxsplit import checkpoint as ckpt

    total = len(splitter._phases) if num_epochs is None else int(num_epochs)
    if not 1 <= total <= len(splitter._phases):
        raise GradientError(f"num_epochs must be in [1, {len(splitter._phases)}], got {num_epochs}")
    images, labels = train_data
    v_images, v_labels = valid_data
    if len(images) != len(labels) or len(images) == 0:
        raise GradientError(f"train_data needs as many labels as images (> 0), got {len(images)} and {len(labels)}")
    record = {"settings": _settings_record(splitter), "fingerprint": dict(fingerprint or {})}
    record = _json_ready(record)
    history: list[dict] = []
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if ckpt_dir is not None and checkpoint_every < 1:
        raise GradientError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if resume and ckpt_dir is not None:
        for p in ckpt_dir.glob(f".{CKPT_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
        existing = list_checkpoints(ckpt_dir)
        if existing:
            done, path = existing[-1]
            try:
                tree, meta = ckpt.load_pytree(path, {"state": state})
            except ckpt.CheckpointError as e:
                raise GradientError(f"cannot resume from {str(path)!r}: {e}") from e
            if meta.get("record") != record:
                raise GradientError(f"refusing to resume from {str(path)!r}: it was made with other "
                                    f"settings, sites or fingerprint than this run")
            state = tree["state"]
            history = list(meta["history"])
    elif ckpt_dir is not None and list_checkpoints(ckpt_dir):
        raise GradientError(f"{str(ckpt_dir)!r} already holds checkpoints; pass resume=True to continue")
    start = int(state.epoch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(start, total), unit="epoch", dynamic_ncols=True,
                   desc="gradient split")
    try:
        for e in range(start, total):
            t0 = time.perf_counter()
            state = splitter.begin_epoch(state)
            sums, weight = {}, 0.0
            for idx in _epoch_batches(splitter, state.key, e, len(labels)):
                x, y, w = _padded(images, labels, idx, splitter.cfg.batch_size)
                state, metrics = splitter.step(state, {"image": x, "label": y, "weight": w}, variables)
                k = float(len(idx))
                for name, val in jax.device_get(metrics).items():
                    sums[name] = sums.get(name, 0.0) + k * float(val)
                weight += k
            acc = splitter.evaluate(state, variables, v_images, v_labels)
            state = splitter.end_epoch(state, acc)
            entry = {"epoch": e, "phase": splitter.phase_of(e), "learning_rate": splitter.lr_of(e),
                     "loss": sums["loss"] / weight, "ce": sums["ce"] / weight,
                     "kept_fraction": sums["kept_fraction"] / weight,
                     "train_accuracy": sums["accuracy"] / weight, "valid_accuracy": acc,
                     "best_epoch": int(state.best_epoch), "time_s": time.perf_counter() - t0}
            history.append(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", valid=f"{acc:.4f}",
                                kept=f"{entry['kept_fraction']:.3f}", phase=entry["phase"])
            done = e + 1
            if ckpt_dir is not None and (done % checkpoint_every == 0 or done == total):
                path = ckpt_dir / f"{CKPT_PREFIX}{done:05d}"
                ckpt.save_pytree(path, {"state": state},
                                 {"record": record, "history": history, "epochs_done": done})
                for _, old in list_checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old, ignore_errors=True)
                if on_checkpoint is not None:
                    on_checkpoint(done)
    finally:
        if bar is not None:
            bar.close()
    return state, history


def _json_ready(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
