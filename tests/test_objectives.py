"""Expected-sensitivity objectives vs pyhf's own (numpy/scipy/minuit) inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pyhf
import pytest
from jacana.stages.stats import objectives as O
from jacana.bench.likelihood import agc_like_workspace
from jacana.stages.stats.likelihood import TracedModel


def small_workspace(interpolation=True):
    """Signal + two backgrounds in two channels; every modifier type."""
    rng = np.random.default_rng(42)
    channels = []
    for ci, nb in enumerate((3, 2)):
        sig = rng.uniform(3, 9, nb)
        b1 = rng.uniform(30, 60, nb)
        b2 = rng.uniform(10, 20, nb)
        sig_mods = [{"name": "mu", "type": "normfactor", "data": None},
                    {"name": "lumi", "type": "lumi", "data": None}]
        b1_mods = [{"name": f"stat_{ci}", "type": "staterror", "data": (0.6 * np.sqrt(b1)).tolist()},
                   {"name": "lumi", "type": "lumi", "data": None}]
        b2_mods = [{"name": f"stat_{ci}", "type": "staterror", "data": (0.5 * np.sqrt(b2)).tolist()},
                   {"name": f"shape_{ci}", "type": "shapesys", "data": (0.08 * b2).tolist()}]
        if interpolation:
            sig_mods.append({"name": "sig_theory", "type": "normsys", "data": {"hi": 1.08, "lo": 0.94}})
            b1_mods += [
                {"name": "jes", "type": "normsys", "data": {"hi": 1.04, "lo": 0.97}},
                {"name": "jes", "type": "histosys",
                 "data": {"hi_data": (b1 * rng.uniform(1.0, 1.06, nb)).tolist(),
                          "lo_data": (b1 * rng.uniform(0.95, 1.0, nb)).tolist()}},
            ]
        channels.append({"name": f"ch{ci}", "samples": [
            {"name": "signal", "data": sig.tolist(), "modifiers": sig_mods},
            {"name": "bkg1", "data": b1.tolist(), "modifiers": b1_mods},
            {"name": "bkg2", "data": b2.tolist(), "modifiers": b2_mods}]})
    return {
        "channels": channels,
        "observations": [{"name": c["name"], "data": [50.0] * len(c["samples"][0]["data"])} for c in channels],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": [
            {"name": "lumi", "auxdata": [1.0], "sigmas": [0.025], "bounds": [[0.8, 1.2]], "inits": [1.0]}]}}],
        "version": "1.0.0",
    }


def _numpy_model(spec):
    pyhf.set_backend("numpy")
    return pyhf.Workspace(spec).model()


def _fd_hessian_sigma(model, data, h=1e-4):
    """POI uncertainty from a central-difference Hessian of numpy pyhf's NLL."""
    p0 = np.asarray(model.config.suggested_init(), dtype=float)
    p0[model.config.poi_index] = 1.0
    free = np.flatnonzero(~np.asarray(model.config.suggested_fixed()))

    def f(p):
        return -model.logpdf(p, data)[0]

    n = len(free)
    H = np.zeros((n, n))
    E = np.eye(len(p0)) * h
    for a in range(n):
        for b in range(a, n):
            i, j = free[a], free[b]
            H[a, b] = H[b, a] = (
                f(p0 + E[i] + E[j]) - f(p0 + E[i] - E[j]) - f(p0 - E[i] + E[j]) + f(p0 - E[i] - E[j])
            ) / (4 * h * h)
    k = int(np.flatnonzero(free == model.config.poi_index)[0])
    return float(np.sqrt(np.linalg.inv(H)[k, k]))


@pytest.fixture(scope="module")
def small():
    """Values and gradients of every objective on the small model (one compile each)."""
    spec = small_workspace()
    tm = TracedModel.from_workspace(spec)
    y = tm.yields_template()
    # value and gradient of each *physics value* (the objective), built from the
    # minimisation losses so that the loss convention is exercised too
    vg = {}
    for name in O.OBJECTIVES:
        loss = O.loss(name)
        vg[name] = jax.jit(jax.value_and_grad(lambda yy, f=loss, s=O.SENSE[name]: s * f(tm, yy)))
    results = {name: f(y) for name, f in vg.items()}
    return spec, tm, y, vg, results


def test_sigma_mu_is_the_profiled_fisher_uncertainty(small):
    spec, tm, y, _, res = small
    value = float(res["sigma_mu"][0])
    m = _numpy_model(spec)
    asimov = np.asarray(tm.asimov_data(y, 1.0))
    # exact: the Hessian of pyhf's own NLL at the Asimov point
    assert value == pytest.approx(_fd_hessian_sigma(m, asimov), rel=1e-5)
    # pyhf + MINUIT's HESSE on the Asimov data: numerical second derivatives over
    # steps of ~1 sigma (the normsys/histosys interpolation is not quadratic there)
    # in bounded internal coordinates; see the next test
    pyhf.set_backend("numpy", "minuit")
    fit = pyhf.infer.mle.fit(asimov, m, return_uncertainties=True)
    pyhf.set_backend("numpy")
    assert value == pytest.approx(fit[m.config.poi_index, 1], rel=0.05)


def test_sigma_mu_matches_minuit_without_interpolation():
    """Without interpolation codes MINUIT's HESSE agrees with the exact value, once
    parameter limits are off: with limits, MINUIT's internal sine transform biases
    HESSE at the percent level (what pyhf's minuit fit reports)."""
    iminuit = pytest.importorskip("iminuit")
    spec = small_workspace(interpolation=False)
    tm = TracedModel.from_workspace(spec)
    y = tm.yields_template()
    value = float(O.sigma_mu(tm, y))
    m = _numpy_model(spec)
    asimov = np.asarray(tm.asimov_data(y, 1.0))
    p0 = np.asarray(m.config.suggested_init(), dtype=float)
    minuit = iminuit.Minuit(lambda p: -2 * m.logpdf(p, asimov)[0], p0)
    minuit.errordef = 1.0
    minuit.strategy = 2
    minuit.migrad()
    minuit.hesse()
    assert minuit.values[m.config.poi_index] == pytest.approx(1.0, abs=1e-4)
    assert value == pytest.approx(minuit.errors[m.config.poi_index], rel=1e-4)
    pyhf.set_backend("numpy", "minuit")
    fit = pyhf.infer.mle.fit(asimov, m, return_uncertainties=True)
    pyhf.set_backend("numpy")
    assert value == pytest.approx(fit[m.config.poi_index, 1], rel=2e-2)


def test_z0_cls_and_upper_limit_match_pyhf_infer(small):
    spec, tm, y, _, res = small
    m = _numpy_model(spec)
    init, bounds, fixed = (m.config.suggested_init(), m.config.suggested_bounds(), m.config.suggested_fixed())
    asimov1 = np.asarray(tm.asimov_data(y, 1.0))
    asimov0 = np.asarray(tm.asimov_data(y, 0.0))
    q0 = pyhf.infer.test_statistics.q0(0.0, asimov1, m, init, bounds, fixed)
    assert float(res["z0"][0]) == pytest.approx(np.sqrt(q0), rel=1e-6)
    p0 = pyhf.infer.hypotest(0.0, asimov1, m, test_stat="q0")
    assert float(res["z0"][0]) == pytest.approx(float(-jax.scipy.stats.norm.ppf(float(p0))), rel=1e-6)
    _, expected = pyhf.infer.hypotest(1.0, asimov0, m, test_stat="qtilde", return_expected=True)
    assert float(res["cls"][0]) == pytest.approx(float(expected), rel=1e-6)
    # the expected limit is where pyhf's median expected CLs crosses 0.05
    ul = float(res["upper_limit"][0])
    _, expected = pyhf.infer.hypotest(ul, asimov0, m, test_stat="qtilde", return_expected=True)
    assert float(expected) == pytest.approx(0.05, rel=1e-6)
    _, expected = pyhf.infer.hypotest(ul * 1.001, asimov0, m, test_stat="qtilde", return_expected=True)
    assert float(expected) < 0.05


def test_objective_gradients_match_finite_differences(small):
    """<grad, v> vs central differences along a random direction touching every yield,
    plus single leaves; the gradients of z0/cls/upper_limit come from the envelope
    theorem and implicit differentiation, the differences from full re-fits."""
    _, tm, y, vg, res = small
    rng = np.random.default_rng(0)
    v = jax.tree_util.tree_map(lambda a: rng.normal(size=np.shape(a)) * np.abs(a), y)
    h = 1e-4
    for name, f in vg.items():
        fp = f(jax.tree_util.tree_map(lambda a, d: a + h * d, y, v))[0]
        fm = f(jax.tree_util.tree_map(lambda a, d: a - h * d, y, v))[0]
        fd = (fp - fm) / (2 * h)
        g = res[name][1]
        ad = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
        assert ad == pytest.approx(float(fd), rel=1e-5, abs=1e-9), name
        for leaf in jax.tree_util.tree_leaves(g):
            assert np.all(np.isfinite(leaf)), name
    # one direction against pyhf's own numpy inference on rebuilt models
    m_of = lambda yy: _numpy_model(tm.workspace(yy))
    h = 1e-3

    def pyhf_z0(yy):
        m = m_of(yy)
        a1 = np.concatenate([m.expected_actualdata(np.asarray(tm.poi_pars(1.0))), m.config.auxdata])
        return float(np.sqrt(pyhf.infer.test_statistics.q0(
            0.0, a1, m, m.config.suggested_init(), m.config.suggested_bounds(), m.config.suggested_fixed())))

    fd = (pyhf_z0(jax.tree_util.tree_map(lambda a, d: a + h * d, y, v))
          - pyhf_z0(jax.tree_util.tree_map(lambda a, d: a - h * d, y, v))) / (2 * h)
    ad = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(res["z0"][1]), jax.tree_util.tree_leaves(v)))
    assert ad == pytest.approx(fd, rel=1e-3)


def test_losses_lower_is_better(small):
    _, _, y, vg, res = small
    assert O.SENSE == {"sigma_mu": 1.0, "z0": -1.0, "cls": 1.0, "upper_limit": 1.0}
    # more signal -> better sensitivity -> every loss decreases
    y2 = jax.tree_util.tree_map(lambda a: a, y)
    for c in y2:
        y2[c]["signal"] = dict(y2[c]["signal"], data=y[c]["signal"]["data"] * 1.5)
    for name, f in vg.items():
        assert O.SENSE[name] * float(f(y2)[0]) < O.SENSE[name] * float(res[name][0]), name
    with pytest.raises(KeyError):
        O.loss("nope")


@pytest.mark.slow  # (42 s; the small model's tests check the same objectives against pyhf by default)
def test_agc_like_model():
    """The benchmark's AGC-like model (stages.bench_likelihood): sigma_mu against the exact
    Hessian and finite differences; z0 against pyhf in a regime where the background-only
    fit pushes eight nuisances onto their bounds (the projected steps of the fit)."""
    spec = agc_like_workspace()
    tm = TracedModel.from_workspace(spec)
    assert tm.poi_name == "ttbar_norm" and tuple(tm.bounds[tm.poi_index]) == (0.0, 10.0)
    y = tm.yields_template()
    assert set(y["4j1b"]["ttbar"]["modifiers"]["Jet_energy_scale"]) == {"hi", "lo", "hi_data", "lo_data"}
    m = _numpy_model(spec)
    asimov = np.asarray(tm.asimov_data(y, 1.0))
    vg = jax.jit(jax.value_and_grad(lambda yy: O.sigma_mu(tm, yy)))
    sig, grad = vg(y)
    assert float(sig) == pytest.approx(_fd_hessian_sigma(m, asimov), rel=1e-4)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad))
    rng = np.random.default_rng(3)
    v = jax.tree_util.tree_map(lambda a: rng.normal(size=np.shape(a)) * np.abs(a), y)
    h = 1e-6  # sigma_mu has large third derivatives here; the error of FD is O(h^2)
    fd = (vg(jax.tree_util.tree_map(lambda a, d: a + h * d, y, v))[0]
          - vg(jax.tree_util.tree_map(lambda a, d: a - h * d, y, v))[0]) / (2 * h)
    ad = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(v)))
    assert ad == pytest.approx(float(fd), rel=1e-5)
    # z0: the conditional fit at POI=0 has nuisances on their bounds
    _, pars0 = jax.jit(lambda yy: O.profile_nll(tm, asimov, yy, 0.0))(y)
    lo, hi = tm.bounds[:, 0], tm.bounds[:, 1]
    assert np.sum(np.isclose(pars0, lo) | np.isclose(pars0, hi)) >= 4
    init, bounds, fixed = (m.config.suggested_init(), m.config.suggested_bounds(), m.config.suggested_fixed())
    q0 = pyhf.infer.test_statistics.q0(0.0, asimov, m, init, bounds, fixed)
    assert float(O.z0(tm, y)) == pytest.approx(np.sqrt(q0), rel=1e-6)


def test_jacobian_coloring():
    """The compressed forward-mode Jacobian of the fits: per-bin parameters share tangents,
    and the decompressed Jacobian is the full one."""
    spec = small_workspace()
    tm = TracedModel.from_workspace(spec)
    idx = O._indices(tm, include_poi=False)
    seed, color, pattern = O._jacobian_coloring(tm, idx)
    assert seed.shape == (len(idx), color.max() + 1) and seed.shape[1] < len(idx)
    for c in range(seed.shape[1]):  # columns sharing a tangent touch disjoint bins
        assert np.all(pattern[:, color == c].sum(axis=1) <= 1)
    y = jax.tree_util.tree_map(lambda a: a * 1.1, tm.yields_template())
    pars = jnp.asarray(tm.init) + 0.07
    bound = tm.bind(y)

    def lam(q):
        return bound.expected_actualdata(pars.at[idx].set(q))

    q = pars[idx]
    J = jax.jit(jax.jacfwd(lam))(q)  # compiled: op by op these two took most of the test's time
    Jc = jax.jit(jax.vmap(lambda v: jax.jvp(lam, (q,), (v,))[1], 1, 1))(jnp.asarray(seed))
    np.testing.assert_allclose(np.where(pattern, Jc[:, color], 0.0), J, rtol=1e-13, atol=0)


def test_gauss_newton_steps_reach_the_same_fit(monkeypatch):
    """A warm-started fit takes Gauss-Newton steps (never switching to exact ones here)
    and reaches pyhf's conditional fit, as the cold exact-Newton fit does."""
    spec = small_workspace()
    tm = TracedModel.from_workspace(spec)  # a fresh model: compiled anew with these settings
    monkeypatch.setattr(O.FitSettings, "slow_ratio", np.inf)
    y = tm.yields_template()
    m = _numpy_model(spec)
    init, bounds, fixed = (m.config.suggested_init(), m.config.suggested_bounds(), m.config.suggested_fixed())
    asimov1 = np.asarray(tm.asimov_data(y, 1.0))
    _, twice_nll = pyhf.infer.mle.fixed_poi_fit(0.0, asimov1, m, init, bounds, fixed, return_fitted_val=True)
    start = np.asarray(init, dtype=float) + 0.05  # a warm start: not the generating point
    start[m.config.poi_index] = 0.0
    for warm in (None, start):
        nll, pars = jax.jit(lambda y, s: O.profile_nll(tm, tm.asimov_data(y, 1.0), y, 0.0, init=s))(y, warm) \
            if warm is not None else O.profile_nll(tm, tm.asimov_data(y, 1.0), y, 0.0)
        assert float(nll) == pytest.approx(float(twice_nll) / 2.0, abs=1e-6)  # pyhf: twice the NLL


@pytest.mark.parametrize("workspace, n_local", [pytest.param(agc_like_workspace, 22, marks=pytest.mark.slow),
                                                (small_workspace, 0)])
def test_exact_hessian_from_global_columns(workspace, n_local):
    """The fits' exact Hessian -- forward-over-reverse columns along the global parameters,
    the Gauss-Newton block among the linear per-bin ones -- equals jax.hessian of pyhf's NLL.
    Where per-bin parameters multiply each other (staterror and shapesys on one sample) no
    parameter counts as local."""
    tm = TracedModel.from_workspace(workspace())
    idx = O._indices(tm, include_poi=False)
    seed, color, pattern = O._jacobian_coloring(tm, idx)
    local = O._linear_local_parameters(tm, idx, pattern)
    assert local.sum() == n_local
    rng = np.random.default_rng(3)
    y = jax.tree_util.tree_map(lambda a: a * rng.uniform(0.8, 1.2, np.shape(a)), tm.yields_template())
    bound = tm.bind(y)
    data = bound.asimov_data(1.0) * 1.3
    nm = tm.nmaindata
    base = tm.poi_pars(0.0)
    q = jnp.asarray(np.clip(tm.init[idx] + rng.uniform(-0.3, 0.3, len(idx)), 0.05, None))

    def nll(q):
        return bound.nll(base.at[idx].set(q), data)

    @jax.jit  # compiled: pyhf's graph evaluated op by op takes minutes here
    def assembled_and_reference(q):
        lam = bound.expected_actualdata(base.at[idx].set(q))
        J = jax.jacfwd(lambda q: bound.expected_actualdata(base.at[idx].set(q)))(q)
        hc = jnp.diag(jax.hessian(lambda q: bound.constraint_nll(base.at[idx].set(q), data[nm:]))(q))
        Hgn = (J.T * (data[:nm] / lam**2)) @ J + jnp.diag(hc)
        return O._exact_hessian(nll, len(idx), local)(q, Hgn), jax.hessian(nll)(q)

    H, H_ref = assembled_and_reference(q)
    np.testing.assert_allclose(H, H_ref, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(H))))
