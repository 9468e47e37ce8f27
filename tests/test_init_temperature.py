"""`search.init_temperature`: the softmax temperature of the heuristic initial population."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsplit import config as jconfig
from jaxsplit.models.convnet import simcnn
from jaxsplit.search import encoding as E


@pytest.fixture(scope="module")
def enc():
    """A narrow SimCNN: every layer has 4..32 kernels, so at most 10 groups per layer."""
    spec = simcnn(num_classes=3, in_channels=1, width=1 / 16).conv_spec()
    rng = np.random.default_rng(0)
    imp = {l.name: rng.random((3, l.num_kernels)).astype(np.float32) for l in spec.layers}
    return E.build_encoding(spec, imp)


def test_default_is_the_reference_temperature(enc):
    assert jconfig.SearchConfig().init_temperature == 10.0
    assert E.reference_init_settings("simcnn")["temperature"] == 10.0
    key = jax.random.key(3)
    default = E.init_population(key, enc, 8, (), (0.5,), (0.5,))
    explicit = E.init_population(key, enc, 8, (), (0.5,), (0.5,), 10.0)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))


def test_low_temperature_keeps_the_most_important_groups(enc):
    pop = np.asarray(E.init_population(jax.random.key(0), enc, 50, (), (0.5,), (0.5,), 0.01))
    for i, n in enumerate(enc.num_groups):
        sl = enc.layer_slice(enc.layers[i])
        k = max(1, int(np.floor(0.5 * n + 1e-9)))
        expected = np.arange(n) < k  # groups 0..k-1 hold the most important kernels
        assert (pop[..., sl] == expected).all(), enc.layers[i]


def test_lower_temperature_prefers_important_groups_more(enc):
    sl = enc.layer_slice(enc.layers[-1])
    freq = {t: np.asarray(E.init_population(jax.random.key(1), enc, 400, (), (0.5,), (0.5,), t))[..., sl]
            .mean(axis=(0, 1)) for t in (10.0, 1.0)}
    # probability that the most important group is on, minus the least important one's
    assert freq[1.0][0] - freq[1.0][-1] > freq[10.0][0] - freq[10.0][-1] + 0.3


def test_settings_and_bad_values():
    cfg = jconfig.from_dict(jconfig.Config, {"search": {"init_temperature": 1.0}})
    assert E.reference_init_settings("simcnn", cfg.search)["temperature"] == 1.0
    with pytest.raises(jconfig.ConfigError, match="search.init_temperature"):
        jconfig.from_dict(jconfig.Config, {"search": {"init_temperature": 0.0}})
    spec = simcnn(num_classes=2, in_channels=1, width=1 / 16).conv_spec()
    enc = E.build_encoding(spec, {l.name: np.ones((2, l.num_kernels), np.float32) for l in spec.layers})
    with pytest.raises(E.EncodingError, match="temperature"):
        E.init_population(jax.random.key(0), enc, 4, (), (0.5,), (0.5,), -1.0)
