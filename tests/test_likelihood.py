"""TracedModel: pyhf's likelihood on traced yields, checked against freshly built numpy pyhf models."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pyhf
import pytest
from jacana.stages.errors import JacanaError, ModelStructureError
from jacana.stages.stats.likelihood import TracedModel, pyhf_jax_backend

TOL = {"rtol": 1e-10, "atol": 1e-10}


def random_workspace(seed=0, nbins=(3, 2), with_lumi=True):
    """Two channels; signal (normfactor, normsys, lumi), two backgrounds
    (histosys, normsys, staterror shared per channel, shapesys on one), and a
    sample that exists only in the first channel."""
    rng = np.random.default_rng(seed)
    channels, observations = [], []
    for ci, nb in enumerate(nbins):
        c = f"ch{ci}"

        def arr(lo, hi, nb=nb):
            return rng.uniform(lo, hi, nb).round(6).tolist()

        sig = {
            "name": "signal",
            "data": arr(2, 10),
            "modifiers": [
                {"name": "mu", "type": "normfactor", "data": None},
                {"name": "sig_xs", "type": "normsys", "data": {"hi": 1.05 + 0.05 * ci, "lo": 0.93}},
            ],
        }
        b1d = np.asarray(arr(40, 80))
        b1 = {
            "name": "bkg1",
            "data": b1d.tolist(),
            "modifiers": [
                {
                    "name": "jes",
                    "type": "histosys",
                    "data": {
                        "hi_data": (b1d * rng.uniform(1.02, 1.1, nb)).tolist(),
                        "lo_data": (b1d * rng.uniform(0.9, 0.98, nb)).tolist(),
                    },
                },
                {"name": f"stat_{c}", "type": "staterror", "data": (np.sqrt(b1d) * 0.8).tolist()},
                {"name": "b1_norm", "type": "normsys", "data": {"hi": 1.1, "lo": 0.88}},
            ],
        }
        b2d = np.asarray(arr(10, 30))
        b2 = {
            "name": "bkg2",
            "data": b2d.tolist(),
            "modifiers": [
                {"name": f"stat_{c}", "type": "staterror", "data": (np.sqrt(b2d) * 0.7).tolist()},
                {"name": f"b2_shape_{c}", "type": "shapesys", "data": (b2d * 0.1).tolist()},
                {
                    "name": "jes",
                    "type": "histosys",
                    "data": {
                        "hi_data": (b2d * 1.05).tolist(),
                        "lo_data": (b2d * 0.97).tolist(),
                    },
                },
            ],
        }
        samples = [sig, b1, b2]
        if with_lumi:
            for s in (sig, b1):
                s["modifiers"].append({"name": "lumi", "type": "lumi", "data": None})
        if ci == 0:
            samples.append(
                {
                    "name": "fakes",
                    "data": arr(3, 6),
                    "modifiers": [{"name": "fake_norm", "type": "normsys", "data": {"hi": 1.3, "lo": 0.7}}],
                }
            )
        channels.append({"name": c, "samples": samples})
        observations.append({"name": c, "data": arr(60, 120)})
    params = [{"name": "lumi", "auxdata": [1.0], "sigmas": [0.03], "bounds": [[0.5, 1.5]], "inits": [1.0]}]
    return {
        "channels": channels,
        "observations": observations,
        "measurements": [{"name": "meas", "config": {"poi": "mu", "parameters": params if with_lumi else []}}],
        "version": "1.0.0",
    }


def numpy_model(ws_spec):
    pyhf.set_backend("numpy")
    return pyhf.Workspace(ws_spec).model()


def perturb(tm, seed, scale=0.2):
    """Random positive yields near the template (every leaf changed)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a * rng.uniform(1 - scale, 1 + scale, np.shape(a))), tm.yields_template()
    )


def random_pars(model, seed):
    rng = np.random.default_rng(seed)
    init = np.asarray(model.config.suggested_init(), dtype=float)
    bounds = np.asarray(model.config.suggested_bounds())
    p = init + rng.normal(0, 0.3, init.shape)
    # stay inside the bounds, and exercise |alpha| > 1 interpolation branches
    p[0] = 1.7
    return np.clip(p, bounds[:, 0] + 1e-3, bounds[:, 1] - 1e-3)


@pytest.fixture(scope="module")
def ws():
    return random_workspace()


@pytest.fixture(scope="module")
def tm(ws):
    return TracedModel.from_workspace(ws)


def test_template_parity(ws, tm):
    m = numpy_model(ws)
    assert tm.par_names == m.config.par_names
    assert tm.poi_name == "mu" and tm.poi_index == m.config.poi_index
    y = tm.yields_template()
    assert set(y) == {"ch0", "ch1"} and "fakes" in y["ch0"] and "fakes" not in y["ch1"]
    assert set(y["ch0"]["bkg2"]["modifiers"]) == {"stat_ch0", "b2_shape_ch0", "jes"}
    np.testing.assert_allclose(tm.auxdata(y), m.config.auxdata, **TOL)
    for seed in range(3):
        pars = random_pars(m, seed)
        data = np.asarray(m.expected_data(pars)) * np.random.default_rng(seed).uniform(0.9, 1.1, m.config.nmaindata + m.config.nauxdata)
        np.testing.assert_allclose(tm.logpdf(pars, data, y), m.logpdf(pars, data)[0], **TOL)
        np.testing.assert_allclose(tm.expected_data(pars, y), m.expected_data(pars), **TOL)
        np.testing.assert_allclose(
            tm.expected_data(pars, y, include_auxdata=False),
            m.expected_data(pars, include_auxdata=False),
            **TOL,
        )
    assert pyhf.tensorlib.name == "numpy"


def test_constraint_nll_for_other_auxdata(ws, tm):
    """BoundModel.constraint_nll: pyhf's constraint term, for its own or for given auxdata."""
    m = numpy_model(ws)
    y = perturb(tm, 5)
    m5 = numpy_model(tm.workspace(y))
    pars = random_pars(m, 4)
    aux = np.asarray(m5.config.auxdata) * np.random.default_rng(4).uniform(0.9, 1.1, m5.config.nauxdata)
    bound = tm.bind(y)
    np.testing.assert_allclose(
        bound.constraint_nll(pars), -np.sum(m5.constraint_logpdf(np.asarray(m5.config.auxdata), pars)), **TOL
    )
    np.testing.assert_allclose(bound.constraint_nll(pars, aux), -np.sum(m5.constraint_logpdf(aux, pars)), **TOL)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_modified_yields_match_fresh_numpy_model(tm, seed):
    """Change every yield; compare with a numpy model freshly built from the modified spec."""
    y = perturb(tm, seed)
    fresh = numpy_model(tm.workspace(y))
    pars = random_pars(fresh, seed)
    rng = np.random.default_rng(100 + seed)
    main = rng.poisson(np.asarray(fresh.expected_actualdata(pars))).astype(float)
    data = np.concatenate([main, fresh.config.auxdata])
    logpdf = jax.jit(tm.logpdf)
    np.testing.assert_allclose(logpdf(pars, data, y), fresh.logpdf(pars, data)[0], **TOL)
    np.testing.assert_allclose(tm.expected_data(pars, y), fresh.expected_data(pars), **TOL)
    np.testing.assert_allclose(tm.auxdata(y), fresh.config.auxdata, **TOL)
    asimov = np.concatenate(
        [fresh.expected_actualdata(np.asarray(tm.poi_pars(0.5))), fresh.config.auxdata]
    )
    np.testing.assert_allclose(tm.asimov_data(y, 0.5), asimov, **TOL)


def test_interpolation_codes_from_modifier_settings():
    ws = random_workspace(seed=5)
    settings = {"normsys": {"interpcode": "code1"}, "histosys": {"interpcode": "code0"}}
    tm = TracedModel.from_workspace(ws, modifier_settings=settings)
    y = perturb(tm, 7)
    fresh = pyhf.Workspace(tm.workspace(y)).model(modifier_settings=settings)
    pars = random_pars(fresh, 3)
    data = np.asarray(fresh.expected_data(pars)) + 1.0
    np.testing.assert_allclose(tm.logpdf(pars, data, y), fresh.logpdf(pars, data)[0], **TOL)


def test_jit_vmap(tm):
    ys = [perturb(tm, s) for s in (11, 12, 13)]
    batched = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)
    pars = jnp.asarray(tm.init) + 0.05
    data = tm.asimov_data(ys[0], 1.0)
    vg = jax.vmap(jax.value_and_grad(tm.logpdf, argnums=2), in_axes=(None, None, 0))
    out, grads = jax.jit(vg)(pars, data, batched)
    for i, y in enumerate(ys):
        np.testing.assert_allclose(out[i], tm.logpdf(pars, data, y), **TOL)
    # gradient of item 1 along a random direction vs central differences
    rng = np.random.default_rng(0)
    v = jax.tree_util.tree_map(lambda a: rng.normal(size=np.shape(a)), ys[1])
    h = 1e-6
    fd = (
        tm.logpdf(pars, data, jax.tree_util.tree_map(lambda a, d: a + h * d, ys[1], v))
        - tm.logpdf(pars, data, jax.tree_util.tree_map(lambda a, d: a - h * d, ys[1], v))
    ) / (2 * h)
    g1 = jax.tree_util.tree_map(lambda a: a[1], grads)
    ad = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(v)))
    assert ad == pytest.approx(float(fd), rel=1e-6)


def _leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _set_leaf(tree, path, index, value):
    tree = copy.deepcopy(tree)
    node = tree
    for k in path[:-1]:
        node = node[k.key]
    arr = np.array(node[path[-1].key], dtype=float)
    arr[index] = value
    node[path[-1].key] = arr
    return tree


def test_gradients_match_finite_differences_of_rebuilt_numpy_models():
    """d/d(every yield) of logpdf and of the Asimov data vs central differences of
    numpy pyhf models rebuilt from the perturbed spec."""
    ws = random_workspace(seed=3, nbins=(2, 1))
    tm = TracedModel.from_workspace(ws)
    y = perturb(tm, 4)
    base = numpy_model(tm.workspace(y))
    pars = random_pars(base, 2)
    pars[tm.poi_index] = 1.3
    data = np.concatenate(
        [np.asarray(base.expected_actualdata(pars)) * 1.07 + 0.5, base.config.auxdata]
    )
    w = np.random.default_rng(9).normal(size=base.config.nmaindata + base.config.nauxdata)

    def ours(yy):
        return tm.logpdf(pars, data, yy) + jnp.dot(w, tm.asimov_data(yy, 0.8))

    dummy_obs = np.zeros(tm.nmaindata)

    def reference(yy):
        m = numpy_model(tm.workspace(yy, observations=dummy_obs))
        asimov = np.concatenate(
            [m.expected_actualdata(np.asarray(tm.poi_pars(0.8))), m.config.auxdata]
        )
        return m.logpdf(pars, data)[0] + np.dot(w, asimov)

    np.testing.assert_allclose(ours(y), reference(y), **TOL)
    grad = jax.jit(jax.grad(ours))(y)
    gleaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in _leaves_with_paths(grad)}
    n_checked = 0
    for path, leaf in _leaves_with_paths(y):
        leaf = np.asarray(leaf)
        for index in np.ndindex(leaf.shape):
            x = float(leaf[index])
            h = 1e-5 * max(1.0, abs(x))
            fd = (reference(_set_leaf(y, path, index, x + h)) - reference(_set_leaf(y, path, index, x - h))) / (2 * h)
            g = gleaves[jax.tree_util.keystr(path)][index]
            assert g == pytest.approx(fd, rel=2e-6, abs=2e-6), (jax.tree_util.keystr(path), index)
            n_checked += 1
    assert n_checked == sum(np.size(a) for a in jax.tree_util.tree_leaves(y))
    assert n_checked > 30


def test_structural_changes_are_refused(tm):
    y = tm.yields_template()
    bad = copy.deepcopy(y)
    del bad["ch0"]["bkg2"]["modifiers"]["stat_ch0"]
    with pytest.raises(ModelStructureError, match="stat_ch0"):
        tm.logpdf(tm.init, tm.asimov_data(y), bad)
    bad = copy.deepcopy(y)
    bad["ch1"]["signal"]["modifiers"]["new_stat"] = {"data": np.ones(2)}
    with pytest.raises(ModelStructureError, match="new_stat"):
        tm.asimov_data(bad)
    bad = copy.deepcopy(y)
    bad["ch1"]["bkg1"]["data"] = np.ones(3)
    with pytest.raises(ModelStructureError, match="shape"):
        jax.jit(tm.asimov_data)(bad)
    bad = copy.deepcopy(y)
    bad["ch1"]["fakes"] = copy.deepcopy(y["ch0"]["fakes"])
    with pytest.raises(ModelStructureError, match="fakes"):
        tm.asimov_data(bad)
    bad = copy.deepcopy(y)
    bad["ch0"]["signal"]["modifiers"]["mu"] = {"data": np.ones(3)}
    with pytest.raises(JacanaError, match="normfactor"):
        tm.asimov_data(bad)
    # normfactor / lumi entries may be omitted or empty
    ok = copy.deepcopy(y)
    ok["ch0"]["signal"]["modifiers"]["mu"] = {}
    ok["ch0"]["signal"]["modifiers"]["lumi"] = None
    np.testing.assert_allclose(tm.asimov_data(ok), tm.asimov_data(y), **TOL)
    assert pyhf.tensorlib.name == "numpy"


def test_zero_yields_give_finite_gradients(tm):
    y = tm.yields_template()
    for s in ("bkg2", "signal"):
        y["ch1"][s]["data"] = np.zeros(2)
    y["ch1"]["bkg2"]["modifiers"]["stat_ch1"]["data"] = np.zeros(2)
    y["ch1"]["bkg2"]["modifiers"]["b2_shape_ch1"]["data"] = np.zeros(2)
    y["ch1"]["bkg1"]["modifiers"]["stat_ch1"]["data"] = np.zeros(2)
    y["ch0"]["signal"]["modifiers"]["sig_xs"] = {"hi": np.asarray(0.0), "lo": np.asarray(0.0)}
    pars = jnp.asarray(tm.init).at[0].set(0.3)
    data = tm.asimov_data(tm.yields_template())

    def f(yy):
        return tm.logpdf(pars, data, yy) + jnp.sum(tm.asimov_data(yy))

    v, g = jax.jit(jax.value_and_grad(f))(y)
    assert np.isfinite(v)
    for leaf in jax.tree_util.tree_leaves(g):
        assert np.all(np.isfinite(leaf))


def test_backend_is_restored(tm):
    pyhf.set_backend("numpy", "minuit")
    # tracing enters pyhf's JAX backend and leaves it
    jaxpr = jax.make_jaxpr(lambda yy: tm.bind(yy).asimov_data(1.0))(tm.yields_template())
    assert jaxpr.out_avals[0].shape == (tm.nmaindata + tm.nauxdata,)
    assert pyhf.tensorlib.name == "numpy" and pyhf.optimizer.name == "minuit"
    assert pyhf.default_backend.name == "numpy"
    with pyhf_jax_backend():
        assert pyhf.tensorlib.name == "jax" and pyhf.default_backend.name == "jax"
    assert pyhf.tensorlib.name == "numpy" and pyhf.default_backend.name == "numpy"
    with pytest.raises(RuntimeError), pyhf_jax_backend():
        raise RuntimeError("boom")
    assert pyhf.tensorlib.name == "numpy"
    pyhf.set_backend("numpy")


def test_workspace_loads_in_pyhf_and_cabinetry(tm):
    cabinetry = pytest.importorskip("cabinetry")
    y = perturb(tm, 21)
    spec = tm.workspace(y)
    pyhf.set_backend("numpy")
    ws = pyhf.Workspace(spec)  # validates against pyhf's schema
    model, data = cabinetry.model_utils.model_and_data(spec)
    np.testing.assert_allclose(data, tm.asimov_data(y, 1.0), **TOL)
    pars = np.asarray(model.config.suggested_init())
    np.testing.assert_allclose(model.logpdf(pars, data)[0], tm.logpdf(pars, data, y), **TOL)
    fit = cabinetry.fit.fit(model, data)
    assert fit.bestfit[model.config.poi_index] == pytest.approx(1.0, abs=1e-3)
    assert ws.model().config.par_names == tm.par_names
