"""Statistical model health (issue 22): the rate floor, the +-5 sigma workspace check, fit diagnostics
and errors that name what is empty, on small histograms and hand-made models (fast)."""

from __future__ import annotations

import copy

import numpy as np
import pyhf
import pytest

from test_workspace import random_histograms  # the same smooth AGC-shaped histograms
from jacana.analysis.evaluate import check_model, evaluate_histograms, format_summary
from jacana.stages.spec import load_spec
from jacana.stages.stats import workspace as workspace_module
from jacana.stages.stats.health import check_workspace, histogram_warnings
from jacana.stages.stats.inference import (
    FitError,
    _uncertainties,
    evaluate_workspace,
    numpy_backend,
)
from jacana.stages.stats.workspace import (
    ALPHA_MAX,
    SHAPE_FLOOR,
    build_workspace,
    floored_templates,
    norm_plus_shape,
    pseudo_data,
    rate_floor,
)

SCALE = {"ttbar": 2000.0, "wjets": 600.0, "single_top_t_chan": 150.0, "single_top_tW": 100.0,
         "single_top_s_chan": 20.0}


@pytest.fixture(scope="module")
def spec():
    return load_spec()


def histograms(spec, seed=0, spread=0.05):
    """Smooth AGC-shaped histograms with mild variations (nothing near the floor) and ample MC statistics."""
    return random_histograms(spec, seed, scale=SCALE, spread=spread)


def set_bin(hists, region, k, values):
    """Set bin ``k`` of ``region`` to ``values(sample, variation) -> (sumw, sumw2)`` everywhere."""
    for sample, by_var in hists[region].items():
        for var, h in by_var.items():
            h["sumw"], h["sumw2"] = np.array(h["sumw"], dtype=float), np.array(h["sumw2"], dtype=float)
            h["sumw"][k], h["sumw2"][k] = values(sample, var)


def rates_by_sample(ws_spec, par, value):
    """pyhf's (numpy) expected rate of each sample in each bin with ``par`` at ``value``, others nominal."""
    with numpy_backend():
        model = pyhf.Workspace(ws_spec).model()
        pars = np.asarray(model.config.suggested_init(), dtype=float)
        pars[model.config.par_names.index(par)] = value
        return model, np.asarray(model.main_model.expected_data(pars, return_by_sample=True))


def without_floor(monkeypatch):
    monkeypatch.setattr(workspace_module, "rate_floor", lambda nominal, norm, shape, xp=np: (dict(norm), dict(shape)))


# ----------------------------------------------------------------------------- the floor


def test_floor_changes_nothing_away_from_its_bounds(spec):
    nom, up, down = np.array([10.0, 20.0, 30.0]), np.array([12.0, 21.0, 30.0]), np.array([9.0, 19.0, 29.0])
    for args in ((nom, up), (nom, up, down)):
        floored, raw = norm_plus_shape(*args), norm_plus_shape(*args, floor=False)
        for a, b in zip(floored, raw):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    assert floored_templates(spec, histograms(spec)) == []


def test_floor_keeps_rates_positive_at_five_sigma_and_records_it(spec, monkeypatch):
    """A one-sided variation three times the nominal in one bin: its symmetrised down template is empty
    there, and pyhf's rate goes to 0 at alpha = -1 and negative beyond; the floor keeps it positive to
    |alpha| = 5, lists what it clipped, and the check of the unfloored workspace names the culprit."""
    hists = histograms(spec)
    ps = hists["4j1b"]["ttbar"]["PS_var"]
    ps["sumw"] = np.array(ps["sumw"]) * np.where(np.arange(len(ps["sumw"])) == 2, 3.0, 1.0)
    ws = build_workspace(spec, hists)
    nominal = rates_by_sample(ws, "ttbar_ps", 0.0)[1]
    for alpha in (-ALPHA_MAX, -2.0, -1.0, 1.0, ALPHA_MAX):
        rates = rates_by_sample(ws, "ttbar_ps", alpha)[1]
        assert np.all(rates[nominal > 0] > 0), alpha
    floored = floored_templates(spec, hists)
    assert {(f["region"], f["sample"], f["modifier"]) for f in floored} == {("4j1b", "ttbar", "ttbar_ps")}
    low = next(f for f in floored if f["template"] == "lo_data")
    assert 2 in low["bins"] and low["before"][low["bins"].index(2)] == 0.0
    checks = check_model(spec, hists, ws)
    assert checks["workspace_check"]["passed"]
    assert any("rate floor" in w and "ttbar_ps" in w for w in checks["model_warnings"])

    without_floor(monkeypatch)
    broken = build_workspace(spec, hists)
    check = check_workspace(broken)
    assert not check["passed"]
    culprit = [p for p in check["problems"] if "rate" in p and p["bin"] == 2]
    assert culprit and all(p["parameter"] == "ttbar_ps" and p["sample"] == "ttbar" and p["region"] == "4j1b"
                           for p in culprit)
    assert culprit[0]["from_value"] == pytest.approx(-1.0) and culprit[0]["rate"] < 0
    assert any(w.startswith("ttbar_ps: expected rate of ttbar in 4j1b bin 2") for w in check["warnings"])


def test_floor_is_differentiable_in_jax_and_keeps_the_likelihood_finite():
    """Soft mode: the same floor on traced templates; pyhf's logpdf (jax) at alpha = +-5 is finite and so
    are its gradients with respect to the raw templates, an empty nominal bin included."""
    import jax
    import jax.numpy as jnp
    from jacana.stages.stats.likelihood import TracedModel

    nominal = jnp.array([10.0, 5.0, 2.0, 0.0])
    up = jnp.array([30.0, 5.2, 0.01, 1.0])  # bin 0: down template empty; bin 2: far below; bin 3: no nominal
    bkg = jnp.array([1.0, 1.0, 1.0, 1.0])

    def yields(nominal, up):
        norm, shape = norm_plus_shape(nominal, up, None, jnp)
        return {"sr": {"sig": {"data": nominal, "modifiers": {"sys": {**norm, **shape}}},
                       "bkg": {"data": bkg, "modifiers": {}}}}

    y0 = jax.tree_util.tree_map(np.asarray, yields(nominal, up))
    sig = y0["sr"]["sig"]
    spec = {"channels": [{"name": "sr", "samples": [
        {"name": "sig", "data": sig["data"].tolist(), "modifiers": [
            {"name": "mu", "type": "normfactor", "data": None},
            {"name": "sys", "type": "normsys", "data": {"hi": float(sig["modifiers"]["sys"]["hi"]),
                                                        "lo": float(sig["modifiers"]["sys"]["lo"])}},
            {"name": "sys", "type": "histosys", "data": {"hi_data": sig["modifiers"]["sys"]["hi_data"].tolist(),
                                                         "lo_data": sig["modifiers"]["sys"]["lo_data"].tolist()}}]},
        {"name": "bkg", "data": bkg.tolist(), "modifiers": []}]}]}
    tm = TracedModel.from_model_spec(spec, poi_name="mu")
    data = tm.asimov_data(y0)
    k = tm.par_names.index("sys")
    check = check_workspace(tm.workspace(y0))
    assert check["passed"], check["problems"]
    for alpha in (-ALPHA_MAX, ALPHA_MAX):
        pars = jnp.asarray(tm.init).at[k].set(alpha)
        rates = tm.bind(y0).pyhf_model.main_model.expected_data(pars, return_by_sample=True)
        assert bool(jnp.all(jnp.asarray(rates)[0, :3] > 0))
        value, grads = jax.value_and_grad(lambda n, u, p=pars: tm.logpdf(p, data, yields(n, u)), argnums=(0, 1))(nominal, up)
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    # the floor is active where it must be, and its gradient is the template's inside the bounds
    floored = rate_floor(nominal, *norm_plus_shape(nominal, up, None, jnp, floor=False), jnp)[1]["lo_data"]
    assert float(floored[0]) == pytest.approx(SHAPE_FLOOR * 10.0) and float(floored[3]) == 0.0
    mild = jnp.array([11.0, 5.2, 2.1, 0.0])
    grad = jax.grad(lambda u: norm_plus_shape(nominal, u, None, jnp)[1]["hi_data"][1])(mild)
    assert np.all(np.isfinite(np.asarray(grad))) and float(grad[1]) != 0.0


# ----------------------------------------------------------------------------- the check and the fit


def test_a_healthy_model_passes_the_grid_and_the_fit_is_converged(spec):
    evaluation = evaluate_histograms(spec, histograms(spec))
    result = evaluation["result"]
    check = result["workspace_check"]
    assert check["passed"] and check["problems"] == [] and check["parameters"] == 33
    assert check["no_effect"] == [] and check["low_mc_statistics"] == []
    assert result["model_warnings"] == [] and result["template_floor"] == []
    fit = result["ttbar_norm"]
    assert fit["converged"] is True and fit["warnings"] == []
    assert fit["uncertainty_from"] == "hessian" and fit["fit"]["success"] and fit["fit"]["edm"] < 1e-4
    assert fit["at_bounds"] == [] and fit["pulls"] == []
    assert "workspace check (+-5 sigma, 33 parameters): passed" in format_summary(spec, result)


def test_a_bin_with_three_mc_events_is_named_and_a_pulled_gamma_is_not_converged(spec):
    """3 MC events (weight 1) in the last 4j1b bin: named before the fit. With 40 events observed there
    only its staterror gamma can follow (beyond 3 sigma of its constraint): not reported converged."""
    hists = histograms(spec)
    set_bin(hists, "4j1b", 10, lambda s, v: (3.0, 3.0) if s == "ttbar" else (0.0, 0.0))
    result = evaluate_histograms(spec, hists)["result"]
    low = result["workspace_check"]["low_mc_statistics"]
    assert [(x["parameter"], x["region"], x["bin"]) for x in low] == [("staterror_4j1b[10]", "4j1b", 10)]
    assert low[0]["relative_uncertainty"] == pytest.approx(1 / np.sqrt(3))
    assert any("staterror_4j1b[10]" in w and "about 3 effective events" in w for w in result["model_warnings"])
    assert "WARNING: staterror_4j1b[10]" in format_summary(spec, result)

    observations = pseudo_data(spec, hists)
    observations["4j1b"] = np.array(observations["4j1b"], dtype=float)
    observations["4j1b"][10] = 40.0
    result = {**result, **evaluate_workspace(build_workspace(spec, hists, observations))}
    fit = result["ttbar_norm"]
    assert fit["converged"] is False
    pull = next(p for p in fit["pulls"] if p["parameter"] == "staterror_4j1b[10]")
    assert pull["pull"] > 3 and pull["sigma"] == pytest.approx(1 / np.sqrt(3))
    assert any(w.startswith("staterror gamma staterror_4j1b[10]") and "pulled" in w for w in fit["warnings"])
    summary = format_summary(spec, result)
    assert "NOT CONVERGED" in summary and "WARNING: staterror gamma staterror_4j1b[10]" in summary


def test_a_fallback_uncertainty_is_not_converged(spec, monkeypatch):
    from jacana.stages.stats import inference

    ws = build_workspace(spec, histograms(spec))
    monkeypatch.setattr(inference, "nll_hessian", lambda model, data, pars: -np.eye(len(pars)))
    fit = evaluate_workspace(ws)["ttbar_norm"]
    assert fit["value"] is not None and fit["uncertainty_from"] == "fisher" and fit["converged"] is False
    assert any("Fisher information instead" in w for w in fit["warnings"])


# ----------------------------------------------------------------------------- errors that name things


def test_empty_and_negative_regions_and_samples_are_named(spec):
    hists = histograms(spec)
    for var in hists["4j1b"]["single_top_s_chan"].values():
        var["sumw"] = -np.abs(var["sumw"])
    for var in hists["4j2b"]["single_top_tW"].values():
        var["sumw"] = np.zeros_like(var["sumw"])
    messages = [w["message"] for w in histogram_warnings(spec, hists)]
    assert any("single_top_s_chan in region 4j1b has a negative total yield" in m for m in messages)
    assert "sample single_top_tW is empty in region 4j2b" in messages


def test_a_parameter_without_effect_is_named_before_any_fit(spec):
    """No ttbar event selected (as the real 200-event file at the AGC cuts): the error names the POI
    and the empty sample, before any fit and from the Asimov Fisher information alike."""
    hists = histograms(spec)
    for region in hists:
        for var in hists[region]["ttbar"].values():
            var["sumw"], var["sumw2"] = np.zeros_like(var["sumw"]), np.zeros_like(var["sumw2"])
    ws = build_workspace(spec, hists)
    with pytest.raises(FitError) as before_fit:
        check_model(spec, hists, ws)
    message = str(before_fit.value)
    assert "ttbar_norm has no effect" in message and "sample ttbar is empty in every region" in message
    with pytest.raises(FitError) as asimov:
        evaluate_workspace(ws)
    message = str(asimov.value)
    assert "Asimov Fisher information is singular" in message and "ttbar_norm" in message
    assert "sample ttbar in every region" in message


def test_singular_and_indefinite_matrices_name_the_parameters():
    free = np.array([True, False, True, True])
    names = ["mu", "fixed", "a", "b"]
    with pytest.raises(FitError, match="parameter mu has no effect"):
        _uncertainties(np.diag([0.0, 2.0, 3.0]), free, 4, "test", names)
    degenerate = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    with pytest.raises(FitError, match="a combination of (a, b|b, a) is not determined"):
        _uncertainties(degenerate, free, 4, "test", names)
    with pytest.raises(FitError, match="not positive definite .*along (a, b|b, a)"):
        _uncertainties(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]]), free, 4, "test", names)


def test_the_grid_names_parameter_sample_and_bin_of_a_hand_broken_workspace(spec):
    ws = copy.deepcopy(build_workspace(spec, histograms(spec)))
    sample = next(s for c in ws["channels"] if c["name"] == "4j2b" for s in c["samples"] if s["name"] == "wjets")
    hs = next(m for m in sample["modifiers"] if m["name"] == "jes" and m["type"] == "histosys")
    hs["data"]["hi_data"][4] = 0.1 * sample["data"][4]
    check = check_workspace(ws)
    assert not check["passed"]
    assert {(p["parameter"], p["region"], p["sample"], p["bin"]) for p in check["problems"]} == {("jes", "4j2b", "wjets", 4)}
    assert check["problems"][0]["value"] == pytest.approx(5.0)
