"""Unit checks of the soft building blocks: cuts, multiplicity DPs, trijets, relaxed histograms, batches."""

from __future__ import annotations

import itertools

import awkward as ak
import hist
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jacana.stages.shapes import jet_bucket, nice_size, padded_events
from jacana.stages.histograms.relaxed import bin_mass, ordered_edges, soft_histogram
from jacana.stages.selection.multiplicity import (count_distribution, jet_region_probs, jet_tag_distribution,
                                        nth_selected_value, prob_at_least, prob_exactly)
from jacana.stages.observables.kinematics import soft_argmax_weights, trijet_indices, trijet_kinematics
from jacana.stages.selection.soft import soft_step, step_cdf


# -- soft cuts -----------------------------------------------------------------------------------------

def test_soft_step_is_exact_at_zero_and_has_finite_gradients():
    x = jnp.array([29.0, 30.0, 30.0 + 1e-12, 31.0])
    np.testing.assert_array_equal(soft_step(x, 30.0, 0.0), [0.0, 0.0, 1.0, 1.0])  # strict >
    np.testing.assert_allclose(soft_step(x, 30.0, 2.0), 1 / (1 + np.exp(-(np.asarray(x) - 30.0) / 2.0)), rtol=1e-14)
    for tau in (0.0, 1e-300, 2.0):
        g = jax.grad(lambda t, tau=tau: soft_step(x, t, tau).sum())(30.0)
        assert np.isfinite(g)
        g_tau = jax.grad(lambda s: soft_step(x, 30.0, s).sum())(jnp.asarray(tau))
        assert np.isfinite(g_tau)
    np.testing.assert_array_equal(step_cdf(jnp.array([-1.0, 0.0, 1.0]), 0.0), [0.0, 0.0, 1.0])


# -- multiplicity DPs vs brute-force enumeration ------------------------------------------------------

def _enumerate(p, q=None):
    """{(n_selected, n_tagged): probability} by summing over every outcome."""
    k = len(p)
    out: dict = {}
    outcomes = (0, 1, 2) if q is not None else (0, 1)
    for combo in itertools.product(outcomes, repeat=k):
        prob = 1.0
        for j, o in enumerate(combo):
            if q is None:
                prob *= p[j] if o else 1 - p[j]
            else:
                prob *= (1 - p[j]) if o == 0 else (p[j] * (1 - q[j]) if o == 1 else p[j] * q[j])
        key = (sum(o > 0 for o in combo), sum(o == 2 for o in combo))
        out[key] = out.get(key, 0.0) + prob
    return out


@pytest.mark.parametrize("k", [1, 4, 6])
def test_count_distributions_match_enumeration(k):
    rng = np.random.default_rng(k)
    for trial in range(3):
        p = rng.uniform(size=k)
        if trial == 2:
            p = rng.integers(0, 2, size=k).astype(float)  # hard weights: exact counts
        q = rng.uniform(size=k) if trial < 2 else rng.integers(0, 2, size=k).astype(float)
        full = _enumerate(p)
        dist = np.asarray(count_distribution(jnp.asarray(p)[None], cap=3))[0]
        for c in range(3):
            assert dist[c] == pytest.approx(full.get((c, 0), 0.0), abs=1e-14)
        assert dist[3] == pytest.approx(sum(v for (n, _), v in full.items() if n >= 3), abs=1e-14)
        assert float(prob_exactly(jnp.asarray(p), 1)) == pytest.approx(full.get((1, 0), 0.0), abs=1e-14)
        assert float(prob_at_least(jnp.asarray(p), 2)) == pytest.approx(
            sum(v for (n, _), v in full.items() if n >= 2), abs=1e-14)
        joint = _enumerate(p, q)
        probs = jet_region_probs(jnp.asarray(p), jnp.asarray(q), 4)
        want1 = sum(v for (n, t), v in joint.items() if n >= 4 and t == 1)
        want2 = sum(v for (n, t), v in joint.items() if n >= 4 and t >= 2)
        assert float(probs["exactly_1"]) == pytest.approx(want1, abs=1e-14)
        assert float(probs["at_least_2"]) == pytest.approx(want2, abs=1e-14)
        table = np.asarray(jet_tag_distribution(jnp.asarray(p), jnp.asarray(q), 4, 2))
        assert table.sum() == pytest.approx(1.0, abs=1e-14) and table.min() >= 0


def test_nth_selected_value_matches_enumeration_and_hard_limit():
    rng = np.random.default_rng(3)
    v, p = rng.uniform(20, 100, 6), rng.uniform(size=6)
    want = np.zeros(4)
    for combo in itertools.product((0, 1), repeat=6):
        prob = np.prod([p[j] if c else 1 - p[j] for j, c in enumerate(combo)])
        chosen = [v[j] for j, c in enumerate(combo) if c]
        for i in range(min(4, len(chosen))):
            want[i] += prob * chosen[i]
    np.testing.assert_allclose(nth_selected_value(jnp.asarray(v), jnp.asarray(p), 4), want, rtol=1e-13)
    hard = np.array([1, 0, 1, 1, 0, 0.0])
    np.testing.assert_array_equal(nth_selected_value(jnp.asarray(v), jnp.asarray(hard), 4), [v[0], v[2], v[3], 0.0])


# -- trijets ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 4, 7])
def test_trijet_order_is_awkward_combinations_order(k):
    combos = ak.combinations(ak.Array([list(range(k))]), 3, fields=["a", "b", "c"])[0]
    want = np.stack([ak.to_numpy(combos.a), ak.to_numpy(combos.b), ak.to_numpy(combos.c)], axis=1)
    np.testing.assert_array_equal(trijet_indices(k), want)


def test_trijet_kinematics_against_explicit_four_vectors():
    rng = np.random.default_rng(5)
    pt, eta, phi, m = rng.uniform(20, 90, 5), rng.uniform(-2, 2, 5), rng.uniform(-3, 3, 5), rng.uniform(2, 15, 5)
    tpt, tm = trijet_kinematics(*(jnp.asarray(a) for a in (pt, np.cos(phi), np.sin(phi), np.sinh(eta), m)))
    for t, (a, b, c) in enumerate(trijet_indices(5)):
        idx = [a, b, c]
        px, py = np.sum(pt[idx] * np.cos(phi[idx])), np.sum(pt[idx] * np.sin(phi[idx]))
        pz = np.sum(pt[idx] * np.sinh(eta[idx]))
        e = np.sum(np.sqrt((pt[idx] * np.cosh(eta[idx])) ** 2 + m[idx] ** 2))
        assert float(tpt[t]) == pytest.approx(np.hypot(px, py), rel=1e-12)
        assert float(tm[t]) == pytest.approx(np.sqrt(e**2 - px**2 - py**2 - pz**2), rel=1e-9)


def test_soft_argmax_hard_limit_ties_and_validity():
    score = jnp.array([[5.0, 9.0, 9.0, 12.0], [1.0, 2.0, 3.0, 4.0]])
    weight = jnp.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    hard = np.asarray(soft_argmax_weights(score, weight, 0.0))
    np.testing.assert_array_equal(hard, [[0, 1, 0, 0], [0, 0, 0, 0]])  # first maximum among valid; none valid
    cold = np.asarray(soft_argmax_weights(score, weight, 1e-3))
    np.testing.assert_allclose(cold[0], [0, 0.5, 0.5, 0], atol=1e-12)  # soft splits exact ties
    warm = np.asarray(soft_argmax_weights(score, weight * 0.5, 4.0))
    e = 0.5 * np.exp(np.array([5.0, 9.0, 9.0]) / 4.0)
    np.testing.assert_allclose(warm[0, :3], e / e.sum(), rtol=1e-13)


# -- relaxed histograms -------------------------------------------------------------------------------

def test_hard_histogram_equals_hist_weight_storage():
    rng = np.random.default_rng(7)
    edges = np.linspace(110.0, 550.0, 12)
    x = np.concatenate([rng.uniform(50, 650, 5000), edges, [np.nextafter(550.0, 0)]])  # values on every edge
    w = rng.normal(1.0, 0.5, len(x))
    h = hist.Hist(hist.axis.Variable(edges), storage=hist.storage.Weight())
    h.fill(x, weight=w)
    sumw, sumw2 = soft_histogram(jnp.asarray(x), jnp.asarray(edges), 0.0, weights=jnp.asarray(w), block_size=1000)
    np.testing.assert_allclose(sumw, h.view().value, rtol=1e-12)
    np.testing.assert_allclose(sumw2, h.view().variance, rtol=1e-12)
    # flow=True adds under/overflow to the edge bins
    sw_flow, _ = soft_histogram(jnp.asarray(x), jnp.asarray(edges), 0.0, weights=jnp.asarray(w), flow=True)
    flow = h.view(flow=True).value
    np.testing.assert_allclose(sw_flow[0], flow[0] + flow[1], rtol=1e-12)
    np.testing.assert_allclose(sw_flow[-1], flow[-1] + flow[-2], rtol=1e-12)
    # several weight vectors at once
    both, _ = soft_histogram(jnp.asarray(x), jnp.asarray(edges), 0.0, weights=jnp.stack([jnp.asarray(w), 2 * jnp.asarray(w)], 1))
    np.testing.assert_allclose(both[1], 2 * h.view().value, rtol=1e-12)


@pytest.mark.parametrize("bandwidth", [0.5, 3.0, 20.0])
def test_parity_with_relaxed_hist_unweighted(bandwidth):
    relaxed = pytest.importorskip("relaxed")
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(300, 120, 3000))
    edges = jnp.linspace(110.0, 550.0, 12)
    want = relaxed.hist(x, edges, bandwidth)
    got, _ = soft_histogram(x, edges, bandwidth, block_size=512)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # the kernel-integrated mass tends to the [lo, hi) indicator
    np.testing.assert_allclose(soft_histogram(x, edges, 1e-9)[0], soft_histogram(x, edges, 0.0)[0], atol=1e-9)


def test_histogram_memory_does_not_grow_with_events_x_bins():
    edges = jnp.linspace(0.0, 1.0, 26)

    def temp_bytes(f, n):
        x = jax.ShapeDtypeStruct((n,), jnp.float64)
        return jax.jit(f).lower(x).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda x: soft_histogram(x, edges, 0.05, block_size=4096)[0], 1_000_000)
    theirs_small = temp_bytes(lambda x: soft_histogram(x, edges, 0.05, block_size=4096)[0], 100_000)
    assert ours < 8 * 1_000_000 * 26 / 10  # far below an [events x bins] float64 array
    assert ours < 3 * theirs_small + 8 * 1_000_000 * 3  # O(n) only through its inputs (padding, weights)


def test_gradients_wrt_edges_and_data():
    x = jnp.array([0.2, 0.45, 0.55, 0.9])
    edges = ordered_edges(jnp.asarray(0.0), jnp.array([0.5, -0.5]))  # |increments|: always ordered
    np.testing.assert_allclose(edges, [0.0, 0.5, 1.0])
    g_edges = jax.grad(lambda e: soft_histogram(x, e, 0.1)[0][0])(jnp.array([0.0, 0.5, 1.0]))
    g_x = jax.grad(lambda y: soft_histogram(y, jnp.array([0.0, 0.5, 1.0]), 0.1)[0][0])(x)
    assert np.all(np.isfinite(g_edges)) and g_edges[1] > 0 and g_edges[0] < 0
    assert np.all(np.isfinite(g_x)) and g_x[0] > 0 and g_x[1] < 0  # near the lower / upper edge
    m = bin_mass(x, jnp.array([0.0, 0.5, 1.0]), 0.0)
    np.testing.assert_array_equal(m, [[1, 0], [1, 0], [0, 1], [0, 1]])


# -- batches ----------------------------------------------------------------------------------------------

def test_buckets():
    assert [jet_bucket(n) for n in (0, 4, 5, 7, 9, 13, 17, 25, 40)] == [4, 4, 6, 8, 12, 16, 24, 32, 48]
    assert [nice_size(n) for n in (1, 3, 5, 7, 100, 129, 200)] == [1, 3, 6, 8, 128, 192, 256]
    for n in (1, 100, 5000, 123_457):
        size, block = padded_events(n, 1024)
        assert size >= n and size % block == 0


def test_soft_mbjj_custom_derivatives_match_plain_autodiff():
    """soft_mbjj's custom JVP (per-jet coefficients) == autodiff of a plain gather implementation."""
    from jacana.stages.observables.kinematics import _choose, soft_mbjj, trijet_indices
    from jacana.stages.selection.soft import soft_step

    rng = np.random.default_rng(3)
    n, k = 40, 7
    njet = rng.integers(3, k + 1, n)
    mask = np.arange(k)[None] < njet[:, None]
    pt = rng.uniform(10, 120, (n, k)) * mask
    eta, phi, m = rng.uniform(-2.6, 2.6, (n, k)), rng.uniform(-3, 3, (n, k)), rng.uniform(2, 12, (n, k))
    btag = np.where(rng.uniform(size=(n, k)) < 0.3, -10.0, rng.uniform(0, 1, (n, k)))
    kin = [jnp.asarray(a) for a in (pt, np.cos(phi), np.sin(phi), np.sinh(eta), m)]

    def plain(th, tau, kin):
        p = soft_step(kin[0], th[0], tau[0]) * soft_step(th[2], jnp.abs(jnp.asarray(eta)), tau[2]) * mask
        q = soft_step(jnp.asarray(btag), th[1], tau[1])
        idx = trijet_indices(k)
        pa, pb, pc = (p[..., idx[:, i]] for i in range(3))
        qa, qb, qc = (q[..., idx[:, i]] for i in range(3))
        w = pa * pb * pc * (qa + qb + qc - qa * qb - qa * qc - qb * qc + qa * qb * qc)  # no cancellation
        tpt, tmass = trijet_kinematics(*kin)
        return _choose(tpt, w, tau[3], tmass)

    def custom(th, tau, kin):
        p = soft_step(kin[0], th[0], tau[0]) * soft_step(th[2], jnp.abs(jnp.asarray(eta)), tau[2]) * mask
        q = soft_step(jnp.asarray(btag), th[1], tau[1])
        return soft_mbjj(*kin, p, q, tau[3])

    # compiled once, called at every temperature (op by op, these derivatives took most of a minute)
    value_c, value_p = jax.jit(custom), jax.jit(plain)
    jac_c, jac_p, rev_c = jax.jit(jax.jacfwd(custom)), jax.jit(jax.jacfwd(plain)), jax.jit(jax.jacrev(custom))
    th = jnp.array([30.0, 0.5, 2.4])
    for tau in ([2.0, 0.02, 0.05, 5.0], [0.5, 0.01, 0.01, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.02, 0.05, 0.0]):
        tau = jnp.asarray(tau)
        np.testing.assert_allclose(value_c(th, tau, kin), value_p(th, tau, kin), rtol=1e-12, atol=1e-9)
        jc = jac_c(th, tau, kin)
        jp = jac_p(th, tau, kin)
        jr = rev_c(th, tau, kin)
        scale = max(float(jnp.max(jnp.abs(jp))), 1e-300)
        assert float(jnp.max(jnp.abs(jc - jp))) <= 1e-9 * scale
        assert float(jnp.max(jnp.abs(jr - jc))) <= 1e-9 * scale
        assert np.all(np.isfinite(np.asarray(jc)))
    # derivatives with respect to the data (jet pT, through the trijet pT and mass) and the temperature
    tau = jnp.asarray([2.0, 0.02, 0.05, 5.0])
    f = jax.jit(lambda x, t: custom(th, tau.at[3].set(t), [x] + kin[1:]))
    h = 1e-5
    g = jax.jit(jax.jacfwd(f, argnums=(0, 1)))(kin[0], tau[3])
    d = jnp.zeros_like(kin[0]).at[:, 1].set(h)
    fd_pt = (f(kin[0] + d, tau[3]) - f(kin[0] - d, tau[3])) / (2 * h)
    np.testing.assert_allclose(g[0][jnp.arange(n), jnp.arange(n), 1], fd_pt, rtol=1e-5, atol=1e-6)
    fd_t = (f(kin[0], tau[3] + h) - f(kin[0], tau[3] - h)) / (2 * h)
    np.testing.assert_allclose(g[1], fd_t, rtol=1e-5, atol=1e-6)


# -- densifying jagged columns ----------------------------------------------------------------------

def test_flat_counts_matches_awkward_on_every_layout():
    from jacana.stages.columns import flat_counts

    base = ak.Array([[1.5, 2.5], [], [3.5, 4.5, 5.5], [6.5]])
    cases = {
        "list-offset": base,
        "sliced (offsets not from 0)": base[1:],
        "jagged boolean mask": base[base > 2.0],
        "fancy-indexed events": base[np.array([3, 0, 2])],
        "empty": base[:0],
    }
    for name, arr in cases.items():
        flat, counts = flat_counts(arr)
        np.testing.assert_array_equal(flat, ak.to_numpy(ak.flatten(arr)), err_msg=name)
        np.testing.assert_array_equal(counts, ak.to_numpy(ak.num(arr)), err_msg=name)
        assert counts.dtype == np.int64, name


def test_jagged_densify_keeps_file_order_and_fills_padding():
    from jacana.stages.batch import _Buckets, _Jagged, _Scatter

    from jacana.stages.columns import flat_counts, per_event_count

    content, counts = flat_counts(ak.Array([[1.0, 2.0, 3.0], [], [4.0], [5.0, 6.0, 7.0, 8.0, 9.0]]))
    ok = content != 2.0  # drops one object, later ones move up
    kept = _Jagged(content[ok], per_event_count(counts, ok))
    np.testing.assert_array_equal(kept.counts, [2, 0, 1, 5])
    event, slot = kept.event_and_slot()
    np.testing.assert_array_equal(slot, [0, 1, 0, 0, 1, 2, 3, 4])
    groups = _Buckets(np.array([6, 4, 4, 6]))  # events 1, 2 in bucket 4; events 0, 3 in bucket 6, in event order
    assert groups.sizes == [4, 6]
    np.testing.assert_array_equal(groups.events(0), [1, 2])
    np.testing.assert_array_equal(groups.events(1), [0, 3])
    by_bucket = groups.objects(event, slot)
    dense4 = _Scatter(*by_bucket[0], 3, 4).dense(kept.content, fill=-1.0)  # a padded third row
    np.testing.assert_array_equal(dense4, [[-1, -1, -1, -1], [4, -1, -1, -1], [-1, -1, -1, -1]])
    dense6 = _Scatter(*by_bucket[1], 2, 6).dense(kept.content, fill=-1.0)
    np.testing.assert_array_equal(dense6, [[1, 3, -1, -1, -1, -1], [5, 6, 7, 8, 9, -1]])
    narrow = _Scatter(*by_bucket[1], 2, 4).dense(kept.content, fill=-1.0)  # slots beyond the width are left out
    np.testing.assert_array_equal(narrow, [[1, 3, -1, -1], [5, 6, 7, 8]])


def test_jer_factors_of_some_jets_are_those_of_all_jets():
    """The densifier draws JER factors only for the jets that can pass: jet by jet, the same numbers."""
    from jacana.stages.columns import Columns, flat_counts, jer_factors
    from jacana.stages.fileset import Chunk

    jet_pt = ak.Array([[50.0, 40.0], [], [30.0], [], [], [20.0, 25.0, 35.0, 45.0]])
    chunk = Chunk("ttbar", "nominal", "/data/ttbar__nominal__3.root", 1000, 1006, 10_000)
    columns = Columns(chunk=chunk, arrays={"jet_pt": jet_pt}, jer=(0.05, 11))
    every = jer_factors(chunk.path, 1000, [2, 0, 1, 0, 0, 4], 0.05, 11)
    some = np.array([6, 0, 2, 5])
    np.testing.assert_array_equal(columns.jer_factors_at(some), every[some])
    np.testing.assert_array_equal(flat_counts(columns.jer_factors())[0], every)
    assert columns.jer_factors().tolist()[1] == [] and len(columns.jer_factors().tolist()[5]) == 4
    assert np.std(every) > 0.01 and np.all(np.abs(every - 1) < 0.5)
    # without a JER systematic: factors of one; given factors are used as they are
    np.testing.assert_array_equal(Columns(chunk=chunk, arrays={"jet_pt": jet_pt}).jer_factors_at(some), np.ones(4))
    given = Columns(chunk=chunk, arrays={"jet_pt": jet_pt}, jer_factor=ak.unflatten(np.arange(7.0), [2, 0, 1, 0, 0, 4]))
    np.testing.assert_array_equal(given.jer_factors_at(some), some.astype(float))


def test_rebatch_regroups_real_events_into_aligned_zero_padded_calls():
    """Fixed-shape calls hold every real event once, in order, padded with zero-weight events;
    each array starts on a 64-byte boundary, so moving it to JAX's CPU device copies nothing."""
    import dataclasses

    from jacana.facility.executor import rebatch
    from jacana.stages.batch import EventBatch, to_device

    rng = np.random.default_rng(3)

    def part(n, n_pad, width):
        mask = np.arange(n_pad) < n
        f = {fl.name: None for fl in dataclasses.fields(EventBatch) if not fl.metadata.get("static")}
        f.update(lepton_pt=rng.random((n_pad, width)), lepton_mask=rng.random((n_pad, width)) < 0.5,
                 lepton_is_muon=rng.random((n_pad, width)) < 0.5, jet_pt=rng.random((n_pad, 1, 4)),
                 jet_mask=np.ones((n_pad, 4), bool), weight=np.where(mask, rng.random(n_pad), 0.0), event_mask=mask)
        for name in ("jet_eta", "jet_cos_phi", "jet_sin_phi", "jet_sinh_eta", "jet_mass", "jet_btag"):
            f[name] = rng.random((n_pad, 4))
        return EventBatch(**f, kinematic=("nominal",), weight_variations=False, block_size=64)

    parts = [part(100, 128, 2), part(70, 128, 8)]
    calls = rebatch(parts, call_events=64)
    assert len(calls) == 3 and all(c.weight.shape == (64,) and c.lepton_pt.shape == (64, 8) for c in calls)
    w = np.concatenate([c.weight for c in calls])
    np.testing.assert_array_equal(w[:170], np.concatenate([parts[0].weight[:100], parts[1].weight[:70]]))
    assert not w[170:].any() and np.concatenate([c.event_mask for c in calls]).sum() == 170
    lpt = np.concatenate([c.lepton_pt for c in calls])
    np.testing.assert_array_equal(lpt[:100, :2], parts[0].lepton_pt[:100])
    assert not lpt[:100, 2:].any()  # widened lepton slots are empty
    np.testing.assert_array_equal(lpt[100:170], parts[1].lepton_pt[:70])
    on_device = to_device(calls)
    for c, d in zip(calls, on_device):
        assert c.jet_eta.ctypes.data % 64 == 0
        if jax.default_backend() == "cpu":
            assert d.jet_eta.unsafe_buffer_pointer() == c.jet_eta.ctypes.data  # aliased, not copied
