"""Gradients of the soft analysis and its convergence to the hard one.

* forward mode (``yields_and_jacobian``) and reverse mode (``yields_vjp``) agree to 1e-9 relative;
* both agree with central finite differences at finite temperature: |J - J_fd| <= 1e-5 x max|J|
  per parameter (float64; steps well below the temperatures, so the O(h^2) error is ~1e-7);
* as the temperatures and the bandwidth shrink, the soft yields approach the hard ones
  (monotonically on this sample) and equal them exactly at zero;
* at the hard limit the gradients are finite (zero): no NaN from the tau = 0 branches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jacana.stages.analysis import (chunk_yields, default_params, default_relax, hard_relax, soft_config,
                                    soft_yields)
from jacana.stages.batch import make_batches
from jacana.stages.columns import read_chunk
from jacana.stages.fileset import load_fileset
from jacana.stages.jacobian import yields_and_jacobian, yields_vjp


def contract(jacobian, cotangent):
    """sum over (region, kind, variation, bin) of cotangent x Jacobian, per parameter (independent of
    the pipeline's own contraction, protocol.pipeline.Pipeline.jacobian, which the chain tests cover)."""
    out = {}
    for region, by_kind in jacobian.items():
        for kind, by_param in by_kind.items():
            ct = np.asarray(cotangent[region][kind])
            for name, jac in by_param.items():
                jac = np.asarray(jac)
                val = np.tensordot(ct, jac, axes=ct.ndim)
                out[name] = val if name not in out else out[name] + val
    return out
from jacana.stages.spec import load_spec

FD_STEP = {"lepton_pt_min": 0.002, "jet_pt_min": 0.002, "jet_eta_max": 2e-5, "btag_min": 2e-5, "edges_4j1b": 0.002}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from jacana.samples.synthetic import generate

    path = generate(tmp_path_factory.mktemp("soft_grad"), events=1500, seed=22, files_per_sample=1, progress=False)
    spec = load_spec()
    chunk = load_fileset(path).chunks("ttbar", "nominal", chunk_size=100_000)[0]
    batches = make_batches(read_chunk(chunk, spec), spec, prefilter=True)
    part = max(batches.parts, key=lambda p: int(np.sum(p.event_mask)))  # one shape: one compilation per mode
    config = soft_config(spec)
    params = default_params(spec)
    params["edges_4j1b"] = jnp.asarray(spec.regions["4j1b"].edges)
    return spec, config, part, params


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_forward_reverse_and_finite_differences(setup):
    spec, config, part, params = setup
    relax = default_relax(spec)
    ylds, jac = yields_and_jacobian(params, relax, part, config)
    assert float(ylds["4j1b"]["sumw"].sum()) > 0 and float(ylds["4j2b"]["sumw"].sum()) > 0
    cot = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(0).normal(size=a.shape)), ylds)
    ylds_r, grad = yields_vjp(params, relax, part, config, cot)
    for a, b in zip(_flat(ylds), _flat(ylds_r)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    from_jac = contract(jac, cot)
    for name in params:
        np.testing.assert_allclose(np.asarray(grad[name]), np.asarray(from_jac[name]), rtol=1e-9,
                                   atol=1e-9 * float(np.max(np.abs(from_jac[name]))))

    def out(p):
        return _flat(chunk_yields(p, relax, part, config))

    for name, step in FD_STEP.items():
        value = np.asarray(params[name], dtype=np.float64)
        analytic = np.stack([_flat(jax.tree.map(lambda j: j[name], jac, is_leaf=lambda x: isinstance(x, dict)
                                                and name in x))], axis=0)[0]
        analytic = analytic.reshape(-1, value.size)
        for i in range(value.size):
            up, down = value.copy(), value.copy()
            up.flat[i] += step
            down.flat[i] -= step
            fd = (out({**params, name: jnp.asarray(up)}) - out({**params, name: jnp.asarray(down)})) / (2 * step)
            scale = max(float(np.max(np.abs(analytic))), 1e-300)
            assert np.max(np.abs(fd - analytic[:, i])) <= 1e-5 * scale, (name, i)
        assert float(np.max(np.abs(analytic))) > 0, name  # every parameter matters


def test_convergence_to_the_hard_limit(setup):
    spec, config, part, params = setup
    params = {k: v for k, v in params.items() if not k.startswith("edges_")}
    hard = _flat(soft_yields(params, hard_relax(), part, config))
    norm = np.sum(np.abs(hard))
    distance = []
    for scale in (1.0, 0.3, 0.1, 0.03, 0.01, 0.001):
        soft = _flat(soft_yields(params, default_relax(spec, scale=scale), part, config))
        distance.append(float(np.sum(np.abs(soft - hard)) / norm))
    assert all(b <= a * 1.05 for a, b in zip(distance, distance[1:])), distance
    assert distance[-1] < 0.05 * distance[0], distance
    exact = _flat(soft_yields(params, default_relax(spec, scale=0.0), part, config))
    np.testing.assert_array_equal(exact, hard)


def test_hard_limit_gradients_are_finite(setup):
    spec, config, part, params = setup
    ylds, jac = yields_and_jacobian(params, hard_relax(), part, config)
    leaves = jax.tree.leaves(jac)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
