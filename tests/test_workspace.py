"""Histograms -> pyhf workspace: valid for pyhf and cabinetry, cabinetry's NormPlusShape numbers."""

from __future__ import annotations

import numpy as np
import pyhf
import pytest

from jacana.stages.stats.inference import evaluate_workspace, numpy_backend
from jacana.stages.spec import load_spec
from jacana.stages.stats.workspace import build_workspace, norm_plus_shape


def random_histograms(spec, seed=0, scale=None, spread=0.1):
    """Smooth AGC-shaped histograms, variations within +-``spread`` per bin, sumw2 = 0.1 sumw."""
    rng = np.random.default_rng(seed)
    scale = scale or {"ttbar": 2000.0, "wjets": 600.0, "single_top_t_chan": 150.0, "single_top_tW": 100.0,
                      "single_top_s_chan": 20.0}
    out = {}
    for region, r in spec.regions.items():
        nb = len(r.edges) - 1
        shape = np.exp(-0.5 * ((np.arange(nb) - 3.0) / 3.0) ** 2) + 0.1
        out[region] = {}
        for sample in spec.samples:
            nominal = scale[sample] * shape / shape.sum()
            out[region][sample] = {}
            for var in spec.histogram_variations(sample):
                factor = 1.0 if var == "nominal" else rng.uniform(1 - spread, 1 + spread, nb)
                sumw = nominal * factor
                out[region][sample][var] = {"edges": r.edges, "sumw": sumw, "sumw2": sumw * 2.0}
    return out


def test_norm_plus_shape_matches_cabinetry_formulas():
    nom = np.array([10.0, 20.0, 30.0])
    up = np.array([12.0, 21.0, 30.0])
    norm, shape = norm_plus_shape(nom, up)
    assert norm["hi"] == pytest.approx(63 / 60) and norm["lo"] == pytest.approx(2 - 63 / 60)
    np.testing.assert_allclose(shape["hi_data"], up * 60 / 63)
    np.testing.assert_allclose(shape["lo_data"], 2 * nom - up * 60 / 63)
    down = np.array([9.0, 19.0, 29.0])
    norm, shape = norm_plus_shape(nom, up, down)
    assert norm["lo"] == pytest.approx(57 / 60)
    np.testing.assert_allclose(shape["lo_data"], down * 60 / 57)


def test_workspace_is_valid_and_loads_in_pyhf_and_cabinetry():
    spec = load_spec()
    ws_spec = build_workspace(spec, random_histograms(spec))
    ws = pyhf.Workspace(ws_spec)  # validates against pyhf's schema
    model = ws.model()
    assert model.config.poi_name == "ttbar_norm"
    assert list(model.config.suggested_bounds()[model.config.poi_index]) == [0.0, 10.0]
    assert {"jes", "jer", "btag_0", "btag_3", "lumi", "wjets_norm", "ttbar_me", "ttbar_ps", "ttbar_scale",
            "staterror_4j1b", "staterror_4j2b"} <= set(model.config.parameters)
    assert model.config.channel_nbins == {"4j1b": 11, "4j2b": 11}
    cabinetry = pytest.importorskip("cabinetry")
    cab_model, cab_data = cabinetry.model_utils.model_and_data(ws_spec)
    assert cab_model.config.npars == model.config.npars


@pytest.mark.slow  # (15 s; tests/test_evaluate.py checks result.json against pyhf's fit by default)
def test_pyhf_reproduces_the_fit():
    """result.json's numbers are pyhf's: its numpy fit, and the exact Fisher information."""
    import jax

    jax.config.update("jax_enable_x64", True)
    spec = load_spec()
    ws_spec = build_workspace(spec, random_histograms(spec))
    result = evaluate_workspace(ws_spec)
    with numpy_backend():
        model = pyhf.Workspace(ws_spec).model()
        data = pyhf.Workspace(ws_spec).data(model)
        bestfit = pyhf.infer.mle.fit(data, model)
    assert result["ttbar_norm"]["value"] == pytest.approx(bestfit[model.config.poi_index], abs=1e-6)
    # The expected uncertainty is the Fisher information at the Asimov point (autodiff, jax backend).
    previous = pyhf.get_backend()
    pyhf.set_backend("jax")
    try:
        jmodel = pyhf.Workspace(ws_spec).model()
        init = jax.numpy.asarray(jmodel.config.suggested_init())
        # compiled: pyhf's graph evaluated op by op took about a minute here
        asimov = jax.jit(jmodel.expected_data)(init)
        hess = jax.jit(jax.hessian(lambda p: -jmodel.logpdf(p, asimov)[0]))(init)
    finally:
        pyhf.set_backend(*previous)
    fisher_sigma = float(np.sqrt(np.linalg.inv(np.asarray(hess))[model.config.poi_index, model.config.poi_index]))
    assert result["expected"]["sigma_mu"] == pytest.approx(fisher_sigma, rel=1e-3)
    assert 0 < result["ttbar_norm"]["uncertainty"] < 1
    assert result["ttbar_norm"]["converged"] is True


def test_negative_weight_bins_give_a_valid_model():
    """A sparse bin left below zero by negative-weight events (W+jets, weight ~174) must not make pyhf NaN."""
    spec = load_spec()
    hists = random_histograms(spec, seed=3)
    for var in hists["4j2b"]["wjets"].values():
        var["sumw"][4] = -174.0
    ws = build_workspace(spec, hists)
    sample = next(s for c in ws["channels"] if c["name"] == "4j2b" for s in c["samples"] if s["name"] == "wjets")
    assert sample["data"][4] == 0.0
    result = evaluate_workspace(ws)
    assert np.isfinite(result["expected"]["sigma_mu"]) and result["expected"]["sigma_mu"] > 0


def test_a_bin_empty_in_every_sample_keeps_a_positive_expected_uncertainty():
    """After tight cuts a bin can be empty in every template; the expected uncertainty must stay the
    Fisher information of the other bins (second differences of the full NLL went indefinite there
    and were reported as sigma_mu = 0)."""
    spec = load_spec()
    hists = random_histograms(spec, seed=5)
    for by_var in hists["4j1b"].values():
        for var in by_var.values():
            var["sumw"][0] = 0.0
            var["sumw2"][0] = 0.0
    result = evaluate_workspace(build_workspace(spec, hists))
    full = evaluate_workspace(build_workspace(spec, random_histograms(spec, seed=5)))
    assert 0 < result["expected"]["sigma_mu"]
    assert result["expected"]["sigma_mu"] >= full["expected"]["sigma_mu"] * (1 - 1e-9)  # less information


def test_an_indefinite_hessian_is_an_error_not_a_zero_uncertainty():
    from jacana.stages.stats.inference import FitError, _uncertainties

    free = np.array([True, True])
    with pytest.raises(FitError, match="not positive definite"):
        _uncertainties(np.array([[1.0, 2.0], [2.0, 1.0]]), free, 2, "test Hessian")
    assert _uncertainties(np.diag([4.0, 0.25]), free, 2, "test Hessian") == pytest.approx([0.5, 2.0])


def test_observed_fit_keeps_its_value_when_the_hessian_is_indefinite(monkeypatch):
    """A non-positive-definite finite-difference Hessian (a parameter at its bound) must not throw
    the fitted value away: the uncertainties then come from the Fisher information, and say so."""
    from jacana.stages.stats import inference

    spec = load_spec()
    ws = build_workspace(spec, random_histograms(spec))
    good = evaluate_workspace(ws)
    assert good["ttbar_norm"]["uncertainty_from"] == "hessian"
    monkeypatch.setattr(inference, "nll_hessian", lambda model, data, pars: -np.eye(len(pars)))
    result = evaluate_workspace(ws)
    assert result["ttbar_norm"]["converged"] is False  # a fallback uncertainty is never "converged" (issue 22)
    assert result["ttbar_norm"]["value"] == pytest.approx(good["ttbar_norm"]["value"], rel=1e-9)
    assert result["ttbar_norm"]["uncertainty_from"] == "fisher"
    assert result["ttbar_norm"]["uncertainty"] == pytest.approx(good["ttbar_norm"]["uncertainty"], rel=0.2)
