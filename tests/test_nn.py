"""The neural-network observable: starts as HT, exact hard limit, gradients, and config round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jacana.stages import reference
from jacana.stages.observables import nn
from jacana.stages.analysis import default_params, default_relax, hard_relax, soft_config, soft_yields
from jacana.stages.batch import make_batches
from jacana.stages.columns import read_chunk
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import load_fileset
from jacana.stages.spec import load_spec

from test_soft_parity import assert_parity

NN_OVERRIDES = ["regions.4j1b.observable=nn", "regions.4j1b.edges={low: 0.0, high: 1.0, bins: 10}"]


def trained_like(seed=3):
    """Weights with a non-zero output layer (as after training)."""
    w = nn.init_weights(seed=seed)
    rng = np.random.default_rng(seed)
    w["w3"] = rng.normal(0.0, 1.0, w["w3"].shape)
    w["b3"] = np.asarray(0.2)
    return w


def test_starts_as_a_monotone_function_of_ht():
    w = nn.init_weights(seed=5)
    rng = np.random.default_rng(0)
    feats = rng.uniform(20.0, 600.0, (50, len(nn.FEATURES)))
    out = nn.mlp(w, feats, np)
    np.testing.assert_allclose(out, 1.0 / (1.0 + np.exp(-(feats[:, 0] - nn.HT_CENTER) / nn.HT_SCALE)), rtol=1e-14)
    np.testing.assert_allclose(nn.mlp(trained_like(), feats, jnp), nn.mlp(trained_like(), feats, np), rtol=1e-12)


def test_spec_round_trip_of_weights_and_edges():
    spec = load_spec(overrides=NN_OVERRIDES)
    assert spec.uses_nn()
    w = trained_like()
    edges = [0.0, 0.2, 0.45, 0.7, 1.0]
    again = spec.with_params({"nn": w, "edges_4j1b": edges, "jet_pt_min": 33.0})
    for k in nn.WEIGHT_NAMES:
        np.testing.assert_array_equal(again.nn_weights()[k], w[k])
    np.testing.assert_array_equal(again.regions["4j1b"].edges, edges)
    assert again.param_values()["jet_pt_min"] == 33.0
    with pytest.raises(ConfigError, match="nn.weights"):
        spec.with_params({"nn": nn.init_weights((4, 4))}).with_overrides(["nn.hidden=[16, 16]"])
    with pytest.raises(ConfigError, match="unknown parameters"):
        spec.with_params({"edges_nowhere": [0, 1]})


@pytest.fixture(scope="module")
def nn_chunk(small_fileset):
    spec = load_spec(overrides=NN_OVERRIDES).with_params({"nn": trained_like()})
    fs = load_fileset(small_fileset)
    chunk = fs.chunks("ttbar", "nominal", chunk_size=20_000)[0]
    return spec, read_chunk(chunk, spec)


def test_hard_limit_equals_the_conventional_analysis(nn_chunk):
    spec, columns = nn_chunk
    filled = assert_parity(columns, spec)
    assert filled > 20  # the NN histograms are really filled, across many bins
    ref = reference.fill_histograms(columns, spec)["4j1b"]["nominal"]
    assert np.count_nonzero(reference.to_arrays(ref)["sumw"]) >= 8


def test_gradient_in_the_weights_matches_finite_differences(nn_chunk):
    spec, columns = nn_chunk
    config = soft_config(spec)
    batch = make_batches(columns, spec).parts[0]
    params = default_params(spec)
    relax = default_relax(spec, 1.0)
    direction = {k: jnp.asarray(np.random.default_rng(1).normal(0, 0.1, np.shape(v))) for k, v in params["nn"].items()}

    def f(t):
        p = dict(params, nn=jax.tree.map(lambda a, d: a + t * d, params["nn"], direction))
        return jnp.sum(soft_yields(p, relax, batch, config)["4j1b"]["sumw"][0] * jnp.arange(10.0))

    grad = jax.grad(f)(0.0)
    h = 1e-4
    fd = (f(h) - f(-h)) / (2 * h)
    assert abs(float(grad)) > 1e-3 * abs(float(f(0.0)))  # the weights really move the histogram
    np.testing.assert_allclose(float(grad), float(fd), rtol=1e-5)


def test_missing_weights_is_a_clear_error(nn_chunk):
    spec, columns = nn_chunk
    params = {k: v for k, v in default_params(spec).items() if k != "nn"}
    with pytest.raises(ValueError, match="nn"):
        soft_yields(params, hard_relax(), make_batches(columns, spec).parts[0], soft_config(spec))
