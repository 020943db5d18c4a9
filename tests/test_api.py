"""The Python API (``import jacana``): version, analysis and fileset loading, evaluate with hist.Hist
histograms, the UHI JSON and ROOT files and their reader, optimize without an output folder."""

from __future__ import annotations

import json
from importlib.metadata import version

import hist
import numpy as np
import pyhf
import pytest

import jacana
from jacana.stages.errors import ConfigError, FilesetError


def test_version_is_the_installed_distributions():
    assert jacana.__version__ == version("jacana")
    assert {"load_analysis", "load_fileset", "evaluate", "optimize", "read_histograms"} <= set(dir(jacana))


def test_load_analysis_applies_overrides_and_names_a_bad_one():
    spec = jacana.load_analysis(jet_pt_min=32, **{"branches.jet_btag": "Jet_btagDeepFlavB"})
    assert spec.param_values()["jet_pt_min"] == 32.0 and spec.branches["jet_btag"] == "Jet_btagDeepFlavB"
    assert jacana.load_analysis().param_values()["jet_pt_min"] == 30.0  # the config's own value
    with pytest.raises(ConfigError, match="'jet_pt_mn'.*did you mean 'jet_pt_min'"):
        jacana.load_analysis(jet_pt_mn=30)
    with pytest.raises(ConfigError, match="jet_pt_min=5"):  # outside its bounds: the override is named
        jacana.load_analysis(jet_pt_min=5)


def test_load_fileset_takes_a_path_a_mapping_or_a_fileset(tiny_fileset):
    from_file = jacana.load_fileset(tiny_fileset)
    assert jacana.load_fileset(from_file) is from_file
    assert jacana.load_fileset(str(tiny_fileset)).entries == from_file.entries
    assert jacana.load_fileset(from_file.to_dict()).entries == from_file.entries  # absolute paths kept
    with pytest.raises(FilesetError, match="needs a 'files' list"):
        jacana.load_fileset({"ttbar": {"nominal": {}}})
    with pytest.raises(ConfigError, match="got int"):
        jacana.load_fileset(3)


@pytest.fixture(scope="module")
def tiny_fileset(tmp_path_factory):
    """8k synthetic events, one file per (sample, variation): the pyhf fit dominates an evaluation, and on
    conftest.py's 60k events it took twice as long."""
    from jacana.samples.synthetic import generate

    return generate(tmp_path_factory.mktemp("api_samples"), events=8_000, seed=7, files_per_sample=1, progress=False)


@pytest.fixture(scope="module")
def evaluation(tiny_fileset):
    """``jacana.evaluate`` of the tiny samples (what ``jacana evaluate`` runs)."""
    return jacana.evaluate(jacana.load_analysis(), tiny_fileset, progress=False)


@pytest.fixture(scope="module")
def written(evaluation, tmp_path_factory):
    """The folder ``evaluation.write`` filled: what ``jacana evaluate --out`` writes (the CLI calls it)."""
    out = tmp_path_factory.mktemp("api_evaluate")
    paths = evaluation.write(out)
    assert sorted(p.name for p in paths.values()) == ["histograms.json", "histograms.root", "histograms.uhi.json",
                                                       "result.json", "workspace.json"]
    return out


def _assert_same(a: dict, b: dict) -> None:
    """Two ``{region: hist.Hist}`` are equal: axes (names, labels, categories, edges), values, variances."""
    assert list(a) == list(b)
    for region in a:
        ha, hb = a[region], b[region]
        assert ha.axes.name == hb.axes.name and ha.axes.label == hb.axes.label
        assert [list(ax) for ax in ha.axes[:2]] == [list(ax) for ax in hb.axes[:2]]
        np.testing.assert_array_equal(ha.axes[2].edges, hb.axes[2].edges)
        np.testing.assert_array_equal(ha.values(), hb.values())
        np.testing.assert_array_equal(ha.variances(), hb.variances())
        assert ha.metadata == hb.metadata and ha.name == hb.name == region


def test_evaluate_gives_named_hists_equal_to_histograms_json(evaluation, written, tiny_fileset):
    assert isinstance(evaluation.workspace, pyhf.Workspace)
    assert evaluation.sigma_mu == evaluation.fit["expected"]["sigma_mu"] > 0
    written = json.loads((written / "histograms.json").read_text())
    assert set(evaluation.histograms) == set(written) == {"4j1b", "4j2b"}
    for region, observable, label in (("4j1b", "ht", "$H_T$ [GeV]"), ("4j2b", "m_bjj", "$m_{bjj}$ [GeV]")):
        h = evaluation.histograms[region]
        assert isinstance(h, hist.Hist) and h.storage_type is hist.storage.Weight
        assert h.axes.name == ("process", "variation", observable) and h.axes[2].label == label
        for sample, by_variation in written[region].items():
            assert h.metadata["variations"][sample] == list(by_variation)
            for variation, arrays in by_variation.items():
                one = h[{"process": sample, "variation": variation}]
                assert one.values().tolist() == arrays["sumw"] and one.variances().tolist() == arrays["sumw2"]
                assert one.axes[0].edges.tolist() == arrays["edges"]
    # a variation a sample does not have (ttbar's alternative samples) is zero, and not listed
    assert "ME_var" not in h.metadata["variations"]["wjets"]
    assert not h[{"process": "wjets", "variation": "ME_var"}].values().any()
    as_dict = evaluation.to_dict()
    assert as_dict["histograms"] == written and as_dict["workspace"] == dict(evaluation.workspace)
    assert as_dict["result"]["fileset"] == str(tiny_fileset)


def test_uhi_json_and_root_files_read_back_equal(evaluation, written):
    folder = written  # beside histograms.json
    from_uhi = jacana.read_histograms(folder / "histograms.uhi.json")
    from_root = jacana.read_histograms(folder / "histograms.root")
    _assert_same(from_uhi, evaluation.histograms)
    _assert_same(from_root, evaluation.histograms)
    _assert_same(jacana.read_histograms(folder), from_uhi)  # a folder: its UHI JSON
    plain = jacana.read_histograms(folder / "histograms.json")  # no observable names there
    assert plain["4j2b"].axes.name == ("process", "variation", "observable")
    np.testing.assert_array_equal(plain["4j2b"].values(), from_root["4j2b"].values())
    import uproot

    with uproot.open(folder / "histograms.root") as f:  # what another ROOT reader sees
        th1 = f["4j2b/ttbar__nominal"]
        assert th1.member("fXaxis").member("fName") == "m_bjj"
        np.testing.assert_array_equal(th1.values(), evaluation.histograms["4j2b"][{"process": "ttbar",
                                                                                  "variation": "nominal"}].values())
        assert "4j2b/wjets__ME_var" not in f  # only the variations a sample has


def test_plot_makes_pre_and_post_fit_data_mc_per_region(evaluation, tmp_path):
    pngs = evaluation.plot(tmp_path / "plots")
    assert sorted(pngs) == ["4j1b_postfit", "4j1b_prefit", "4j2b_postfit", "4j2b_prefit"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs.values())


def test_data_mc_band_is_the_models_uncertainty_and_the_stack_its_yields(evaluation, tmp_path):
    """The plotted numbers: the stack adds up to pyhf's expected data, the band is cabinetry's total
    uncertainty (larger than the MC-statistical part alone, since the systematics are in it)."""
    import cabinetry
    import matplotlib.pyplot as plt

    from jacana.analysis import plots

    captured = {}
    real = plots.data_mc_figure

    def spy(spec, region, edges, yields, unc, data, stage, label=""):
        captured[(region, stage)] = (yields, unc, data)
        return real(spec, region, edges, yields, unc, data, stage, label)

    plots.data_mc_figure = spy
    try:
        plots.data_mc(evaluation.analysis, evaluation.workspace, tmp_path, postfit=False)
    finally:
        plots.data_mc_figure = real
        plt.close("all")
    model, data = cabinetry.model_utils.model_and_data(dict(evaluation.workspace))
    expected = model.expected_actualdata(model.config.suggested_init())
    start = 0
    for channel in model.config.channels:
        nb = model.config.channel_nbins[channel]
        yields, unc, observed = captured[(channel, "pre-fit")]
        np.testing.assert_allclose(np.sum(list(yields.values()), axis=0), expected[start:start + nb], rtol=1e-9)
        np.testing.assert_array_equal(observed, np.asarray(data[start:start + nb]))
        mc_stat = np.sqrt(sum(np.asarray(evaluation.evaluation["histograms"][channel][s]["nominal"]["sumw2"])
                              for s in yields))
        assert np.all(unc >= mc_stat * (1 - 1e-6)) and np.any(unc > 1.05 * mc_stat)
        start += nb


def test_captured_output_turns_library_prints_into_one_line():
    import os

    from jacana.stages.stats.quiet import captured_output, one_line

    with captured_output() as lines:
        os.write(1, b"W MnPosDef Matrix forced pos-def\n")
        os.write(2, b"W MnPosDef Matrix forced pos-def\nW VariableMetricBuilder No improvement\n")
    assert one_line(lines) == ("3 messages: W MnPosDef Matrix forced pos-def; W VariableMetricBuilder No improvement")
    assert one_line([]) == ""


def test_histogram_files_refuse_what_they_cannot_hold(tmp_path):
    from jacana.analysis.evaluate import histograms_to_hist, write_root

    one = {"edges": [0.0, 1.0, 2.0], "sumw": [1.0, 2.0], "sumw2": [1.0, 4.0]}
    with pytest.raises(ConfigError, match="sample 'a__b'"):
        write_root(tmp_path / "h.root", histograms_to_hist({"SR": {"a__b": {"nominal": one}}}))
    with pytest.raises(ConfigError, match="bin edges differ"):
        histograms_to_hist({"SR": {"a": {"nominal": one}, "b": {"nominal": {**one, "edges": [0.0, 1.0, 3.0]}}}})
    (tmp_path / "other.json").write_text('{"x": 1}')
    with pytest.raises(ConfigError, match="neither UHI JSON nor"):
        jacana.read_histograms(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="does not exist"):
        jacana.read_histograms(tmp_path / "missing.root")


def test_optimize_refuses_bad_options_before_reading_any_data(tmp_path):
    missing = tmp_path / "no_such_fileset.json"
    with pytest.raises(ConfigError, match="'stepz' \\(did you mean 'steps'\\?\\)"):
        jacana.optimize(None, missing, stepz=3)
    with pytest.raises(ConfigError, match="'jet_pt'"):
        jacana.optimize(None, missing, free=["jet_pt"])
    with pytest.raises(ConfigError, match="resume needs an output folder"):
        jacana.optimize(None, missing, resume=True)


@pytest.mark.slow  # compiles the soft analysis: about a minute on 2 cores
def test_optimize_without_an_output_folder(train_validate_20k, tmp_path):
    train, held_out = train_validate_20k
    analysis = jacana.load_analysis()
    result = jacana.optimize(analysis, train, held_out, steps=2, hard_every=1, free=["jet_pt_min", "btag_min"],
                             progress=False)
    assert isinstance(result, jacana.OptimizationResult) and result.source is None and result.plots is None
    assert len(result.history) == 2 and result.free_params == ["jet_pt_min", "btag_min"]
    assert result.params["lepton_pt_min"] == 30.0  # not free: stays
    assert result.sigma_mu_before == result.before["expected"]["sigma_mu"] > 0 and result.sigma_mu_after > 0
    assert result.optimized_analysis.param_values() == pytest.approx(result.final_params)
    plots = result.plot(tmp_path / "plots")
    assert sorted(p.name for p in plots.values()) == ["objective.png", "parameters.png"]


def test_evaluate_with_only_the_samples_a_fileset_has(tiny_fileset):
    """One's own files rarely hold every sample: available_samples=True leaves the rest out and says so."""
    full = jacana.load_fileset(tiny_fileset).to_dict()
    mine = {s: {"nominal": full[s]["nominal"]} for s in ("ttbar", "wjets")}
    from jacana.stages.errors import FilesetError

    with pytest.raises(FilesetError, match="lacks what the analysis needs"):
        jacana.evaluate(None, mine, progress=False)
    ev = jacana.evaluate(None, mine, progress=False, available_samples=True)
    assert list(ev.histograms["4j1b"].axes["process"]) == ["ttbar", "wjets"]
    assert "sample single_top_tW (no nominal files)" in ev.fit["left_out"]
    assert "systematic ttbar_me (no files of ttbar/ME_var)" in ev.fit["left_out"]
