"""Tests for jaxsplit.interop: PyTorch state_dict <-> jaxsplit params, reference layouts."""

import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsplit.models import ConvLayerDef, ConvNet, random_params, rescnn, simcnn, weak_cnn

TOL = 1e-4


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def conv(torch):
    from jaxsplit.interop import torch as conv_module

    return conv_module


@pytest.fixture(scope="module")
def tm(torch):
    from jaxsplit.interop import torch_models

    return torch_models


def _randomize(torch, net, seed):
    """He-normal weights and small random biases, so logits are O(1) (torch's default init
    gives tiny logits, which would make an absolute tolerance weak)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight"):
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval()


def _images(model, seed, num=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num, model.image_size, model.image_size, model.in_channels)).astype(
        np.float32)


def _torch_logits(torch, net, x_nhwc, **kw):
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), **kw).numpy()


def _jax_logits(model, params, x_nhwc, masks=None):
    return np.asarray(model.apply({"params": params}, x_nhwc, masks=masks))


def _assert_close_logits(a, b):
    assert a.shape == b.shape
    assert np.abs(b).max() > 0.1  # the comparison is not between near-zero outputs
    np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)


def _make_weak_reference(torch):
    """A hand-written 2-conv weak CNN (16x16 -> 4x4x8 last map), independent of TorchConvNet."""
    nn = torch.nn

    class Weak(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_0 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv_1 = nn.Conv2d(4, 8, 3, padding=1)
            self.fc_2 = nn.Linear(8 * 4 * 4, 6)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.conv_0(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv_1(x)), 2)
            return self.fc_2(torch.flatten(x, 1))

    return Weak(), weak_cnn(num_classes=6, in_channels=3, widths=(4, 8), image_size=16)


def _extracted_model(hidden=(7,)):
    """An extracted-module-like layout: uneven widths, one residual add, a 4x4 last map."""
    convs = (ConvLayerDef(3), ConvLayerDef(5, pool=True), ConvLayerDef(2),
             ConvLayerDef(5, residual_from=1), ConvLayerDef(4, pool=True))
    return ConvNet(convs, hidden, (0.3,) * (len(hidden) + 1), num_classes=4, in_channels=1,
                   image_size=16)


# ---------------------------------------------------------------------------------------------
# Importability without torch.


def test_interop_package_does_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes any `import torch` fail
        "import jaxsplit, jaxsplit.interop\n"
        "try:\n"
        "    jaxsplit.interop.load_state_dict\n"
        "except ImportError:\n"
        "    print('lazy-import-error')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lazy-import-error" in out.stdout


# ---------------------------------------------------------------------------------------------
# Reference key names and shapes (docs/method.md §1), at full width on the meta device (no memory).


@pytest.mark.torch
def test_torch_simcnn_has_reference_keys_and_shapes(torch, tm, conv):
    with torch.device("meta"):
        net = tm.TorchSimCNN(num_classes=10, in_channels=3)
    sd = net.state_dict()
    expected = {f"conv_{i}.{p}" for i in range(13) for p in ("weight", "bias")}
    expected |= {f"fc_{j}.{p}" for j in (13, 14, 15) for p in ("weight", "bias")}
    assert set(sd) == expected
    assert sd["conv_0.weight"].shape == (64, 3, 3, 3)
    assert sd["conv_7.weight"].shape == (512, 256, 3, 3)
    assert sd["fc_13.weight"].shape == (512, 512)
    assert sd["fc_15.weight"].shape == (10, 512)
    # jaxsplit's simcnn expects exactly these keys and shapes.
    slots = conv.layout(simcnn(10, 3), "simcnn")
    assert {k: s.torch_shape for k, s in slots.items()} == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.torch
def test_torch_rescnn_has_reference_keys_and_shapes(torch, tm, conv):
    with torch.device("meta"):
        net = tm.TorchResCNN(num_classes=10, in_channels=3)
    sd = net.state_dict()
    expected = {f"conv_{i}.0.{p}" for i in range(12) for p in ("weight", "bias")}
    expected |= {"classifier.2.weight", "classifier.2.bias"}
    assert set(sd) == expected
    assert sd["conv_1.0.weight"].shape == (128, 64, 3, 3)
    assert sd["conv_5.0.weight"].shape == (512, 256, 3, 3)
    assert sd["classifier.2.weight"].shape == (10, 512)
    slots = conv.layout(rescnn(10, 3), "rescnn")
    assert {k: s.torch_shape for k, s in slots.items()} == {k: tuple(v.shape) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# Torch reference weights -> jaxsplit: same logits.

REFERENCE_CASES = {
    "simcnn32": ("TorchSimCNN", dict(num_classes=10, in_channels=3, width=0.0625)),
    "simcnn64_grey": ("TorchSimCNN", dict(num_classes=5, in_channels=1, width=0.0625,
                                          image_size=64)),  # 2x2 last map
    "rescnn32": ("TorchResCNN", dict(num_classes=10, in_channels=3, width=0.0625)),
    "rescnn64_grey": ("TorchResCNN", dict(num_classes=3, in_channels=1, width=0.0625,
                                          image_size=64)),
}


def _reference_pair(tm, case):
    cls, kw = REFERENCE_CASES[case]
    factory = simcnn if cls == "TorchSimCNN" else rescnn
    return getattr(tm, cls)(**kw), factory(**kw)


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_reference_weights_give_same_logits(torch, tm, conv, case):
    net, model = _reference_pair(tm, case)
    _randomize(torch, net, seed=len(case))
    params = conv.state_dict_to_params(net.state_dict(), model)
    x = _images(model, seed=1)
    _assert_close_logits(_jax_logits(model, params, x), _torch_logits(torch, net, x))


@pytest.mark.torch
def test_weak_cnn_with_4x4_last_map_needs_and_gets_the_nchw_permutation(torch, conv):
    net, model = _make_weak_reference(torch)
    _randomize(torch, net, seed=3)
    params = conv.state_dict_to_params(net.state_dict(), model)
    x = _images(model, seed=2, num=4)
    expected = _torch_logits(torch, net, x)
    _assert_close_logits(_jax_logits(model, params, x), expected)
    # A plain transpose of the first Linear (no row permutation) would be wrong here.
    naive = dict(params, fc_2=dict(params["fc_2"], kernel=net.fc_2.weight.detach().numpy().T))
    assert np.abs(_jax_logits(model, naive, x) - expected).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# jaxsplit -> torch: torch_model_from_jax and the reference classes.


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_jax_weights_load_into_reference_classes(torch, tm, conv, case):
    net, model = _reference_pair(tm, case)
    params = random_params(model, len(case))
    net.load_state_dict(conv.params_to_state_dict(params, model), strict=True)
    net.eval()
    x = _images(model, seed=5)
    _assert_close_logits(_torch_logits(torch, net, x), _jax_logits(model, params, x))


@pytest.mark.torch
@pytest.mark.parametrize("style", ["simcnn", "rescnn"])
@pytest.mark.parametrize("hidden", [(7,), ()])
def test_torch_model_from_jax_matches_extracted_layout(torch, tm, conv, style, hidden):
    model = _extracted_model(hidden)
    net = _randomize(torch, tm.torch_model_from_jax(model, style=style), seed=7)
    assert net.style == style
    params = conv.state_dict_to_params(net.state_dict(), model)
    x = _images(model, seed=3)
    _assert_close_logits(_jax_logits(model, params, x), _torch_logits(torch, net, x))
    # Masks act the same way on both sides.
    rng = np.random.default_rng(0)
    masks = {f"conv_{i}": rng.random(d.features) < 0.6 for i, d in enumerate(model.convs)}
    masks["conv_3"] = masks["conv_1"]  # tied by the residual add
    torch_masks = {k: torch.from_numpy(v) for k, v in masks.items()}
    np.testing.assert_allclose(_jax_logits(model, params, x, masks),
                               _torch_logits(torch, net, x, masks=torch_masks),
                               atol=TOL, rtol=TOL)


@pytest.mark.torch
def test_torch_model_from_jax_auto_style_and_keys(tm):
    assert tm.torch_model_from_jax(simcnn(width=0.0625)).style == "simcnn"
    assert tm.torch_model_from_jax(weak_cnn(width=0.125)).style == "simcnn"
    net = tm.torch_model_from_jax(rescnn(width=0.0625))
    assert net.style == "rescnn"
    assert {k for k in net.state_dict() if k.startswith("classifier")} == {
        "classifier.2.weight", "classifier.2.bias"}
    two_fc = tm.torch_model_from_jax(_extracted_model((7,)), style="rescnn")
    assert {k for k in two_fc.state_dict() if k.startswith("classifier")} == {
        "classifier.2.weight", "classifier.2.bias", "classifier.5.weight", "classifier.5.bias"}
    with pytest.raises(TypeError, match="ConvNet"):
        tm.torch_model_from_jax("simcnn")
    with pytest.raises(ValueError, match="style"):
        tm.torch_model_from_jax(simcnn(width=0.0625), style="vgg")


# ---------------------------------------------------------------------------------------------
# Round trips.

ROUND_TRIP_MODELS = {
    "simcnn": lambda: simcnn(num_classes=10, in_channels=3, width=0.0625),
    "rescnn": lambda: rescnn(num_classes=10, in_channels=1, width=0.0625),
    "weak": lambda: weak_cnn(num_classes=6, in_channels=3, widths=(4, 8), image_size=16,
                             hidden=(9,)),
    "extracted": _extracted_model,
}


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(ROUND_TRIP_MODELS))
@pytest.mark.parametrize("style", ["auto", "simcnn", "rescnn"])
def test_round_trip_is_bit_exact(torch, conv, name, style):
    model = ROUND_TRIP_MODELS[name]()
    for seed in range(3):
        params = random_params(model, seed)
        sd = conv.params_to_state_dict(params, model, style=style)
        back = conv.state_dict_to_params(sd, model)  # style detected from the keys
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
            assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
        again = conv.params_to_state_dict(back, model, style=style)
        assert list(again) == list(sd)
        assert all(torch.equal(sd[k], again[k]) for k in sd)


@pytest.mark.torch
def test_params_to_state_dict_styles(conv):
    model = rescnn(width=0.0625)
    params = random_params(model, 0)
    assert "classifier.2.weight" in conv.params_to_state_dict(params, model)  # auto
    flat = conv.params_to_state_dict(params, model, style="simcnn")
    assert "fc_12.weight" in flat and "conv_0.weight" in flat
    assert conv.detect_style(flat) == "simcnn"
    with pytest.raises(ValueError, match="style"):
        conv.params_to_state_dict(params, model, style="resnet")


# ---------------------------------------------------------------------------------------------
# Files.


@pytest.mark.torch
def test_save_and_load_pth(torch, conv, tmp_path):
    model = _extracted_model()
    params = random_params(model, 1)
    path = tmp_path / "sub" / "module.pth"
    conv.save_state_dict(params, model, path)
    loaded = conv.load_state_dict(path, model)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.torch
@pytest.mark.parametrize("wrap", ["state_dict", "model", "dataparallel"])
def test_load_accepts_common_checkpoint_wrappers(torch, tm, conv, tmp_path, wrap):
    model = weak_cnn(num_classes=6, in_channels=3, widths=(4, 8), image_size=16)
    net = _randomize(torch, tm.torch_model_from_jax(model), seed=2)
    sd = net.state_dict()
    if wrap == "dataparallel":
        obj = {"module." + k: v for k, v in sd.items()}
    else:
        obj = {wrap: sd, "epoch": 12, "best_acc": 0.5}
    torch.save(obj, tmp_path / "ckpt.pt")
    params = conv.load_state_dict(tmp_path / "ckpt.pt", model)
    np.testing.assert_array_equal(np.asarray(params["conv_1"]["bias"]), sd["conv_1.bias"].numpy())


@pytest.mark.torch
def test_load_errors_name_the_path(torch, conv, tmp_path):
    model = weak_cnn(num_classes=6, in_channels=3, widths=(4, 8), image_size=16)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch checkpoint \x00\x01\x02")
    with pytest.raises(conv.StateDictError, match="corrupt.pth"):
        conv.load_state_dict(corrupt, model)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        conv.load_state_dict(tmp_path / "missing.pth", model)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(conv.StateDictError, match="tensor.pth.*Tensor"):
        conv.load_state_dict(tensor_only, model)
    wrong = tmp_path / "wrong.pth"
    conv.save_state_dict(random_params(model, 0), model, wrong)
    other = weak_cnn(num_classes=6, in_channels=3, widths=(4, 16), image_size=16)
    with pytest.raises(conv.StateDictError, match=r"wrong\.pth(.|\n)*conv_1\.weight"):
        conv.load_state_dict(wrong, other)


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.torch
def test_missing_extra_and_misshaped_tensors_are_all_named(torch, tm, conv):
    model = simcnn(num_classes=10, in_channels=3, width=0.0625)
    sd = dict(tm.TorchSimCNN(num_classes=10, in_channels=3, width=0.0625).state_dict())
    del sd["conv_4.bias"]
    sd["fc_16.weight"] = torch.zeros(2, 2)
    sd["fc_14.weight"] = torch.zeros(32, 31)
    with pytest.raises(conv.StateDictError) as info:
        conv.state_dict_to_params(sd, model)
    msg = str(info.value)
    assert "missing 'conv_4.bias' (expected shape (16,))" in msg
    assert "unexpected 'fc_16.weight'" in msg
    assert "'fc_14.weight' has shape (32, 31), expected (32, 32)" in msg
    assert "3 problem(s)" in msg


@pytest.mark.torch
def test_state_dict_of_the_other_family_is_refused(tm, conv):
    sim_sd = tm.TorchSimCNN(width=0.0625).state_dict()
    with pytest.raises(conv.StateDictError, match="missing 'fc_12.weight'(.|\n)*unexpected 'conv_12"):
        conv.state_dict_to_params(sim_sd, rescnn(width=0.0625), style="simcnn")
    res_sd = tm.TorchResCNN(width=0.0625).state_dict()
    with pytest.raises(conv.StateDictError, match="missing 'conv_12.0.weight'"):
        conv.state_dict_to_params(res_sd, simcnn(width=0.0625))
    with pytest.raises(conv.StateDictError, match="expected a tensor"):
        conv.state_dict_to_params({**res_sd, "classifier.2.bias": [0.0] * 10}, rescnn(width=0.0625))


@pytest.mark.torch
def test_params_that_do_not_fit_are_refused(conv):
    model = _extracted_model()
    params = random_params(model, 0)
    bad = {**params, "conv_2": {"kernel": params["conv_2"]["kernel"][..., :1],
                                "bias": params["conv_2"]["bias"]}}
    with pytest.raises(conv.StateDictError, match=r"conv_2/kernel.*\(3, 3, 5, 2\)"):
        conv.params_to_state_dict(bad, model)
    with pytest.raises(TypeError, match="ConvNet"):
        conv.params_to_state_dict(params, "model")


# ---------------------------------------------------------------------------------------------
# Architecture inferred from the tensors: pruned reference modules load as they are.


def _pruned_state_dict(conv, model, params, mask, style):
    """A reference-style module: the state_dict of `model` with only `mask`'s kernels kept
    (conv outputs and the next conv's inputs sliced; the first Linear's columns follow the last
    conv's kept channels, a 1x1 last map; the last Linear keeps all N outputs)."""
    full = {k: v.numpy() for k, v in conv.params_to_state_dict(params, model, style=style).items()}
    names = model.conv_spec().names
    out, prev = {}, None
    for name in names:
        keep = np.flatnonzero(mask[name])
        prefix = f"{name}.0" if style == "rescnn" else name
        w = full[f"{prefix}.weight"][keep]
        out[f"{prefix}.weight"] = w if prev is None else w[:, prev]
        out[f"{prefix}.bias"] = full[f"{prefix}.bias"][keep]
        prev = keep
    fc = [k[: -len(".weight")] for k in full if k.endswith(".weight") and not k.startswith("conv_")]
    for j, prefix in enumerate(fc):
        w = full[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = w[:, prev] if j == 0 else w
        out[f"{prefix}.bias"] = full[f"{prefix}.bias"]
    return out


def _random_tied_mask(model, seed, keep=0.5):
    from jaxsplit import masks as masks_lib

    spec = model.conv_spec()
    rng = np.random.default_rng(seed)
    mask = {}
    for name in spec.free_layers:
        m = rng.random(spec.layer(name).num_kernels) < keep
        m[rng.integers(len(m))] = True  # never empty
        mask[name] = m
    return {k: np.asarray(v) for k, v in masks_lib.tie(mask, spec).items()}


@pytest.mark.torch
@pytest.mark.parametrize("family", ["simcnn", "rescnn"])
def test_load_state_dict_infers_a_pruned_reference_module(torch, conv, tmp_path, family):
    model = (simcnn if family == "simcnn" else rescnn)(num_classes=5, width=0.125)
    params = random_params(model, 3)
    for seed in range(2):
        mask = _random_tied_mask(model, seed, keep=0.7)
        sd = _pruned_state_dict(conv, model, params, mask, family)
        path = tmp_path / f"module_{family}_{seed}.pth"
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
        small, small_params = conv.load_state_dict(path)  # no model given: inferred
        kept = {n: int(m.sum()) for n, m in mask.items()}
        assert small.conv_spec().num_kernels == kept
        assert small.num_classes == 5 and small.in_channels == 3 and small.image_size == 32
        assert small.conv_spec().ties == model.conv_spec().ties
        x = _images(model, seed)
        # the module outputs all N logits, equal to the masked full model's (a deep random net
        # with half its kernels gives small logits: compared relative to their spread)
        got = _jax_logits(small, small_params, x)
        want = _jax_logits(model, params, x, masks={k: jax.numpy.asarray(v) for k, v in mask.items()})
        assert got.shape == want.shape == (len(x), 5) and want.std() > 1e-3
        np.testing.assert_allclose(got, want, atol=1e-3 * want.std(), rtol=1e-4)


def test_model_from_state_dict_round_trips_every_family(conv):
    for model in (simcnn(width=0.125), rescnn(width=0.125, num_classes=7),
                  weak_cnn(num_classes=6, in_channels=1), simcnn(num_classes=1, width=0.25, in_channels=1)):
        sd = conv.params_to_state_dict(random_params(model, 0), model)
        assert conv.model_from_state_dict(sd) == model  # family from the keys / conv count
    weak = weak_cnn(num_classes=6, widths=(4, 8), image_size=16)
    sd = conv.params_to_state_dict(random_params(weak, 0), weak)
    assert conv.model_from_state_dict(sd).image_size == 16  # from the 8*4*4 inputs of the Linear
    with pytest.raises(conv.StateDictError, match="after 2 pools gives 8x8"):
        conv.model_from_state_dict(sd, image_size=32)


def test_model_from_state_dict_errors_name_the_problem(conv):
    model = rescnn(width=0.125)
    sd = {k: v.numpy() for k, v in conv.params_to_state_dict(random_params(model, 0), model).items()}
    bad = dict(sd)
    bad["conv_3.0.weight"] = sd["conv_3.0.weight"][:3]  # conv_3 adds conv_1: widths differ
    bad["conv_3.0.bias"] = sd["conv_3.0.bias"][:3]
    bad["conv_4.0.weight"] = sd["conv_4.0.weight"][:, :3]
    with pytest.raises(conv.StateDictError, match="residual add needs equal widths"):
        conv.model_from_state_dict(bad)
    chain = dict(sd)
    chain["conv_4.0.weight"] = sd["conv_4.0.weight"][:, :3]
    with pytest.raises(conv.StateDictError, match="conv_4 weight .* 3 input channels, but conv_3 has"):
        conv.model_from_state_dict(chain)
    gap = {k: v for k, v in sd.items() if not k.startswith("conv_5.")}
    with pytest.raises(conv.StateDictError, match=r"numbered \[0, 1, 2, 3, 4, 6"):
        conv.model_from_state_dict(gap)
    with pytest.raises(conv.StateDictError, match="no conv weights"):
        conv.model_from_state_dict({"fc_0.weight": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="family 'vgg'"):
        conv.model_from_state_dict(sd, family="vgg")
    with pytest.raises(conv.StateDictError, match="family 'simcnn' has 13 convs"):
        conv.model_from_state_dict(sd, family="simcnn", style="rescnn")


# ---------------------------------------------------------------------------------------------
# Layout helpers and reference genomes (no torch needed).


def test_nchw_nhwc_helpers_keep_the_array_kind(torch):
    from jaxsplit.interop import reference as R

    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # NCHW
    y = R.nchw_to_nhwc(x)
    assert y.shape == (2, 4, 5, 3) and y[1, 2, 3, 0] == x[1, 0, 2, 3]
    np.testing.assert_array_equal(R.nhwc_to_nchw(y), x)
    j = R.nchw_to_nhwc(jax.numpy.asarray(x))
    assert isinstance(j, jax.Array) and np.array_equal(np.asarray(j), y)
    t = R.nchw_to_nhwc(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), y)
    assert isinstance(R.nhwc_to_nchw(t), torch.Tensor)
    assert R.nchw_to_nhwc([[[[1.0]]]]).shape == (1, 1, 1, 1)  # nested lists become numpy
    with pytest.raises(ValueError, match=r"expected a 4-d batch \(N, C, H, W\), got shape \(3, 4, 5\)"):
        R.nchw_to_nhwc(x[0])


def test_genome_to_mask_decodes_one_class():
    from jaxsplit.interop import reference as R
    from jaxsplit.search import encoding as E

    for model in (simcnn(num_classes=3, width=0.125), rescnn(num_classes=3, width=0.125)):
        spec = model.conv_spec()
        rng = np.random.default_rng(0)
        enc = E.build_encoding(spec, {n: rng.random((3, spec.layer(n).num_kernels)).astype(np.float32)
                                      for n in spec.names})
        genomes = rng.random((3, enc.num_genes)) < 0.5
        everything = E.decode(enc, jax.numpy.asarray(genomes[:, None]))
        for c in range(3):
            mask = R.genome_to_mask(enc, genomes[c].astype(np.int64), c)
            assert set(mask) == set(spec.names)
            for name in spec.names:
                np.testing.assert_array_equal(mask[name], np.asarray(everything[name][c, 0]))
            for a, b in spec.ties:
                np.testing.assert_array_equal(mask[a], mask[b])
        # a genome with nothing on: empty layers, or kernel 0 with the reference's fallback
        zero = R.genome_to_mask(enc, np.zeros(enc.num_genes, int), 1)
        assert not any(m.any() for m in zero.values())
        k0 = R.genome_to_mask(enc, np.zeros(enc.num_genes, int), 1, empty="kernel0")
        assert all(m.sum() == 1 and m[0] for m in k0.values())
        with pytest.raises(ValueError, match=rf"expected \({enc.num_genes},\) genes"):
            R.genome_to_mask(enc, genomes[0, :-1], 0)
        with pytest.raises(ValueError, match="values \\[2\\]; expected only 0 and 1"):
            R.genome_to_mask(enc, np.full(enc.num_genes, 2), 0)
        with pytest.raises(ValueError, match="class_id 3 is out of range: expected 0..2"):
            R.genome_to_mask(enc, genomes[0], 3)
