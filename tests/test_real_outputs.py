"""cabinetry and pyhf on real jacana outputs (#22's check): the workspaces ``jacana evaluate`` and
``jacana optimize`` write for the embedded AGC samples at 1M and 100k events, not toy histograms.

At 1M and 100k events cabinetry's and pyhf's MINUIT fits end with valid minima, jacana's profile
interval equals pyhf's own profile-likelihood scan and its sigma_mu the scan's half width to 1 % where
the model converges, and the +-5 sigma grid passes. At 1M events
``cabinetry.fit.ranking`` succeeds at MINUIT strategy 2 and jacana's impacts stay with cabinetry.
``cabinetry.fit.ranking`` at MINUIT's defaults does not (strict xfail: it documents the failure and
tells us when a cabinetry or iminuit release changes it): docs/statistics.md, "Fits on the AGC model".
The 100k-event evaluation has bins with over 100 % MC-statistical uncertainty: jacana says so and does
not report "converged" (its impacts there: tests/test_template_hygiene.py).

Slow (1M events; about 6 minutes): ``python -m pytest -m slow tests/test_real_outputs.py``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from jacana.cli.main import main

pytestmark = pytest.mark.slow

cabinetry = pytest.importorskip("cabinetry")
pyhf = pytest.importorskip("pyhf")


def _run(args, out):
    assert main([*args, "--out", str(out), "--no-plots", "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    return {"workspace": json.loads((out / "workspace.json").read_text()),
            # optimize's result.json holds the held-out evaluation of the optimum under validation.after
            "result": result["validation"]["after"] if "validation" in result else result}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    return {"evaluate_1m": _run(["evaluate", "--events", "1000000"], base / "e1m"),
            "optimize_1m": _run(["optimize", "--events", "1000000", "--steps", "3"], base / "o1m"),
            "evaluate_100k": _run(["evaluate", "--events", "100000"], base / "e100k"),
            "optimize_100k": _run(["optimize", "--events", "100000", "--steps", "3"], base / "o100k")}


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = pyhf.get_backend()  # cabinetry sets pyhf's optimizer globally
    yield
    pyhf.set_backend(*previous)


def _model_and_data(workspace):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cabinetry.model_utils.model_and_data(workspace)


HEALTHY = ["evaluate_1m", "optimize_1m"]
ALL = [*HEALTHY, "evaluate_100k", "optimize_100k"]


@pytest.mark.parametrize("which", ALL)
def test_cabinetry_and_pyhf_minuit_fits_end_at_valid_minima(outputs, which):
    model, data = _model_and_data(outputs[which]["workspace"])
    fit = cabinetry.fit.fit(model, data)  # raises FailedMinimization on an invalid minimum
    assert np.all(np.isfinite(fit.uncertainty))
    pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(verbose=0))
    best, result = pyhf.infer.mle.fit(data, model, return_result_obj=True)
    minuit = result.minuit
    assert minuit.valid and minuit.fmin.edm < 0.002 * minuit.tol * minuit.errordef
    poi = model.config.poi_index
    assert best[poi] == pytest.approx(fit.bestfit[poi], abs=1e-3)
    jacana = outputs[which]["result"]["ttbar_norm"]
    assert jacana["value"] == pytest.approx(fit.bestfit[poi], abs=1e-3)
    assert jacana["converged"] is (not jacana["warnings"])  # "converged" only with no diagnostic off
    if which in HEALTHY:
        assert jacana["converged"] is True and jacana["uncertainty_from"] == "hessian"


@pytest.mark.parametrize("which", ALL)
def test_sigma_mu_equals_pyhfs_profile_likelihood_scan(outputs, which):
    """The profile interval's crossings equal pyhf's scan on every output; sigma_mu (the exact Hessian's)
    to 1 % where the model converges (the sparse 100k evaluation's comes from the Fisher information)."""
    from jacana.bench.likelihood import pyhf_profile_scan
    from jacana.stages.stats.inference import numpy_backend

    result = outputs[which]["result"]
    with numpy_backend():
        model, data = _model_and_data(outputs[which]["workspace"])
        scan = pyhf_profile_scan(model, data, step=0.5 * result["ttbar_norm"]["uncertainty"])
    if result["ttbar_norm"]["converged"]:
        assert result["ttbar_norm"]["uncertainty"] == pytest.approx(scan["half_width"], rel=0.01)
    interval = result["ttbar_norm"]["interval"]
    assert interval["down"] == pytest.approx(scan["down"], abs=1e-3 * scan["half_width"] + 1e-5)
    assert interval["up"] == pytest.approx(scan["up"], abs=1e-3 * scan["half_width"] + 1e-5)


@pytest.mark.parametrize("which", ALL)
def test_the_five_sigma_grid_passes_on_every_written_workspace(outputs, which):
    from jacana.stages.stats.health import check_workspace

    recorded = outputs[which]["result"]["workspace_check"]
    again = check_workspace(outputs[which]["workspace"])
    assert recorded["passed"] and again["passed"] and again["problems"] == []
    assert recorded["sigmas"] == again["sigmas"] == 5.0


@pytest.mark.parametrize("which", HEALTHY)
def test_cabinetry_ranking_succeeds_at_strategy_2(outputs, which):
    model, data = _model_and_data(outputs[which]["workspace"])
    fit = cabinetry.fit.fit(model, data)
    ranking = cabinetry.fit.ranking(model, data, fit_results=fit, strategy=2)
    assert len(ranking.labels) == len(model.config.par_names) - 1
    assert np.all(np.isfinite(ranking.postfit_up)) and np.all(np.isfinite(ranking.prefit_down))
    # the largest post-fit impact is below the POI's total uncertainty
    assert np.max(np.abs(ranking.postfit_up)) < fit.uncertainty[model.config.poi_index]


@pytest.mark.xfail(strict=True, raises=pyhf.exceptions.FailedMinimization,
                   reason="MIGRAD at strategy 1 stops early in the valley of the normalisation parameters "
                          "(HESSE's EDM ~0.1 against 2e-4): docs/statistics.md")
def test_cabinetry_ranking_at_minuits_defaults(outputs):
    model, data = _model_and_data(outputs["evaluate_1m"]["workspace"])
    fit = cabinetry.fit.fit(model, data)
    cabinetry.fit.ranking(model, data, fit_results=fit)


@pytest.mark.parametrize("which", HEALTHY)
def test_jacanas_impacts_stay_with_cabinetry(outputs, which, tmp_path):
    from jacana.analysis.plots import pulls_and_ranking

    made = pulls_and_ranking(outputs[which]["workspace"], tmp_path)
    assert made["source"] == "cabinetry" and made["why"] is None
    assert len(made["strategy_2"]) <= 2  # named refits MIGRAD left invalid at strategy 1
    names = {row["name"] for row in made["impacts"]}
    assert {"btag_0", "jes", "ttbar_ps", "lumi"} <= names


def test_the_100k_model_is_not_called_converged_and_names_its_sparse_bins(outputs):
    result = outputs["evaluate_100k"]["result"]
    fit = result["ttbar_norm"]
    assert fit["converged"] is False and fit["warnings"]
    sparse = {row["parameter"]: row["relative_uncertainty"]
              for row in result["workspace_check"]["low_mc_statistics"]}
    worst = max(sparse, key=sparse.get)
    assert sparse[worst] > 1.0  # a bin whose MC-statistical uncertainty exceeds its content
    assert any(worst in w and "relative MC statistical uncertainty" in w for w in result["model_warnings"])
