"""Mixed precision (issue 25): float32 event arithmetic, float64 accumulation of the histograms.

* the yields (and so the Jacobians) come back in float64 whatever the batch dtype;
* at the default relaxation, float32 batches give yields within 1e-5 of their histogram's largest
  bin and Jacobian entries within 1e-3 of the largest entry of their row (d(one histogram)/d(one
  parameter)) compared with float64 batches of the same events.
"""

from __future__ import annotations

import numpy as np
import pytest

from jacana.bench.passes import jacobian_deviation, yields_deviation
from jacana.stages.analysis import default_params, default_relax, soft_config, soft_yields
from jacana.stages.batch import make_batches
from jacana.stages.columns import read_chunk
from jacana.stages.fileset import load_fileset
from jacana.stages.jacobian import yields_and_jacobian
from jacana.stages.spec import load_spec

YIELDS_TOLERANCE, JACOBIAN_TOLERANCE = 1e-5, 1e-3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(float32 part, float64 part) of the same events: the largest jet bucket of a nominal and of an
    alternative file (one shape each: few compilations)."""
    from jacana.samples.synthetic import generate

    path = generate(tmp_path_factory.mktemp("mixed"), events=1500, seed=22, files_per_sample=1, progress=False)
    spec = load_spec()
    fileset = load_fileset(path)
    out = {}
    for sample, variation in (("ttbar", "nominal"), ("ttbar", "PS_var")):
        cols = read_chunk(fileset.chunks(sample, variation, chunk_size=100_000)[0], spec)
        by_dtype = [make_batches(cols, spec, dtype=dt, prefilter=True).parts for dt in (np.float32, np.float64)]
        i = max(range(len(by_dtype[1])), key=lambda j: int(np.sum(by_dtype[1][j].event_mask)))
        out[f"{sample}/{variation}"] = (by_dtype[0][i], by_dtype[1][i])
    return spec, soft_config(spec), out


def test_float32_batches_accumulate_in_float64(pairs):
    spec, config, parts = pairs
    p32, p64 = parts["ttbar/nominal"]
    assert p32.dtype == np.float32 and p64.dtype == np.float64
    for part in (p32, p64):
        ylds = soft_yields(default_params(spec), default_relax(spec), part, config)
        assert all(np.asarray(h).dtype == np.float64 for by_kind in ylds.values() for h in by_kind.values())


def test_float32_yields_and_jacobians_agree_with_float64(pairs):
    spec, config, parts = pairs
    params, relax = default_params(spec), default_relax(spec)
    y32, j32, y64, j64 = {}, {}, {}, {}
    for key, (p32, p64) in parts.items():
        y32[key], j32[key] = yields_and_jacobian(params, relax, p32, config)
        y64[key], j64[key] = yields_and_jacobian(params, relax, p64, config)
        assert float(np.sum(np.asarray(y64[key]["4j2b"]["sumw"]))) > 0
    for key in parts:
        for region in y32[key]:
            for kind, by_param in j32[key][region].items():
                assert np.asarray(y32[key][region][kind]).dtype == np.float64
                assert all(np.asarray(j).dtype == np.float64 for j in by_param.values())
    y_dev, j_dev = yields_deviation(y32, y64), jacobian_deviation(j32, j64)
    assert y_dev <= YIELDS_TOLERANCE, y_dev
    assert j_dev <= JACOBIAN_TOLERANCE, j_dev
    assert y_dev > 0 and j_dev > 0  # float32 did run: not the float64 program twice


def test_deviation_metrics():
    ref = {"k": {"r": {"sumw": np.array([[100.0, 1.0, 0.0]]), "sumw2": np.zeros((1, 3))}}}
    low = {"k": {"r": {"sumw": np.array([[100.0, 1.001, 0.0]]), "sumw2": np.zeros((1, 3))}}}
    assert yields_deviation(low, ref) == pytest.approx(1e-5)  # 0.001 against the histogram's largest bin, 100
    jac = {"k": {"r": {"sumw": {"a": np.array([[2.0, 0.0]]), "e": np.array([[[1.0, 0.0], [0.0, 0.0]]])}}}}
    bad = {"k": {"r": {"sumw": {"a": np.array([[2.0, 0.0]]), "e": np.array([[[1.0, 0.0], [0.5, 0.0]]])}}}}
    assert jacobian_deviation(jac, jac) == 0.0
    # parameter "e", component 0: its row (the bins) has largest entry 1.0 and deviation 0.5
    assert jacobian_deviation(bad, jac) == pytest.approx(0.5)


def test_float32_m_bjj_keeps_improbable_high_pt_trijets():
    """A jet 48 sigma outside a cut (selection probability 1.4e-21) with 200 GeV more pT than the others
    still takes part in the soft m_bjj choice through exp(pT / T): float32 must choose as float64 does.
    (With a dtype-dependent weight floor, float32 dropped it: m_bjj 110 GeV instead of 996 GeV. On the
    synthetic samples such events made float32 miss the 1e-5 yields target at 250k events.)"""
    import jax
    import jax.numpy as jnp

    from jacana.stages.observables.kinematics import soft_mbjj
    from jacana.stages.selection.soft import soft_step

    rng = np.random.default_rng(21)
    pt = np.array([300.0, 91.0, 65.5, 47.3, 31.4, 27.7, 25.8, 24.3])
    eta = np.concatenate([[2.4 + 48 * 0.05], rng.uniform(-2, 2, 7)])  # the first jet fails |eta| < 2.4 by 48 sigma
    phi, mass = rng.uniform(-3, 3, 8), rng.uniform(4, 12, 8)
    btag = np.array([0.0, 0.0, 0.1, 0.6, 0.1, 0.3, 0.99, 0.7])

    def m_bjj(theta, dtype, keep=np.ones(8)):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        p = soft_step(cast(pt), theta[0], 2.0) * soft_step(theta[1], jnp.abs(cast(eta)), 0.05) * cast(keep)
        q = soft_step(cast(btag), theta[2], 0.02)
        return soft_mbjj(cast(pt), cast(np.cos(phi)), cast(np.sin(phi)), cast(np.sinh(eta)), cast(mass), p, q,
                         jnp.asarray(5.0, dtype))

    def both(dtype):
        theta = jnp.asarray([25.0, 2.4, 0.5], dtype)
        return float(m_bjj(theta, dtype)), np.asarray(jax.jacfwd(m_bjj)(theta, dtype), np.float64)

    (m64, g64), (m32, g32) = both(jnp.float64), both(jnp.float32)
    without = float(m_bjj(jnp.asarray([25.0, 2.4, 0.5]), jnp.float64, np.arange(8) > 0))  # the first jet removed
    assert m64 > 2 * without  # the improbable trijets dominate in float64
    # float32's own rounding of log weights near -48 (4e-6) on a 110 / 996 GeV mixture: 1.7e-5 here
    assert abs(m32 - m64) <= 1e-4 * m64, (m32, m64)
    assert np.max(np.abs(g32 - g64)) <= 1e-3 * np.max(np.abs(g64)), (g32, g64)


def test_float32_m_bjj_at_narrow_temperatures_takes_the_selection_in_log_space():
    """At a tenth of the default temperatures a jet 100 sigma outside the |eta| cut has selection
    probability 4e-44: 0 in float32, but float64's m_bjj still lets its trijet win through
    exp(dpT / 0.5 GeV). The float32 program takes m_bjj's per-jet log weights from the cuts' logits
    (log_soft_steps), so it fills the 4j2b histogram as float64 does. Through soft_yields."""
    from jacana.stages.batch import EventBatch

    spec = load_spec()
    config, relax, params = soft_config(spec), default_relax(spec, scale=0.1), default_params(spec)
    rng = np.random.default_rng(4)
    n, k = 128, 8
    pt = np.tile([200.0, 91.0, 65.5, 47.3, 31.4, 27.7, 25.8, 24.3], (n, 1))
    eta = rng.uniform(-2.0, 2.0, (n, k))
    eta[:, 0] = 2.4 + 100 * 0.005  # the leading jet: 100 sigma outside |eta| < 2.4
    phi, mass = rng.uniform(-3, 3, (n, k)), rng.uniform(4, 12, (n, k))
    btag = np.tile([0.9, 0.8, 0.1, 0.6, 0.1, 0.3, 0.2, 0.1], (n, 1))  # the selected jets: two tagged

    def histogram(dtype, first_jet=True):
        cast = lambda a: np.asarray(a, dtype)  # noqa: E731
        mask = np.ones((n, k), bool)
        mask[:, 0] = first_jet
        batch = EventBatch(lepton_pt=cast(np.full((n, 1), 40.0)), lepton_mask=np.ones((n, 1), bool),
                           lepton_is_muon=np.ones((n, 1), bool), jet_pt=cast(pt[:, None, :]), jet_eta=cast(eta),
                           jet_cos_phi=cast(np.cos(phi)), jet_sin_phi=cast(np.sin(phi)), jet_sinh_eta=cast(np.sinh(eta)),
                           jet_mass=cast(mass), jet_btag=cast(btag), jet_mask=mask, weight=cast(np.ones(n)),
                           event_mask=np.ones(n, bool), weight_variations=False, block_size=n)
        return np.asarray(soft_yields(params, relax, batch, config)["4j2b"]["sumw"][0], np.float64)

    h64, h32 = histogram(np.float64), histogram(np.float32)
    without = histogram(np.float64, first_jet=False)
    assert np.sum(np.abs(h64 - without)) > 0.5 * n  # the improbable trijets decide float64's m_bjj
    np.testing.assert_allclose(h32, h64, atol=1e-4 * n)
    assert np.sum(h64) > 0.25 * n  # most events pass, and their m_bjj is inside the edges


def _dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in a jaxpr and in the jaxprs nested in its equations."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    out += _dot_precisions(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    out += _dot_precisions(sub)
    return out


def test_event_matrix_products_ask_for_full_precision(pairs):
    """Every matrix product of the float32 gradient step asks for HIGHEST precision: JAX's default lets
    a GPU run float32 products in TF32 (10-bit mantissa), 70x worse against float64 on an H200."""
    import jax

    from jacana.stages.jacobian import yields_and_jacobian_call

    spec, config, parts = pairs
    p32, _ = parts["ttbar/nominal"]
    params, relax = default_params(spec), default_relax(spec)
    jaxpr = jax.make_jaxpr(lambda p: yields_and_jacobian_call.__wrapped__(p, relax, p32, config))(params)
    precisions = _dot_precisions(jaxpr.jaxpr)
    assert len(precisions) >= 6  # the trijet sums, the log weights, the coefficients, the histogram fills
    highest = jax.lax.Precision.HIGHEST
    assert all(p is not None and all(q == highest for q in (p if isinstance(p, tuple) else (p,)))
               for p in precisions), precisions


def test_float32_m_bjj_derivatives_stay_finite_when_no_jet_is_likely_tagged():
    """Every jet 87 sigma below the b-tag cut (q ~ 1e-38, the edge of float32): d m_bjj / d(log N)
    carries N / (1 - N) ~ 1e38 against tangents ~ q; uncapped it overflowed float32 and made the whole
    forward-mode Jacobian NaN. Capped, float32 agrees with float64."""
    import jax
    import jax.numpy as jnp

    from jacana.stages.observables.kinematics import soft_mbjj
    from jacana.stages.selection.soft import soft_step

    rng = np.random.default_rng(4)
    pt = np.array([120.0, 91.0, 65.5, 47.3, 31.4, 27.7, 25.8, 24.3])
    eta, phi, mass = rng.uniform(-2, 2, 8), rng.uniform(-3, 3, 8), rng.uniform(4, 12, 8)
    btag = 0.5 - 87.0 * 0.005 + rng.uniform(0, 0.002, 8)

    def m_bjj(theta, dtype):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        p = soft_step(cast(pt), theta[0], 2.0) * soft_step(theta[1], jnp.abs(cast(eta)), 0.05)
        q = soft_step(cast(btag), theta[2], 0.005)
        return soft_mbjj(cast(pt), cast(np.cos(phi)), cast(np.sin(phi)), cast(np.sinh(eta)), cast(mass), p, q,
                         jnp.asarray(5.0, dtype))

    out = {}
    for dtype in (jnp.float64, jnp.float32):
        theta = jnp.asarray([25.0, 2.4, 0.5], dtype)
        out[dtype] = (float(m_bjj(theta, dtype)), np.asarray(jax.jacfwd(m_bjj)(theta, dtype), np.float64))
    (m64, g64), (m32, g32) = out[jnp.float64], out[jnp.float32]
    assert m64 > 0 and abs(m32 - m64) <= 1e-5 * m64
    assert np.all(np.isfinite(g32))
    assert np.max(np.abs(g32 - g64)) <= 1e-3 * np.max(np.abs(g64)), (g32, g64)


def test_executors_take_the_precision_as_an_option(tmp_path):
    """make_executor(dtype="float32") (jacana optimize --dtype float32) gives float32 batches; coffea's
    Runner, which builds its own float64 batches, refuses it by name."""
    from jacana.facility.factory import make_executor
    from jacana.facility.hardrun import analysis_chunks
    from jacana.samples.synthetic import generate

    spec = load_spec()
    fileset = load_fileset(generate(tmp_path, events=600, seed=23, files_per_sample=1, progress=False))
    executor = make_executor(spec, analysis_chunks(spec, fileset), dtype="float32")
    try:
        assert {b.dtype for calls in executor.batches.values() for b in calls} == {np.dtype(np.float32)}
    finally:
        executor.close()
    with pytest.raises(ValueError, match="float32.*in-process or dask"):
        make_executor(spec, [], coffea="iterative", fileset=fileset, dtype="float32")


@pytest.mark.slow  # (about 60 s: two short optimisations)
def test_optimize_in_mixed_precision_follows_float64(tmp_path):
    """jacana optimize --dtype float32: the same steps as float64 to float32's accuracy, recorded in result.json."""
    import json

    from jacana.cli.main import main
    from jacana.samples.synthetic import generate

    train = generate(tmp_path / "train", events=6000, seed=31, progress=False)
    held_out = generate(tmp_path / "validate", events=6000, seed=32, progress=False)
    results = {}
    for dtype in ("float64", "float32"):
        out = tmp_path / dtype
        assert main(["optimize", "--fileset", str(train), "--validation-fileset", str(held_out), "--steps", "3",
                     "--out", str(out), "--dtype", dtype, "--quiet", "--no-plots"]) == 0
        results[dtype] = json.loads((out / "result.json").read_text())
    assert results["float32"]["settings"]["dtype"] == "float32"
    h32, h64 = results["float32"]["history"], results["float64"]["history"]
    assert [h["loss"] for h in h32] == pytest.approx([h["loss"] for h in h64], rel=1e-4)
    for name, value in results["float64"]["final_params"].items():
        assert results["float32"]["final_params"][name] == pytest.approx(value, rel=1e-4, abs=1e-6)
