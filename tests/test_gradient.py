"""Gradient-trained kernel masks (jaxsplit/search/gradient.py)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import compose as compose_lib
from jaxsplit.config import Config, ConfigError, from_dict
from jaxsplit.graph import trace
from jaxsplit.masks import masked_apply
from jaxsplit.models.convnet import ConvLayerDef, ConvNet, random_params
from jaxsplit.search import driver as D
from jaxsplit.search import gradient as G
from jaxsplit.search.config import GradientConfig, SearchConfig

NUM_CLASSES = 3
# conv_3 adds conv_2's output: their masks are tied (one real vector, representative conv_2)
MODEL = ConvNet((ConvLayerDef(4), ConvLayerDef(6, pool=True), ConvLayerDef(4), ConvLayerDef(4, residual_from=2)),
                (), (0.0,), NUM_CLASSES, 1, 8)
CFG = GradientConfig(head_epochs=1, modular_epochs=3, cycle_mask_epochs=2, cycle_head_epochs=1,
                     batch_size=16, eval_batch_size=32, init="normal", init_scale=0.05)


@pytest.fixture(scope="module")
def toy():
    variables = {"params": random_params(MODEL, 0)}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(72, 8, 8, 1)).astype(np.float32)
    y = np.asarray(jnp.argmax(MODEL.apply(variables, x), -1)).astype(np.int32)
    splitter = G.GradSplitter.for_convnet(MODEL, cfg=CFG)
    return splitter, variables, x, y


def _batch(x, y):
    return {"image": jnp.asarray(x), "label": jnp.asarray(y), "weight": jnp.ones(len(y), jnp.float32)}


def test_straight_through_forward_and_backward():
    m = jnp.array([-2.0, -0.5, 0.0, 0.3, 5.0])
    w = jnp.array([-3.0, 0.5, 2.0, -0.2, 10.0])
    np.testing.assert_array_equal(G.straight_through(m), [0, 0, 0, 1, 1])
    g = jax.grad(lambda v: jnp.sum(w * G.straight_through(v)))(m)
    np.testing.assert_array_equal(g, np.float32([-1.0, 0.5, 1.0, -0.2, 1.0]))  # incoming gradient clipped
    np.testing.assert_array_equal(G.straight_through(m, "sigmoid"), [0, 0, 0, 1, 1])
    g = jax.grad(lambda v: jnp.sum(w * G.straight_through(v, "sigmoid")))(m)
    s = jax.nn.sigmoid(m)
    np.testing.assert_allclose(g, w * s * (1 - s), rtol=1e-6)
    with pytest.raises(G.GradientError, match="estimator"):
        G.straight_through(m, "tanh")


@dataclasses.dataclass(frozen=True)
class _Sites:
    """Three dense "sites" a, b, c with c tied to a: the duck API the searcher needs."""

    names: tuple = ("a", "b", "c")
    num_kernels: dict = dataclasses.field(default_factory=lambda: {"a": 5, "b": 3, "c": 5})
    ties: tuple = (("a", "c"),)
    free_layers: tuple = ("a", "b")

    def representative(self, name):
        return "a" if name == "c" else name


def _linear_apply(v, masks, x):  # (B, 5) -> (B, 3); every site multiplies its own channels
    return ((x * masks["a"]) @ v["wa"] + (x[:, :3] * masks["b"]) @ v["wb"]
            + (jnp.tanh(x) * masks["c"]) @ v["wc"])


def test_tied_sites_share_one_mask():
    rng = np.random.default_rng(1)
    v = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in [("wa", (5, 3)), ("wb", (3, 3)), ("wc", (5, 3))]}
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    splitter = G.GradSplitter(_Sites(), _linear_apply, 3, CFG)
    state = splitter.init(jax.random.key(0))
    assert sorted(state.masks) == ["a", "b"]  # the tied site c has no vector of its own
    free = {"a": jnp.ones((3, 5)).at[1, 2].set(0.0), "b": jnp.ones((3, 3))}
    got = jax.jit(splitter.scores)(v, free, state.heads, x)  # (B, C)
    module1 = lambda mc: splitter.apply_head(jax.tree_util.tree_map(lambda h: h[1], state.heads),
                                             _linear_apply(v, {"a": free["a"][1], "b": free["b"][1], "c": mc}, x))
    np.testing.assert_allclose(got[:, 1], module1(free["a"][1]), rtol=1e-6)  # c dropped kernel 2 too
    assert not np.allclose(got[:, 1], module1(jnp.ones(5)), rtol=1e-4)
    # the gradient of the one real vector collects both sites' contributions
    g_tied = jax.jit(jax.grad(lambda m: jnp.sum(splitter.scores(v, {**free, "a": m}, state.heads, x))))(free["a"])

    def two_sites(ma, mc):
        full = {"a": ma, "b": free["b"], "c": mc}
        logits = jax.vmap(lambda mk: _linear_apply(v, mk, x))(full)  # (C, B, N)
        return jnp.sum(jax.vmap(splitter.apply_head)(state.heads, logits))

    ga, gc = jax.jit(jax.grad(two_sites, argnums=(0, 1)))(free["a"], free["a"])
    np.testing.assert_allclose(g_tied, ga + gc, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gc).sum()) > 0 and float(jnp.abs(ga).sum()) > 0
    res = splitter.result(state)
    assert sorted(res.masks) == ["a", "b", "c"]
    np.testing.assert_array_equal(res.masks["a"], res.masks["c"])
    # and on a ConvNet: conv_3 adds conv_2's output, so only conv_0..2 have vectors
    conv = G.GradSplitter.for_convnet(MODEL, cfg=CFG)
    assert conv.free == ("conv_0", "conv_1", "conv_2") and conv.rep["conv_3"] == "conv_2"


def test_head_shapes(toy):
    splitter, variables, x, _ = toy
    heads = splitter.init_heads(jax.random.key(1))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, heads)
    assert shapes == {"dense_0": {"kernel": (3, 3, 10), "bias": (3, 10)},
                      "dense_1": {"kernel": (3, 10, 1), "bias": (3, 1)}}
    bound = 1 / np.sqrt(NUM_CLASSES)  # PyTorch's default Linear init
    assert float(jnp.abs(heads["dense_0"]["kernel"]).max()) <= bound
    state = splitter.init(jax.random.key(0))
    bits = {k: (v > 0).astype(jnp.float32) for k, v in state.masks.items()}
    scores = jax.jit(splitter.scores)(variables, bits, state.heads, x[:5])
    assert scores.shape == (5, NUM_CLASSES)
    assert bool(jnp.all((scores > 0) & (scores < 1)))  # sigmoid scores
    none = G.GradSplitter.for_convnet(MODEL, cfg=dataclasses.replace(CFG, head="none"))
    assert none.init_heads(jax.random.key(1)) == {}


def test_step_lowers_the_loss_and_trains_masks_only_in_mask_phases(toy):
    splitter, variables, x, y = toy
    batch = _batch(x[:16], y[:16])  # cfg.batch_size: the step train() compiles
    state = splitter.begin_epoch(splitter.init(jax.random.key(0)))
    assert int(state.phase) == 0 and float(state.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.01)
    trainable = lambda s: {"masks": s.masks, "heads": s.heads}
    loss = jax.jit(splitter.loss)
    before, _ = loss(trainable(state), state.phase, variables, batch)
    new, metrics = splitter.step(state, batch, variables)
    after, _ = loss(trainable(new), new.phase, variables, batch)
    assert float(after) < float(before) and float(metrics["loss"]) == pytest.approx(float(before), rel=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new.masks, state.masks)  # heads-only phase
    # a mask phase (fresh optimiser, lr_modular) moves the masks and lowers the loss too
    mask_state = splitter.begin_epoch(new.replace(epoch=jnp.asarray(1, jnp.int32)))
    assert int(mask_state.phase) == 1 and int(mask_state.opt_state.count) == 0
    before, _ = loss(trainable(mask_state), mask_state.phase, variables, batch)
    moved, _ = splitter.step(mask_state, batch, variables)
    after, _ = loss(trainable(moved), moved.phase, variables, batch)
    assert float(after) < float(before)
    assert any(not np.array_equal(moved.masks[k], mask_state.masks[k]) for k in moved.masks)


def test_all_ones_masks_reproduce_the_model(toy):
    splitter, variables, x, y = toy
    ones = {k: jnp.ones((NUM_CLASSES, n)) for k, n in [("conv_0", 4), ("conv_1", 6), ("conv_2", 4)]}
    logits = jax.jit(MODEL.apply)(variables, x)
    # no head: module c's score is the masked model's class-c logit, so scores == logits exactly
    none = G.GradSplitter.for_convnet(MODEL, cfg=dataclasses.replace(CFG, head="none"))
    np.testing.assert_array_equal(jax.jit(none.scores)(variables, ones, {}, x), logits)
    assert none.evaluate(ones, variables, x, y) == 1.0  # y are the model's own predictions
    # identity-like heads: score_c = sigmoid(relu(logit_c)), monotone in logit_c where it is > 0,
    # so the ensemble's argmax equals the model's on every input whose top logit is positive
    c = NUM_CLASSES
    k0 = jnp.zeros((c, c, 10)).at[jnp.arange(c), jnp.arange(c), 0].set(1.0)
    heads = {"dense_0": {"kernel": k0, "bias": jnp.zeros((c, 10))},
             "dense_1": {"kernel": jnp.zeros((c, 10, 1)).at[:, 0, 0].set(1.0), "bias": jnp.zeros((c, 1))}}
    scores = jax.jit(splitter.scores)(variables, ones, heads, x)
    np.testing.assert_allclose(scores, jax.nn.sigmoid(jax.nn.relu(logits)), rtol=1e-6)
    positive = np.asarray(logits.max(-1) > 0)
    assert positive.sum() >= 20
    np.testing.assert_array_equal(np.argmax(scores, -1)[positive], y[positive])


def test_module_score_plugs_into_compose(toy):
    splitter, variables, x, _ = toy
    state = splitter.init(jax.random.key(0))
    res = splitter.result(state)
    assert res.masks["conv_1"].shape == (NUM_CLASSES, 6) and res.masks["conv_1"].dtype == bool
    module = functools.partial(splitter.module_score, variables, res.head_params_of(2), res.mask_of(2))
    weak = lambda xb: jnp.zeros((xb.shape[0], 4))
    patched = jax.jit(compose_lib.compose(weak, module))
    out = patched(x[:6])
    assert out.shape == (6, 4)
    np.testing.assert_allclose(out[:, -1], splitter.module_apply(res, variables, 2)(x[:6]), rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], 1 / 4, rtol=1e-6)


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for u, v in zip(la, lb):
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


class _Killed(Exception):
    pass


def test_kill_and_resume_is_bit_identical(toy, tmp_path):
    splitter, variables, x, y = toy
    data, valid = (x[:56], y[:56]), (x[56:], y[56:])
    full, hist = G.train(splitter, splitter.init(jax.random.key(3)), variables, data, valid)
    assert len(hist) == 4 and [h["phase"] for h in hist] == [0, 1, 1, 0]

    def kill(done):
        raise _Killed(done)

    with pytest.raises(_Killed):  # killed right after the first checkpoint (2 epochs done)
        G.train(splitter, splitter.init(jax.random.key(3)), variables, data, valid,
                checkpoint_dir=tmp_path / "b", checkpoint_every=2, on_checkpoint=kill)
    assert [d for d, _ in G.list_checkpoints(tmp_path / "b")] == [2]
    with pytest.raises(G.GradientError, match="resume=True"):
        G.train(splitter, splitter.init(jax.random.key(3)), variables, data, valid,
                checkpoint_dir=tmp_path / "b", checkpoint_every=2)
    resumed, hist_r = G.train(splitter, splitter.init(jax.random.key(3)), variables, data, valid,
                              checkpoint_dir=tmp_path / "b", checkpoint_every=2, resume=True)
    _assert_same(full, resumed)
    strip = lambda h: [{k: v for k, v in e.items() if k != "time_s"} for e in h]
    assert strip(hist) == strip(hist_r)
    res = splitter.result(resumed)
    accs = [h["valid_accuracy"] for h in hist]
    assert res.best_epoch == max(i for i, a in enumerate(accs) if a == max(accs))  # last best (>=)
    assert res.best_valid_accuracy == pytest.approx(max(accs))
    # a different schedule refuses the checkpoint
    other = G.GradSplitter.for_convnet(MODEL, cfg=dataclasses.replace(CFG, alpha=0.2))
    with pytest.raises(G.GradientError, match="other settings"):
        G.train(other, other.init(jax.random.key(3)), variables, data, valid,
                checkpoint_dir=tmp_path / "b", resume=True)


def test_config_defaults_validation_and_ga_fingerprint():
    cfg = GradientConfig()
    assert (cfg.alpha, cfg.batch_size, cfg.head_epochs, cfg.modular_epochs, cfg.lr_head_warmup,
            cfg.lr_head, cfg.lr_modular, cfg.init, cfg.estimator, cfg.head) == (
        0.1, 64, 5, 140, 0.01, 0.001, 0.001, "ones", "hardtanh", "mlp")
    phases = cfg.phases()
    assert len(phases) == 145 and phases[:12] == (0,) * 5 + (1,) * 5 + (0, 0) and sum(phases) == 100
    assert SearchConfig().method == "ga"
    for bad, key in [({"method": "sgd"}, "search.method"),
                     ({"gradient": {"alpha": -1}}, "search.gradient.alpha"),
                     ({"gradient": {"batch_size": 0}}, "search.gradient.batch_size"),
                     ({"gradient": {"lr": 0.1}}, "search.gradient.lr"),
                     ({"gradient": {"head": "linear"}}, "search.gradient.head")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict(Config, {"search": bad})
    loaded = from_dict(Config, {"search": {"method": "gradient", "gradient": {"modular_epochs": 14}}})
    assert loaded.search.gradient.num_epochs == 19
    # GA fingerprints do not see the gradient settings (old GA checkpoints still resume)
    params = {"w": np.zeros(2, np.float32)}
    fp = D.fingerprint(Config(), {"width": 1.0}, params)
    assert "method" not in fp["search"] and "gradient" not in fp["search"]
    fp_g = D.fingerprint(loaded, {"width": 1.0}, params)
    assert fp_g["search"]["method"] == "gradient" and fp_g["search"]["gradient"]["modular_epochs"] == 14


class _BNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU twice, global average pooling, Dense: a kernel-graph model."""

    @nn.compact
    def __call__(self, x, train=False):
        for i, f in enumerate((4, 6)):
            x = nn.Conv(f, (3, 3), name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Dense(NUM_CLASSES, name="head")(x.mean(axis=(1, 2)))


def test_batchnorm_model_through_the_kernel_graph(toy):
    _, _, x, _ = toy
    net = _BNNet()
    v = net.init(jax.random.key(0), x[:2])
    v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(lambda a: a + 0.5, v["batch_stats"])}
    apply = functools.partial(net.apply, train=False)
    graph = trace(apply, v, x[:2])
    splitter = G.GradSplitter.for_graph(graph, apply, CFG)
    assert splitter.free == ("conv0", "conv1") and splitter.num_classes == NUM_CLASSES
    # the real-valued masked apply equals the graph's boolean one (exact removal) on binary masks
    drop = {"conv0": jnp.ones(4, bool).at[1].set(False), "conv1": jnp.ones(6, bool).at[4].set(False)}
    fn = jax.jit(G.graph_masked_apply(graph, apply))
    np.testing.assert_array_equal(fn(v, {k: m.astype(jnp.float32) for k, m in drop.items()}, x),
                                  jax.jit(masked_apply(graph, apply))(v, drop, x))
    np.testing.assert_allclose(fn(v, {k: jnp.ones(n) for k, n in graph.num_kernels.items()}, x),
                               apply(v, x), rtol=1e-5, atol=1e-5)
    # one mask-phase step: the masks get a gradient through BatchNorm, the variables stay frozen
    y = jnp.argmax(apply(v, x), -1)
    state = splitter.begin_epoch(splitter.init(jax.random.key(0)).replace(epoch=jnp.asarray(1, jnp.int32)))
    assert int(state.phase) == 1
    new, metrics = splitter.step(state, _batch(x[:16], y[:16]), v)
    assert all(not np.array_equal(new.masks[k], state.masks[k]) for k in new.masks)
    assert np.isfinite(float(metrics["loss"]))


def test_modularize_with_method_gradient(tmp_path):
    from jaxsplit import checkpoint as ckpt
    from jaxsplit import config as jconfig
    from jaxsplit import pipeline
    from jaxsplit.data.dataset import Dataset
    from jaxsplit.search import gradient_driver as GD

    cfg = jconfig.from_dict(jconfig.Config, {
        "name": "g", "model": {"name": "weak_cnn", "width": 0.125}, "data": {"image_size": 8},
        "search": {"method": "gradient", "checkpoint_every": 1, "seed": 1,
                   "gradient": {"head_epochs": 1, "modular_epochs": 2, "cycle_mask_epochs": 1,
                                "cycle_head_epochs": 1, "batch_size": 32}}})
    model = pipeline.build_model(cfg.model, NUM_CLASSES, 1, cfg.data.image_size)
    params = random_params(model, 2)
    ckpt.save_model(tmp_path, params, cfg, {}, model=model)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(96, cfg.data.image_size, cfg.data.image_size, 1)).astype(np.float32)
    y = np.asarray(jnp.argmax(jax.jit(model.apply)({"params": params}, x), -1))
    ds = lambda s: Dataset.from_arrays(x[s], y[s], num_classes=NUM_CLASSES)
    data = (ds(slice(0, 64)), ds(slice(64, 80)), ds(slice(80, 96)))
    summary = D.run_modularize(tmp_path, cfg, progress=False, data=data)
    out = tmp_path / "modularize"
    assert {"masks.npz", "heads.npz", "modules.npz", "history.json", "summary.json",
            "config.yaml"} <= {p.name for p in out.iterdir()}
    assert [d for d, _ in G.list_checkpoints(out / "search_ckpt")] == [2, 3]
    assert summary["method"] == "gradient" and summary["epochs_run"] == 3
    assert summary["model_valid_accuracy"] == 1.0 and 0.0 <= summary["ensemble_valid_accuracy"] <= 1.0
    masks, heads = GD.load_modules(tmp_path)
    spec = model.conv_spec()
    assert {k: v.shape for k, v in masks.items()} == {n: (NUM_CLASSES, spec.num_kernels[n]) for n in spec.names}
    assert heads["dense_0"]["kernel"].shape == (NUM_CLASSES, NUM_CLASSES, 10)
    assert summary["gradient"]["modular_epochs"] == 2 and summary["seed"] == 1
    assert summary["source_model"]["params_sha256"] == ckpt.params_digest(params)
    from jaxsplit.modularize import Modules

    loaded = ckpt.load_model(tmp_path)
    modules = Modules.load(out / "modules.npz", trace(loaded.apply_fn, loaded.variables, x[:1]),
                           apply_fn=loaded.apply_fn, variables=loaded.variables)
    assert modules.method == "gradient" and modules.info["search"]["gradient"]["modular_epochs"] == 2
    _assert_same(modules.heads, heads)
    for k, m in masks.items():
        np.testing.assert_array_equal(modules.masks[k], m)
    with pytest.raises(D.SearchError, match="resume"):
        D.run_modularize(tmp_path, cfg, progress=False, data=data)
    again = D.run_modularize(tmp_path, cfg, resume=True, progress=False, data=data)  # already finished
    assert again["ensemble_valid_accuracy"] == summary["ensemble_valid_accuracy"]


@pytest.fixture(scope="module")
def bn_modules(toy):
    """Gradient modules of `_BNNet` (random masks and heads) and the splitter that scores them."""
    from jaxsplit.modularize import Modules

    _, _, x, _ = toy
    net = _BNNet()
    v = net.init(jax.random.key(0), x[:2])
    params = {**v["params"], "head": {**v["params"]["head"], "kernel": 20.0 * v["params"]["head"]["kernel"]}}
    v = {"params": params, "batch_stats": jax.tree_util.tree_map(lambda a: a + 0.5, v["batch_stats"])}
    apply = functools.partial(net.apply, train=False)
    graph = trace(apply, v, x[:2])
    splitter = G.GradSplitter.for_graph(graph, apply, CFG)
    # init="normal": about half the kernels kept; the first key whose modules keep a kernel of
    # every site (module stats and extraction need one)
    state = next(s for s in map(splitter.init, map(jax.random.key, range(5, 50)))
                 if all(np.asarray(m > 0).any(-1).all() for m in s.masks.values()))
    # heads far from their init, so each module's score varies with the input
    leaves, tree = jax.tree_util.tree_flatten(state.heads)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    heads = tree.unflatten([3.0 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    heads = {k: {**h, "bias": jnp.zeros_like(h["bias"])} for k, h in heads.items()}
    # and each module's head logit centred on these images (so the argmax varies over them)
    bits = {k: (m > 0).astype(jnp.float32) for k, m in state.masks.items()}
    probs = jax.jit(splitter.scores)(v, bits, heads, x)
    mean = jnp.mean(jnp.log(probs) - jnp.log1p(-probs), axis=0)  # (C,) mean pre-sigmoid logit
    heads["dense_1"]["bias"] = -mean[:, None]
    state = state.replace(heads=heads, best_heads=heads)
    result = splitter.result(state)
    modules = Modules.from_gradient(splitter, result, apply, v, class_names=("a", "b", "c"),
                                    history=[{"epoch": 0, "valid_accuracy": 0.5}])
    return splitter, result, modules, state, x


def test_gradient_modules_score_is_the_head_logit_and_argmax_is_the_ensemble(bn_modules):
    splitter, result, modules, state, x = bn_modules
    assert modules.method == "gradient" and modules.info["gradient"]["alpha"] == CFG.alpha
    assert modules.info["search"]["method"] == "gradient" and modules.info["best_epoch"] == -1
    assert modules.heads["dense_0"]["kernel"].shape == (NUM_CLASSES, NUM_CLASSES, CFG.head_hidden)
    assert 0 < modules.stats[0]["kept_kernels"] < splitter.total_kernels
    bits = {k: (v > 0).astype(jnp.float32) for k, v in state.masks.items()}
    probs = np.asarray(jax.jit(splitter.scores)(modules.variables, bits, state.heads, x))  # (B, C) sigmoids
    logits = np.stack([np.asarray(modules.apply(c)(x)) for c in range(NUM_CLASSES)], -1)
    np.testing.assert_allclose(jax.nn.sigmoid(logits), probs, rtol=1e-5, atol=1e-6)  # float32 rounding
    assert not np.allclose(logits, np.asarray(modules.apply(0, all_logits=True)(x)), atol=1e-3)
    # argmax over the per-class logits is the ensemble's prediction (no sigmoid ties here)
    top = np.sort(probs, -1)
    assert np.all(top[:, -1] > top[:, -2])
    pred = np.argmax(logits, -1)
    np.testing.assert_array_equal(pred, np.argmax(probs, -1))
    labels = np.arange(len(x)) % NUM_CLASSES
    assert len(set(pred.tolist())) > 1
    assert splitter.evaluate({k: result.masks[k] for k in splitter.free}, modules.variables, x, labels,
                             heads=state.heads) == pytest.approx(np.mean(pred == labels), abs=1e-9)
    # physically extracted: the same score within float32 rounding, with fewer weights
    for c in range(NUM_CLASSES):
        module_apply, module_vars = modules.extract(c)
        from jaxsplit.modularize import HEAD_KEY
        np.testing.assert_array_equal(module_vars[HEAD_KEY]["dense_1"]["bias"], modules.heads["dense_1"]["bias"][c])
        kept = int(modules.masks["conv1"][c].sum())
        assert module_vars["params"]["conv1"]["kernel"].shape[-1] == kept < 6
        np.testing.assert_allclose(np.asarray(jax.jit(module_apply)(module_vars, x)), logits[:, c],
                                   rtol=1e-5, atol=1e-5)


def test_gradient_modules_file_round_trips_heads_and_reads_version_1(bn_modules, tmp_path):
    import json

    from jaxsplit.modularize import HEADER_KEY, Modules, ModulesFileError

    _, _, modules, _, x = bn_modules
    path = modules.save(tmp_path / "modules.npz")
    with np.load(path) as z:
        header = json.loads(z[HEADER_KEY].tobytes().decode())
        names = sorted(k for k in z.files if k.startswith("head/"))
    assert header["format_version"] == 2 and header["method"] == "gradient"
    assert names == ["head/dense_0/bias", "head/dense_0/kernel", "head/dense_1/bias", "head/dense_1/kernel"]
    loaded = Modules.load(path, modules.graph, apply_fn=modules.apply_fn, variables=modules.variables)
    assert loaded.method == "gradient" and loaded.info == json.loads(json.dumps(modules.info))
    _assert_same(loaded.heads, modules.heads)
    assert loaded.heads["dense_0"]["kernel"].dtype == np.float32
    for k in modules.masks:
        np.testing.assert_array_equal(loaded.masks[k], modules.masks[k])
    np.testing.assert_array_equal(np.asarray(loaded.apply(2)(x)), np.asarray(modules.apply(2)(x)))
    # modules without heads are still written (and read) as version 1: each module's class logit
    info = {k: v for k, v in modules.info.items() if k != "method"}  # as files before the field
    plain = dataclasses.replace(modules, heads=None, info=info).save(tmp_path / "v1.npz")
    with np.load(plain) as z:
        arrays = {k: z[k] for k in z.files}
    assert json.loads(arrays[HEADER_KEY].tobytes().decode())["format_version"] == 1
    old = Modules.load(plain, modules.graph, apply_fn=modules.apply_fn, variables=modules.variables)
    assert old.method == "ga" and old.heads is None
    np.testing.assert_array_equal(np.asarray(old.apply(1)(x)),
                                  np.asarray(modules.apply(1, all_logits=True)(x))[:, 1])
    # a version-1 file cannot carry heads; heads must have one row per class
    arrays["head/dense_0/bias"] = np.zeros((NUM_CLASSES, 10), np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ModulesFileError, match="format version 1; heads need version 2"):
        Modules.load(tmp_path / "bad.npz", modules.graph)
    with pytest.raises(Exception, match=r"head array 'dense_0/bias' has shape \(2, 10\); expected a "
                                        r"leading axis of 3"):
        dataclasses.replace(modules, heads={"dense_0": {"bias": np.zeros((2, 10), np.float32)}})


def test_gradient_modules_of_a_convnet_score_as_the_splitter(toy):
    from jaxsplit.models import inference_apply
    from jaxsplit.modularize import Modules

    splitter, variables, x, _ = toy
    apply = inference_apply(MODEL)
    graph = trace(apply, variables, x[:1])
    state = next(s for s in map(splitter.init, map(jax.random.key, range(2, 50)))
                 if all(np.asarray(m > 0).any(-1).all() for m in s.masks.values()))
    modules = Modules.from_gradient(splitter, splitter.result(state), apply, variables, graph=graph)
    assert modules.graph is graph and set(modules.masks) == set(graph.names)
    bits = {k: (v > 0).astype(jnp.float32) for k, v in state.masks.items()}
    probs = jax.jit(splitter.scores)(variables, bits, state.heads, x)  # the ConvNet's own masking
    for c in range(NUM_CLASSES):
        np.testing.assert_allclose(jax.nn.sigmoid(modules.apply(c)(x)), probs[:, c], rtol=1e-6, atol=1e-7)
    with pytest.raises(Exception, match="sites"):
        Modules.from_gradient(splitter, splitter.result(state)._replace(masks={"x": np.ones((3, 2), bool)}),
                              apply, variables, graph=graph)


def test_a_module_that_dropped_a_whole_site_keeps_its_closest_kernel(toy):
    splitter, *_ = toy
    state = splitter.init(jax.random.key(0))
    real = {k: np.asarray(v).copy() for k, v in state.masks.items()}
    site = splitter.free[1]
    real[site][1] = -1.0  # class 1 keeps nothing at this site ...
    real[site][1, 2] = -0.25  # ... and kernel 2 is the closest to being kept
    state = state.replace(masks={k: jnp.asarray(v) for k, v in real.items()},
                          best_masks={k: jnp.asarray(v > 0) for k, v in real.items()})
    result, repairs = splitter.keep_one_per_site(state, splitter.result(state))
    assert repairs == [{"class": 1, "site": site, "kernel": 2}]
    assert result.masks[site][1].tolist() == [k == 2 for k in range(splitter.num_kernels[site])]
    for n in splitter.names:  # every other row as it was; tied sites follow their representative
        ref = real[splitter.rep[n]] > 0
        ref[1] = result.masks[site][1] if splitter.rep[n] == site else ref[1]
        np.testing.assert_array_equal(result.masks[n], ref)
    assert result.kept_fraction[1] > splitter.result(state).kept_fraction[1]
    untouched, none = splitter.keep_one_per_site(state, result)
    assert none == [] and untouched is result


def test_jaxsplit_modularize_with_method_gradient_in_memory(toy):
    import jaxsplit

    _, _, x, y = toy
    net = _BNNet()
    v = net.init(jax.random.key(0), x[:2])
    apply = functools.partial(net.apply, train=False)
    y = np.asarray(jnp.argmax(apply(v, x), -1)).astype(np.int32)
    search = SearchConfig(method="gradient", gradient=dataclasses.replace(CFG, init="ones"))
    mods = jaxsplit.modularize(apply, v, (x[:32], y[:32]), search=search, train_data=(x, y),
                               key=jax.random.key(3), class_names=("a", "b", "c"))
    assert mods.method == "gradient" and mods.heads is not None and mods.class_names == ("a", "b", "c")
    assert mods.info["gradient"]["modular_epochs"] == CFG.modular_epochs
    assert len(mods.history) == CFG.head_epochs + CFG.modular_epochs
    module_apply, module_vars = mods.extract(1)  # the head's logit on the extracted module
    np.testing.assert_allclose(np.asarray(module_apply(module_vars, x[:8])),
                               np.asarray(mods.apply(1)(x[:8])), rtol=1e-5, atol=1e-5)
    with pytest.raises(jaxsplit.modularize.ModularizeError, match="train_data"):
        jaxsplit.modularize(apply, v, (x, y), search=search)
    with pytest.raises(jaxsplit.modularize.ModularizeError, match="for the GA"):
        jaxsplit.modularize(apply, v, (x, y), search=search, train_data=(x, y), family="simcnn")
    with pytest.raises(jaxsplit.modularize.ModularizeError, match="train_data is for"):
        jaxsplit.modularize(apply, v, (x, y), train_data=(x, y))
    with pytest.raises(jaxsplit.modularize.ModularizeError, match="drive the GA"):
        jaxsplit.modularize_init(None, apply, v, (x, y), search=search)


def test_for_model_keeps_the_reference_masking_for_a_convnet(toy):
    from jaxsplit.graph import Graph
    from jaxsplit.models.convnet import ConvSpec

    _, variables, x, _ = toy
    convnet = G.GradSplitter.for_model(trace(MODEL.apply, variables, x[:2]), MODEL.apply, CFG)
    assert isinstance(convnet.sites, ConvSpec)  # for_convnet: post-ReLU masking before the pool
    net = _BNNet()
    v = net.init(jax.random.key(0), x[:2])
    apply = functools.partial(net.apply, train=False)
    other = G.GradSplitter.for_model(trace(apply, v, x[:2]), apply, CFG)
    assert isinstance(other.sites, Graph)
