"""``jacana evaluate`` end to end on small synthetic samples: files written, pyhf agrees."""

from __future__ import annotations

import json

import numpy as np
import pyhf
import pytest

from jacana.cli.main import main
from jacana.stages.stats.inference import evaluate_workspace


@pytest.fixture(scope="module")
def evaluated(small_fileset_evaluated):
    """``jacana evaluate --fileset small_fileset`` (made once per session: conftest.py)."""
    return small_fileset_evaluated


def test_outputs_exist_and_are_consistent(evaluated):
    hists = json.loads((evaluated / "histograms.json").read_text())
    ws = json.loads((evaluated / "workspace.json").read_text())
    result = json.loads((evaluated / "result.json").read_text())
    assert set(hists) == {"4j1b", "4j2b"}
    assert set(hists["4j1b"]["ttbar"]) >= {"nominal", "pt_scale_up", "pt_res_up", "ME_var", "PS_var", "btag_var_3_down"}
    h = hists["4j2b"]["ttbar"]["nominal"]
    assert len(h["edges"]) == 12 and len(h["sumw"]) == 11 and len(h["sumw2"]) == 11
    pyhf.Workspace(ws)  # schema-valid
    assert set(result) >= {"ttbar_norm", "expected", "params", "regions"}
    assert result["params"] == {"lepton_pt_min": 30.0, "jet_pt_min": 30.0, "jet_eta_max": 2.4, "btag_min": 0.5}
    # Region composition: ttbar dominates both regions, most strongly the two-b-tag one.
    comp = result["regions"]
    frac = {r: comp[r]["ttbar"] / sum(comp[r].values()) for r in comp}
    assert frac["4j2b"] > frac["4j1b"] > 0.5
    # The workspace's nominal ttbar templates are the histograms'.
    ttbar = next(s for c in ws["channels"] if c["name"] == "4j2b" for s in c["samples"] if s["name"] == "ttbar")
    np.testing.assert_allclose(ttbar["data"], h["sumw"])


def test_pyhf_reproduces_result_json(evaluated):
    ws = json.loads((evaluated / "workspace.json").read_text())
    result = json.loads((evaluated / "result.json").read_text())
    again = evaluate_workspace(ws)
    assert again["expected"]["sigma_mu"] == pytest.approx(result["expected"]["sigma_mu"], rel=1e-9)
    assert result["ttbar_norm"]["value"] is not None  # (converged or flagged, the fitted value is kept)
    assert again["ttbar_norm"]["value"] == pytest.approx(result["ttbar_norm"]["value"], rel=1e-9)
    assert again["ttbar_norm"]["converged"] == result["ttbar_norm"]["converged"]


def test_params_file_and_overrides_change_the_analysis(small_fileset, evaluated, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"params": {"jet_pt_min": 40.0, "btag_min": 0.7}}))
    out = tmp_path / "tight"
    assert main(["evaluate", "--fileset", str(small_fileset), "--params", str(params), "--set", "lepton_pt_min=35",
                 "--out", str(out), "--quiet"]) == 0
    tight = json.loads((out / "result.json").read_text())
    loose = json.loads((evaluated / "result.json").read_text())
    assert tight["params"] == {"lepton_pt_min": 35.0, "jet_pt_min": 40.0, "jet_eta_max": 2.4, "btag_min": 0.7}
    assert sum(tight["regions"]["4j1b"].values()) < sum(loose["regions"]["4j1b"].values())


def test_cli_errors_name_the_problem(small_fileset, tmp_path, capsys):
    assert main(["evaluate", "--fileset", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["evaluate", "--fileset", str(small_fileset), "--set", "jet_pt_min=5", "--out", str(tmp_path)]) == 2
    assert "outside its bounds" in capsys.readouterr().err
    assert main(["evaluate", "--fileset", str(small_fileset), "--set", "branches.jet_btag=Jet_btagDeepFlavB",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Jet_btagDeepFlavB" in err and "not found" in err and ".root" in err
