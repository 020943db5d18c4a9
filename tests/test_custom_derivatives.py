"""The custom derivative rules against plain autodiff of the same computation: the count probabilities'
per-object coefficients (:func:`~jacana.stages.selection.multiplicity.count_probabilities`) and the fused
histogram fill (:func:`~jacana.stages.histograms.relaxed.weighted_bin_mass`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jacana.stages.histograms.relaxed import bin_mass, fill_variations, soft_histogram, weighted_bin_mass
from jacana.stages.observables.kinematics import EXACT
from jacana.stages.selection.multiplicity import (UNROLL_MAX, count_distribution, count_probabilities,
                                                  jet_region_probs, jet_tag_distribution, state_keys)


def _derivatives(f, argnums):
    """(values, jacfwd, jacrev) of ``f``, compiled (op-by-op dispatch of the programmes is slow)."""
    return jax.jit(lambda *a: (f(*a), jax.jacfwd(f, argnums)(*a), jax.jacrev(f, argnums)(*a)))


def _assert_trees_close(got, want, rtol=1e-12):
    """Every leaf within ``rtol`` of the largest entry of the reference leaf."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * max(np.max(np.abs(w)), 1e-300))


# -- count probabilities ----------------------------------------------------------------------------------

def _probabilities(k: int, seed: int):
    """[6, k] selection and tag probabilities: random, with 0 and 1 entries, and two hard rows."""
    rng = np.random.default_rng(seed)
    p, q = rng.uniform(size=(6, k)), rng.uniform(size=(6, k))
    p[0, :2], q[1, :2] = (0.0, 1.0), (1.0, 0.0)
    p[2, 0], q[2, -1] = 1.0, 0.0
    p[4:], q[4:] = rng.integers(0, 2, (2, k)), rng.integers(0, 2, (2, k))  # hard limit: counts exactly known
    return jnp.asarray(p), jnp.asarray(q)


def _accept(count_cap: int, tag_cap: int):
    """A single state, a capped state, several states and none."""
    keys = state_keys(count_cap, tag_cap)
    return ((keys[-1],), (keys[1],), tuple(keys[::2]), ())


@pytest.mark.parametrize("k", [3, UNROLL_MAX, 7])  # unrolled and scanned
def test_tagged_count_probabilities_match_autodiff_of_the_programme(k):
    p, q = _probabilities(k, k)
    accept = _accept(4, 2)

    def custom(p, q):
        return count_probabilities(p, q, 4, 2, accept)

    def plain(p, q):  # autodiff through the dynamic programme
        table = jet_tag_distribution(p, q, 4, 2)
        return jnp.stack([sum((table[:, n, t] for n, t in keys), jnp.zeros(p.shape[0], p.dtype)) for keys in accept])

    _assert_trees_close(_derivatives(custom, (0, 1))(p, q), _derivatives(plain, (0, 1))(p, q))
    # the analysis' regions: at least 4 jets and exactly 1 / at least 2 tags
    region = lambda p, q: jnp.stack(list(jet_region_probs(p, q, 4).values()))  # noqa: E731
    corner = lambda p, q: jnp.moveaxis(jet_tag_distribution(p, q, 4, 2)[:, 4, 1:], -1, 0)  # noqa: E731
    _assert_trees_close(_derivatives(region, (0, 1))(p, q), _derivatives(corner, (0, 1))(p, q))


@pytest.mark.parametrize("k", [2, 7])
def test_untagged_count_probabilities_match_autodiff_of_the_programme(k):
    p, _ = _probabilities(k, 10 + k)
    accept = _accept(3, 0)

    def custom(p):
        return count_probabilities(p, None, 3, 0, accept)

    def plain(p):
        dist = count_distribution(p, cap=3)
        return jnp.stack([sum((dist[:, n] for n, _ in keys), jnp.zeros(p.shape[0], p.dtype)) for keys in accept])

    _assert_trees_close(_derivatives(custom, 0)(p), _derivatives(plain, 0)(p))


def test_hard_count_probabilities_have_the_hard_values_and_finite_derivatives():
    p, q = _probabilities(6, 3)
    hard_p, hard_q = p[4:], q[4:]
    probs = count_probabilities(hard_p, hard_q, 4, 2, _accept(4, 2))
    assert set(np.unique(np.asarray(probs))) <= {0.0, 1.0}
    jac = jax.jacfwd(lambda a, b: count_probabilities(a, b, 4, 2, _accept(4, 2)), argnums=(0, 1))(hard_p, hard_q)
    assert all(np.all(np.isfinite(j)) for j in jac)


# -- fused histogram fill -----------------------------------------------------------------------------------

def _fill_inputs(seed=0, n=300, columns=3):
    rng = np.random.default_rng(seed)
    edges = jnp.asarray(np.sort(rng.uniform(50, 450, 7)))
    x = jnp.asarray(np.concatenate([rng.uniform(0, 500, n - 3), [float(edges[0]), float(edges[3]), 600.0]]))
    w = jnp.asarray(rng.normal(1.0, 0.4, (n, columns)))
    return x, w, edges


def _plain_fill(x, w, edges, h, flow, kernel):
    return jnp.matmul(w.T, bin_mass(x, edges, h, flow, kernel), precision=EXACT)


@pytest.mark.parametrize("flow,kernel", [(False, "normal"), (True, "normal"), (False, "logistic"), (True, "logistic")])
@pytest.mark.parametrize("h", [0.0, 15.0])
def test_fused_fill_matches_autodiff_of_the_plain_fill(flow, kernel, h):
    x, w, edges = _fill_inputs()
    h = jnp.asarray(h)
    fused = lambda x, w, e, h: weighted_bin_mass(x, w, e, h, flow, kernel)  # noqa: E731
    plain = lambda x, w, e, h: _plain_fill(x, w, e, h, flow, kernel)  # noqa: E731
    args, every = (x, w, edges, h), (0, 1, 2, 3)
    _assert_trees_close(_derivatives(fused, every)(*args), _derivatives(plain, every)(*args))
    # the observable's tangent alone (the analysis' common case: edges and bandwidth constant)
    t = jnp.linspace(-1.0, 1.0, x.shape[0])
    _assert_trees_close(jax.jvp(lambda y: fused(y, w, edges, h), (x,), (t,))[1],
                        jax.jvp(lambda y: plain(y, w, edges, h), (x,), (t,))[1])


def test_fused_fill_derivatives_are_not_trivially_zero():
    """The comparisons above would pass for a rule that dropped a term if autodiff gave 0 there too."""
    x, w, edges = _fill_inputs(1)
    jac = jax.jacfwd(weighted_bin_mass, argnums=(0, 1, 2, 3))(x, w, edges, jnp.asarray(15.0), False, "normal")
    assert all(float(jnp.max(jnp.abs(j))) > 1e-6 for j in jac)


def test_fill_variations_lays_out_kinematic_then_weight_variations():
    """Rows: every kinematic variation, then the weight variations (nominal objects); sumw2 with w^2."""
    rng = np.random.default_rng(2)
    n, edges, h = 200, jnp.linspace(0.0, 1.0, 5), jnp.asarray(0.05)
    values = {"r": jnp.asarray(rng.uniform(-0.1, 1.1, (3, n)))}
    sel = {"r": jnp.asarray(rng.uniform(size=(3, n)))}
    weight = jnp.asarray(rng.normal(1.0, 0.3, n))
    factors = [jnp.asarray(rng.uniform(0.8, 1.2, n)) for _ in range(2)]
    sumw, sumw2 = fill_variations(values, sel, weight, factors, {"r": (edges, h)}, False, "normal")["r"]
    assert sumw.shape == sumw2.shape == (5, 4)
    rows = [(values["r"][v], weight * sel["r"][v], weight * weight * sel["r"][v]) for v in range(3)]
    rows += [(values["r"][0], weight * f * sel["r"][0], (weight * f) ** 2 * sel["r"][0]) for f in factors]
    for i, (x, w, w2) in enumerate(rows):
        want_w, want_w2 = soft_histogram(x, edges, h, weights=w, weights2=w2)
        np.testing.assert_allclose(sumw[i], want_w, rtol=1e-13)
        np.testing.assert_allclose(sumw2[i], want_w2, rtol=1e-13)


def test_a_fill_of_several_keys_gives_each_key_its_own_events_histograms():
    """Weights [B, S] (jacana.stages.keyed.key_weights): row s of the result is the fill of key s's events
    alone, to rounding, in value and in every derivative (the fill's custom rule included)."""
    from jacana.stages.keyed import key_weights

    rng = np.random.default_rng(5)
    n, edges, h = 300, jnp.linspace(0.0, 1.0, 6), jnp.asarray(0.07)
    values = {"r": jnp.asarray(rng.uniform(-0.1, 1.1, (2, n)))}
    sel = {"r": jnp.asarray(rng.uniform(size=(2, n)))}
    weight = jnp.asarray(rng.normal(1.0, 0.3, n))
    factors = [jnp.asarray(rng.uniform(0.8, 1.2, n))]
    index = jnp.asarray(rng.integers(0, 3, n))

    def fill(scale, w):  # scale: a parameter the values depend on, to differentiate through the kernel
        vals = {"r": values["r"] * scale}
        return fill_variations(vals, sel, w, factors, {"r": (edges, h)}, False, "normal")["r"]

    keyed, d_keyed = jax.jvp(lambda s: fill(s, key_weights(weight, index, 3)), (1.0,), (1.0,))
    assert keyed[0].shape == (3, 3, 5)  # [keys, 2 kinematic + 1 weight variation, bins]
    for s in range(3):
        alone, d_alone = jax.jvp(lambda t: fill(t, jnp.where(index == s, weight, 0.0)), (1.0,), (1.0,))
        for got, want in zip((*keyed, *d_keyed), (*alone, *d_alone)):
            np.testing.assert_allclose(got[s], want, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(want))))
        assert float(jnp.max(jnp.abs(d_alone[0]))) > 1e-3  # the derivative is not trivially zero
