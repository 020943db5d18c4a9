"""The general analysis form (stages/definition.py, dense.py, engine.py): the AGC ttbar analysis written
in it equals the AGC-specific program; configs fail with errors that say what to fix; a user's own
observable plugs in from a file; the executors run a general analysis."""

from __future__ import annotations

import copy
import textwrap

import jax
import numpy as np
import pytest
import yaml

from jacana.stages.analysis import chunk_yields, default_params, default_relax, hard_relax, soft_config
from jacana.stages.batch import make_batches
from jacana.stages.columns import read_chunk
from jacana.stages.errors import ConfigError
from jacana.stages.spec import AnalysisSpec, load_spec

GENERAL_AGC = "stages/configs/agc_ttbar_general.yaml"
SINGLE_TOP = "stages/configs/single_top_tchan.yaml"


def _config(name: str) -> str:
    from importlib import resources

    return str(resources.files("jacana.stages").joinpath(name.split("stages/")[1]))


def _raw(name: str) -> dict:
    return yaml.safe_load(open(_config(name)))


@pytest.fixture(scope="module")
def agc_pair():
    return load_spec(), load_spec(_config(GENERAL_AGC))


def _yields_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # (42 s a case; the executor test below checks the same yields and Jacobians to 1e-12 by default)
@pytest.mark.parametrize("sample,variation", [("ttbar", "nominal"), ("wjets", "nominal"), ("ttbar", "scaleup")])
def test_agc_in_the_general_form_equals_the_agc_program(agc_pair, reference_sample, sample, variation):
    """Soft yields, hard yields and forward Jacobians: bit-identical (same units, same arithmetic order)."""
    classic, general = agc_pair
    chunk = reference_sample["fileset"].chunks(sample, variation, chunk_size=1500)[0]
    bc = make_batches(read_chunk(chunk, classic), classic, prefilter=True)
    bg = make_batches(read_chunk(chunk, general), general, prefilter=True)
    assert [p.n_padded for p in bc.parts] == [p.n_padded for p in bg.parts]
    cc, cg = soft_config(classic), soft_config(general)
    for rc, rg in ((default_relax(classic), default_relax(general)), (hard_relax(classic), hard_relax(general))):
        _yields_equal(chunk_yields(default_params(general), rg, bg, cg), chunk_yields(default_params(classic), rc, bc, cc))
    jc = jax.jacfwd(lambda p: chunk_yields(p, default_relax(classic), bc, cc))(default_params(classic))
    jg = jax.jacfwd(lambda p: chunk_yields(p, default_relax(general), bg, cg))(default_params(general))
    _yields_equal(jg, jc)


def test_in_float32_at_narrow_temperatures_the_general_form_equals_the_agc_program(agc_pair, tmp_path):
    """float32 at a tenth of the default temperatures: both programs give m_bjj the cuts' log weights from
    their logits (the weights underflow there), so their soft yields stay bit-identical (with log(weight)
    in the general form they differed by 1e-2 of a bin on this sample: it holds such events)."""
    from jacana.samples.synthetic import generate
    from jacana.stages.fileset import load_fileset

    classic, general = agc_pair
    fileset = load_fileset(generate(tmp_path, events=20_000, seed=5, files_per_sample=1, progress=False))
    chunk = fileset.chunks("ttbar", "nominal", chunk_size=100_000)[0]
    out = []
    for spec in (classic, general):
        batches = make_batches(read_chunk(chunk, spec), spec, dtype=np.float32, prefilter=True)
        out.append(chunk_yields(default_params(spec), default_relax(spec, scale=0.1), batches, soft_config(spec)))
    _yields_equal(out[1], out[0])
    assert float(np.sum(np.asarray(out[0]["4j2b"]["sumw"][0]))) > 0


def test_agc_general_through_the_executor_equals_the_agc_program(agc_pair, reference_sample):
    """The in-process executor regroups general dense batches (rebatch) into the same yields."""
    from jacana.facility.executor import InProcessExecutor

    _, general = agc_pair
    ex = InProcessExecutor(general, reference_sample["chunks"])
    try:
        y, j = ex.yields_and_jacobian(default_params(general), default_relax(general))
    finally:
        ex.close()
    y0, j0 = reference_sample["y0"], reference_sample["j0"]
    for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(y0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12 * np.max(np.abs(b)))
    for a, b in zip(jax.tree.leaves(j), jax.tree.leaves(j0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12 * max(np.max(np.abs(b)), 1.0))


def test_the_hard_mode_of_the_general_form_equals_the_conventional_analysis_bit_for_bit(agc_pair, reference_sample):
    """The general hard mode (the engine's per-event terms at the hard limit, filled into hist in file
    order) against reference.fill_histograms (awkward + hist): every bin of every variation identical,
    with bootstrap replicas too (the b-tag weights need exact_divide for it)."""
    from jacana.stages.analysis import hard_mode_histograms
    from jacana.stages.columns import bootstrap_multipliers
    from jacana.stages.reference import fill_histograms, to_arrays

    classic, general = agc_pair
    chunk = reference_sample["fileset"].chunks("ttbar", "nominal", chunk_size=1500)[0]
    replicas = bootstrap_multipliers(chunk.path, chunk.entry_start, chunk.entry_stop - chunk.entry_start, 3)
    for reps in (None, replicas):
        ref = fill_histograms(read_chunk(chunk, classic), classic, replicas=reps)
        got = hard_mode_histograms(read_chunk(chunk, general), general, replicas=reps)
        assert set(got) == set(ref)
        for region in ref:
            assert set(got[region]) == set(ref[region])
            for var in ref[region]:
                a, b = to_arrays(got[region][var]), to_arrays(ref[region][var])
                assert a["sumw"].shape == b["sumw"].shape
                np.testing.assert_array_equal(a["sumw"], b["sumw"], err_msg=f"{region}/{var}")
                np.testing.assert_array_equal(a["sumw2"], b["sumw2"], err_msg=f"{region}/{var}")


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["observables"].__setitem__("ht", {"kind": "scalar_sun", "of": "jet"}), "did you mean 'scalar_sum'"),
    (lambda r: r["observables"].__setitem__("ht", {"kind": "scalar_sum", "of": "jets"}), "'jets' is not an object set"),
    (lambda r: r["observables"].__setitem__("ht", {"kind": "scalar_sum", "of": "jet", "feild": "pt"}),
     "unknown option(s) ['feild']"),
    (lambda r: r["objects"]["jet"]["cuts"].append({"field": "pt", "above": "jet_pt_mni"}), "'jet_pt_mni' is not a parameter"),
    (lambda r: r["objects"]["jet"]["cuts"].append({"field": "qgl", "above": "jet_pt_min"}), "field(s) ['qgl']"),
    (lambda r: r["regions"]["4j1b"]["require"].append({"count": "muon", "at_least": 1}), "no object set 'muon'"),
    (lambda r: r["regions"]["4j1b"]["require"].append({"count": "lepton.tag", "at_least": 1}), "has no tag"),
    (lambda r: r["regions"]["4j1b"].__setitem__("observable", "HT"), "'HT' is not an observable"),
    (lambda r: r["systematics"].__setitem__("x", {"kind": "pt_scael", "name": "x"}), "did you mean 'pt_scale'"),
    (lambda r: r["systematics"].__setitem__("x", {"kind": "pt_scale", "name": "x", "factor": 1.1}), "missing option(s) ['variation']"),
    (lambda r: r["systematics"]["jes"].__setitem__("object", "fatjet"), "object set 'fatjet' does not exist"),
    (lambda r: r.__setitem__("event_fields", {}), "use_genweight_sign needs event_fields.gen_weight"),
    (lambda r: r["regions"]["4j1b"]["require"].append({"count": "jet", "range": [5, 4]}), "asks for 5 to 4 objects"),
])
def test_config_errors_say_what_to_fix(edit, message):
    raw = _raw(GENERAL_AGC)
    edit(raw)
    with pytest.raises(ConfigError) as err:
        AnalysisSpec(raw)
    assert message in str(err.value)


def test_a_users_observable_from_a_plugin_file_serves_soft_and_hard_mode(tmp_path, reference_sample):
    """One jax.numpy function, registered from the config's plugins, is the soft and the hard observable."""
    plugin = tmp_path / "my_observables.py"
    plugin.write_text(textwrap.dedent('''
        import jax.numpy as jnp
        from jacana.stages.observables.library import observable
        from jacana.stages.observables.objects import nth

        @observable("pt_balance", replace=True)
        def pt_balance(ctx, of="jet"):
            """(pT1 - pT2) / (pT1 + pT2) of the two leading selected objects."""
            objs = ctx.objects[of]
            w = objs.weights()
            a, b = nth(objs.pt, w, 0), nth(objs.pt, w, 1)
            return jnp.where(a + b > 0, (a - b) / jnp.where(a + b > 0, a + b, 1.0), 0.0)
    '''))
    raw = _raw(GENERAL_AGC)
    raw["plugins"] = ["my_observables.py"]
    raw["observables"]["balance"] = {"kind": "pt_balance", "of": "jet"}
    raw["regions"]["4j1b"].update(observable="balance", edges=[0.0, 0.1, 0.2, 0.4, 0.7, 1.0])
    config = tmp_path / "analysis.yaml"
    config.write_text(yaml.safe_dump(raw))
    spec = load_spec(config)
    chunk = reference_sample["fileset"].chunks("ttbar", "nominal", chunk_size=1500)[0]
    columns = read_chunk(chunk, spec)
    from jacana.stages.analysis import hard_mode_histograms
    from jacana.stages.reference import to_arrays

    got = to_arrays(hard_mode_histograms(columns, spec)["4j1b"]["nominal"])["sumw"]
    # the same selection by hand (awkward), the observable in numpy
    import awkward as ak

    c, p = columns, spec.param_values()
    jets = (c["jet_id"] == 6) & (c["jet_pt"] > p["jet_pt_min"]) & (abs(c["jet_eta"]) < p["jet_eta_max"])
    ele = (abs(c["electron_eta"]) < 2.1) & (c["electron_id"] == 4) & (c["electron_sip3d"] < 4) & (c["electron_pt"] > p["lepton_pt_min"])
    mu = ((abs(c["muon_eta"]) < 2.1) & (c["muon_id"] != 0) & (c["muon_sip3d"] < 4) & (c["muon_iso"] < 0.15)
          & (c["muon_pt"] > p["lepton_pt_min"]))
    n_tag = ak.sum(jets & (c["jet_btag"] > p["btag_min"]), axis=1)
    keep = ak.to_numpy((ak.sum(ele, axis=1) + ak.sum(mu, axis=1) == 1) & (ak.sum(jets, axis=1) >= 4) & (n_tag == 1))
    pt = ak.fill_none(ak.pad_none(c["jet_pt"][jets], 2, axis=1), 0.0)
    a, b = ak.to_numpy(pt[:, 0]).astype(np.float64), ak.to_numpy(pt[:, 1]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # events without two jets are not selected
        x = (a - b) / (a + b)
    from jacana.stages.reference import event_weight

    want, _ = np.histogram(x[keep], bins=[0.0, 0.1, 0.2, 0.4, 0.7, 1.0], weights=event_weight(columns, spec)[keep])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.sum() > 0
    # and it is differentiable in soft mode
    batches = make_batches(columns, spec, prefilter=True)
    jac = jax.jacfwd(lambda q: chunk_yields(q, default_relax(spec), batches, soft_config(spec)))(default_params(spec))
    assert np.all(np.isfinite(np.asarray(jac["4j1b"]["sumw"]["jet_pt_min"])))
    assert np.any(np.asarray(jac["4j1b"]["sumw"]["jet_pt_min"]) != 0)


def test_registries_drive_the_cli_and_the_errors():
    from jacana.cli.main import objective_names
    from jacana.stages.observables.library import OBSERVABLES
    from jacana.stages.stats.objectives import OBJECTIVES
    from jacana.stages.systematics import SYSTEMATICS

    assert objective_names() == sorted(OBJECTIVES) == ["cls", "sigma_mu", "upper_limit", "z0"]
    assert {"count", "scalar_sum", "vector_sum_pt", "leading", "invariant_mass", "trijet_mass", "transverse_mass",
            "delta_r", "nn"} <= set(OBSERVABLES.names())
    assert {"pt_scale", "pt_smear", "leading_object_weight", "event_weight", "alternative_sample",
            "normalization"} <= set(SYSTEMATICS.names())
    assert SYSTEMATICS.canonical("btag_weight") == "leading_object_weight"  # the AGC config's names are aliases
    with pytest.raises(ValueError, match="already registered"):
        OBSERVABLES.register("count")(None)


def test_the_single_top_config_loads_with_its_regions_and_variations():
    spec = load_spec(_config(SINGLE_TOP))
    d = spec.definition
    assert [r.name for r in d.regions] == ["2j1t", "3j2t", "2j0t"]
    assert d.kinematic == ("nominal", "pt_scale_up", "pt_res_up")
    assert spec.file_variations("ttbar") == ["nominal", "scaleup", "scaledown"]
    assert set(spec.branches.values()) >= {"MET_pt", "MET_phi", "Jet_btagCSVV2", "genWeight"}
    assert d.relax_names[-2:] == ("trijet_pt", "bandwidth") and "mt_min" in d.relax_names
    raw = copy.deepcopy(spec.raw)
    raw["regions"]["2j1t"]["require"] = [{"count": "jet", "equals": 2}, {"count": "jet.tag", "equals": 1},
                                         {"observable": "eta_lj", "above": 1.5}]
    d2 = AnalysisSpec(raw).definition
    assert d2.region("2j1t").cuts[-1].value == 1.5


@pytest.fixture(scope="module")
def single_top_samples(tmp_path_factory):
    """Two small independent single-top samples (training, held-out), one file per (sample, variation)."""
    from jacana.samples.synthetic import generate

    out = tmp_path_factory.mktemp("single_top")
    return (generate(out / "train", events=20_000, seed=21, files_per_sample=1, progress=False, preset="single_top"),
            generate(out / "validate", events=20_000, seed=22, files_per_sample=1, progress=False, preset="single_top"))


@pytest.mark.slow
def test_single_top_optimize_end_to_end(single_top_samples, tmp_path):
    """`jacana optimize --config single_top_tchan.yaml`: two steps, the held-out hard analysis before and after."""
    import json

    from jacana.cli.main import main

    train, validate = single_top_samples
    out = tmp_path / "opt"
    assert main(["optimize", "--config", _config(SINGLE_TOP), "--fileset", str(train), "--validation-fileset",
                 str(validate), "--steps", "2", "--last-point", "--no-plots", "--quiet", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["final_params"]) == {"lepton_pt_min", "jet_pt_min", "jet_eta_max", "btag_min", "mt_min"}
    before, after = (result["validation"][k]["expected"]["sigma_mu"] for k in ("before", "after"))
    assert np.isfinite(before) and np.isfinite(after) and before > 0 and after > 0
    assert result["validation"]["before"]["tchan_norm"]["converged"]
    assert any(result["final_params"][k] != result["initial_params"][k] for k in result["final_params"])
    ws = json.loads((out / "workspace.json").read_text())
    assert ws["measurements"][0]["config"]["poi"] == "tchan_norm"
    assert [c["name"] for c in ws["channels"]] == ["2j1t", "3j2t", "2j0t"]


def test_event_weight_systematic_reweights_the_nominal_selection(reference_sample):
    """An ``event_weight`` kind takes its weight ratio from an event field: its template is the nominal
    selection filled with weight x ratio. With genWeight (+-g) as the ratio, weight x ratio is
    |weight| x g: the nominal histogram without the sign convention, times g."""
    from jacana.stages.analysis import hard_mode_histograms
    from jacana.stages.reference import to_arrays

    raw = _raw(GENERAL_AGC)
    raw["event_fields"]["w_ratio"] = "genWeight"
    raw["systematics"]["gw"] = {"kind": "event_weight", "name": "test", "up": "w_ratio", "variation": "gw"}
    spec = AnalysisSpec(raw)
    assert spec.weight_variations()[-1] == "gw_up"
    chunk = reference_sample["fileset"].chunks("wjets", "nominal", chunk_size=1500)[0]
    columns = read_chunk(chunk, spec)
    ratio = np.unique(np.asarray(columns["w_ratio"], np.float64))
    assert len(ratio) == 2 and ratio[0] == -ratio[1]  # negative weights present: a real reweighting
    h = hard_mode_histograms(columns, spec)
    unsigned = AnalysisSpec({**raw, "use_genweight_sign": False})
    h_abs = hard_mode_histograms(read_chunk(chunk, unsigned), unsigned)
    for region in spec.regions:
        np.testing.assert_allclose(to_arrays(h[region]["gw_up"])["sumw"],
                                   ratio[1] * to_arrays(h_abs[region]["nominal"])["sumw"], rtol=1e-12)
    assert sum(to_arrays(h[region]["gw_up"])["sumw"].sum() for region in spec.regions) > 0
