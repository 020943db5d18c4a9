"""The analysis config: schema, overrides, bounds, and errors that say what to fix."""

from __future__ import annotations

import numpy as np
import pytest

from jacana.stages.errors import ConfigError
from jacana.stages.spec import load_spec


def test_default_config_is_the_agc():
    spec = load_spec()
    assert spec.param_values() == {"lepton_pt_min": 30.0, "jet_pt_min": 30.0, "jet_eta_max": 2.4, "btag_min": 0.5}
    assert spec.luminosity_pb == 3378.0
    np.testing.assert_allclose(spec.regions["4j1b"].edges, np.arange(110, 551, 40))
    assert spec.regions["4j2b"].observable == "m_bjj"
    assert spec.branches["jet_btag"] == "Jet_btagCSVV2"
    assert set(spec.samples) == {"ttbar", "single_top_s_chan", "single_top_t_chan", "single_top_tW", "wjets"}
    assert spec.file_variations("ttbar") == ["nominal", "ME_var", "PS_var", "scaleup", "scaledown"]
    assert spec.file_variations("wjets") == ["nominal"]
    assert len(spec.weight_variations()) == 8


def test_overrides_set_parameters_and_branches():
    spec = load_spec(overrides=["jet_pt_min=25", "branches.jet_btag=Jet_btagDeepFlavB", "parameters.btag_min.temperature=0.1"])
    assert spec.param_values()["jet_pt_min"] == 25.0
    assert spec.branches["jet_btag"] == "Jet_btagDeepFlavB"
    assert spec.parameters["btag_min"].temperature == 0.1
    assert load_spec().param_values()["jet_pt_min"] == 30.0  # the default is untouched


@pytest.mark.parametrize("override, message", [
    (["jet_pt_mn=25"], "did you mean 'jet_pt_min'"),
    (["jet_pt_min=500"], "outside its bounds"),
    (["jet_pt_min=abc"], "jet_pt_min"),
    (["brnches.jet_pt=X"], "did you mean 'branches'"),
    (["cuts.min_jet=4"], "unknown key 'min_jet'"),
    (["regions.4j1b.edges=[110, 100, 550]"], "strictly increasing"),
    (["poi.sample=tt"], "poi.sample"),
    (["jet_pt_min"], "name=value"),
])
def test_bad_overrides_say_what_to_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_spec(overrides=override)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_spec(bad)


def test_with_params_rejects_unknown_names():
    spec = load_spec()
    assert spec.with_params({"btag_min": 0.6}).param_values()["btag_min"] == 0.6
    with pytest.raises(ConfigError, match="unknown parameters"):
        spec.with_params({"btag_max": 0.6})
