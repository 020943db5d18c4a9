"""Parity of the general analysis form (issue #21) with an independent plain-awkward implementation.

* the single-top t-channel config in hard mode (the engine at ``hard_relax``) equals
  ``general_reference.hard_histograms`` (awkward + hist, written from the config semantics) for every
  region, every variation and the alternative ttbar files, on a small synthetic single_top sample;
* every registered observable kind is some region's observable of a small config, and its hard mode
  equals the plain implementation on synthetic events and on the real NanoAOD file (the tests are
  generated from the registry: a kind added without a case here fails);
* soft mode: the Jacobian of the soft yields equals central finite differences, and the soft yields
  tend to the hard ones as every temperature and the bandwidth go to zero.
"""

from __future__ import annotations

import copy
from importlib import resources

import awkward as ak
import jax
import numpy as np
import pytest
import yaml

import general_reference as gr
from jacana.stages.analysis import (chunk_yields, default_params, default_relax, hard_mode_histograms, hard_relax,
                                    soft_config)
from jacana.stages.batch import make_batches
from jacana.stages.columns import read_chunk
from jacana.stages.fileset import Chunk, load_fileset
from jacana.stages.observables import nn
from jacana.stages.observables.library import OBSERVABLES
from jacana.stages.spec import AnalysisSpec

REAL_FILE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"
RTOL = 1e-9
#: Events per chunk: the first chunk of every (sample, file variation) is compared. Compilation (one
#: per dense-batch shape) is most of these tests' time; 1000-event chunks give few shapes.
CHUNK = 1000


def _single_top_raw() -> dict:
    return yaml.safe_load(resources.files("jacana.stages").joinpath("configs/single_top_tchan.yaml").read_text())


SINGLE_TOP = AnalysisSpec(_single_top_raw(), source="single_top_tchan.yaml")
#: (sample, file variation) pairs the single-top analysis reads: every nominal, and ttbar scaleup/down
FILE_VARIATIONS = [(s, v) for s in SINGLE_TOP.samples for v in SINGLE_TOP.file_variations(s)]


@pytest.fixture(scope="module")
def single_top_fileset(tmp_path_factory):
    from jacana.samples.synthetic import generate

    out = tmp_path_factory.mktemp("single_top_parity")
    return load_fileset(generate(out, events=20_000, seed=5, files_per_sample=1, progress=False, preset="single_top"))


def _columns(fileset, spec, sample, variation):
    return read_chunk(fileset.chunks(sample, variation, chunk_size=CHUNK)[0], spec)


def assert_same_histograms(got: dict, want: dict, where: str) -> None:
    """{region: {variation: hist}}: same keys, sumw and sumw2 equal to RTOL (relative; empty bins to
    RTOL of the histogram's largest bin)."""
    assert set(got) == set(want), where
    for region in want:
        assert set(got[region]) == set(want[region]), f"{where} {region}: {sorted(got[region])} vs {sorted(want[region])}"
        for var in want[region]:
            a, b = gr.to_arrays(got[region][var]), gr.to_arrays(want[region][var])
            np.testing.assert_array_equal(a["edges"], b["edges"])
            for k in ("sumw", "sumw2"):
                np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=RTOL * np.abs(b[k]).max(initial=0.0),
                                           err_msg=f"{where}: {region}/{var} {k}")


# -- 1a. the single-top analysis: hard mode = the plain implementation -------------------------------
@pytest.mark.parametrize("sample,variation", FILE_VARIATIONS)
def test_single_top_hard_mode_equals_plain_awkward(single_top_fileset, sample, variation):
    columns = _columns(single_top_fileset, SINGLE_TOP, sample, variation)
    got = hard_mode_histograms(columns, SINGLE_TOP)
    want = gr.hard_histograms(columns, SINGLE_TOP.raw)
    expected = (SINGLE_TOP.kinematic_variations() + SINGLE_TOP.weight_variations() if variation == "nominal"
                else [variation])
    assert sorted(want["2j1t"]) == sorted(expected)  # every variation: nominal, JES, JER, b-tag NPs
    if variation == "nominal":
        assert {"pt_scale_up", "pt_res_up", "btag_var_0_up", "btag_var_1_down"} <= set(expected)
    assert_same_histograms(got, want, f"{sample}/{variation}")
    key = "nominal" if variation == "nominal" else variation
    assert sum(want[r][key].values().sum() for r in want) > 0  # not a comparison of empty histograms


@pytest.mark.slow
@pytest.mark.parametrize("sample,variation", FILE_VARIATIONS)
def test_single_top_hard_mode_equals_plain_awkward_on_every_chunk(single_top_fileset, sample, variation):
    """The same on all 33k events (every chunk of every file; about 10 s more than the first chunks)."""
    for chunk in single_top_fileset.chunks(sample, variation, chunk_size=CHUNK):
        columns = read_chunk(chunk, SINGLE_TOP)
        assert_same_histograms(hard_mode_histograms(columns, SINGLE_TOP), gr.hard_histograms(columns, SINGLE_TOP.raw),
                               f"{sample}/{variation} entries {chunk.entry_start}-{chunk.entry_stop}")


# -- 1b. every observable kind: the engine's hard limit = the plain implementation ------------------
def _kinds_raw(nn_weights: dict) -> dict:
    """A config whose regions each histogram one observable: every built-in kind (and its options),
    every count form, fixed cuts of every operator, a tag with ``abs``/``below``, all systematic kinds."""
    raw = _single_top_raw()
    raw["name"] = "every_observable_kind"
    raw["event_fields"] = {"gen_weight": "genWeight", "met_pt": "MET_pt", "met_phi": "MET_phi"}
    params = raw["parameters"]
    for k, v in {"lepton_pt_min": 26.0, "jet_pt_min": 25.0, "jet_eta_max": 3.0, "btag_min": 0.6, "mt_min": 30.0}.items():
        params[k]["value"] = v
    params["lepton_eta_central"] = {"value": 1.2, "bounds": [0.5, 2.1], "temperature": 0.05}
    raw["objects"]["lepton"]["tag"] = {"field": "eta", "abs": True, "below": "lepton_eta_central"}
    raw["objects"]["jet"]["from"]["jet"] = [{"field": "id", "at_least": 2}, {"field": "id", "not_equal": 4},
                                            {"field": "pt", "above": 20.0}, {"field": "eta", "abs": True, "at_most": 4.7},
                                            {"field": "mass", "above": -1.0}]
    raw["selection"] = []
    jet, lep = {"of": "jet"}, {"of": "lepton"}
    obs = {
        "n_jet": {"kind": "count", "of": "jet"},
        "n_tag": {"kind": "count", "of": "jet", "select": "tagged"},
        "n_lep_central": {"kind": "count", "of": "lepton", "select": "tagged"},
        "met": {"kind": "event_field", "field": "met_pt"},
        "ht": {"kind": "scalar_sum", "of": "jet"},
        "st_lep": {"kind": "scalar_sum", "of": "lepton"},
        "btag_sum": {"kind": "scalar_sum", "of": "jet", "field": "btag", "select": "tagged"},
        "mht": {"kind": "vector_sum_pt", "of": "jet"},
        "mht_untagged": {"kind": "vector_sum_pt", "of": "jet", "select": "untagged"},
        "pt_j1": {"kind": "leading", "of": "jet"},
        "pt_j2": {"kind": "leading", "of": "jet", "index": 1},
        "pt_j3": {"kind": "leading", "of": "jet", "index": 2},
        "pt_j4": {"kind": "leading", "of": "jet", "index": 3},
        "eta_j2": {"kind": "leading", "of": "jet", "field": "eta", "index": 1},
        "eta_lj": {"kind": "leading", "of": "jet", "field": "eta", "select": "untagged", "abs": True},
        "btag_b2": {"kind": "leading", "of": "jet", "field": "btag", "select": "tagged", "index": 1},
        "pt_l": {"kind": "leading", "of": "lepton"},
        "m_jj": {"kind": "invariant_mass", "of": "jet"},
        "m_jjj": {"kind": "invariant_mass", "of": "jet", "n": 3},
        "m_lb": {"kind": "invariant_mass", "parts": [lep, {"of": "jet", "select": "tagged"}]},
        "m_mixed": {"kind": "invariant_mass", "parts": [{"of": "jet", "index": 1},
                                                         {"of": "jet", "select": "untagged", "index": 1},
                                                         {"of": "lepton", "select": "tagged"}]},
        "m_bjj": {"kind": "trijet_mass", "of": "jet"},
        "mt_w": {"kind": "transverse_mass", "of": "lepton", "met": {"pt": "met_pt", "phi": "met_phi"}},
        "mt_j": {"kind": "transverse_mass", "of": "jet", "index": 1, "select": "untagged"},
        "dr_jj": {"kind": "delta_r", "a": jet, "b": {"of": "jet", "index": 1}},
        "dr_lb": {"kind": "delta_r", "a": lep, "b": {"of": "jet", "select": "tagged"}},
        "nn_out": {"kind": "nn", "features": {"ht": "ht", "jet1_pt": "pt_j1", "jet2_pt": "pt_j2", "jet3_pt": "pt_j3",
                                              "jet4_pt": "pt_j4", "n_jets": "n_jet", "lepton_pt": "pt_l",
                                              "m_bjj": "m_bjj"}},
    }
    raw["observables"] = obs

    def lin(lo, hi, n):
        return {"low": lo, "high": hi, "bins": n}

    one_lep = {"count": "lepton", "equals": 1}
    regions = {  # region: (observable, requirements, edges)
        "r_n_jet": ("n_jet", [], [-0.5 + i for i in range(11)]),
        "r_n_tag": ("n_tag", [{"count": "jet", "at_least": 1}], [-0.5 + i for i in range(6)]),
        "r_n_lep_central": ("n_lep_central", [{"count": "jet", "range": [2, 4]}], [-0.5, 0.5, 1.5, 2.5]),
        "r_met": ("met", [one_lep, {"observable": "met", "above": 20.0}], lin(0.0, 200.0, 10)),
        "r_ht": ("ht", [{"count": "jet", "at_least": 2, "at_most": 5}], lin(0.0, 600.0, 12)),
        "r_st_lep": ("st_lep", [{"count": "lepton", "at_least": 1}], lin(0.0, 300.0, 10)),
        "r_btag_sum": ("btag_sum", [{"count": "jet.tag", "range": [1, 3]}], lin(0.5, 3.0, 10)),
        "r_mht": ("mht", [{"count": "jet.tag", "veto": True}], lin(0.0, 300.0, 10)),
        "r_mht_untagged": ("mht_untagged", [{"count": "jet", "at_least": 3}], lin(0.0, 300.0, 10)),
        "r_pt_j1": ("pt_j1", [one_lep], lin(0.0, 400.0, 10)),
        "r_eta_j2": ("eta_j2", [], lin(-5.0, 5.0, 20)),
        "r_eta_lj": ("eta_lj", [{"count": "jet", "equals": 2}, {"count": "jet.tag", "equals": 1}],
                     [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.7]),
        "r_btag_b2": ("btag_b2", [{"count": "jet.tag", "at_least": 2}], lin(0.6, 1.0, 8)),
        "r_pt_l": ("pt_l", [{"count": "lepton", "at_most": 1}], lin(0.0, 200.0, 10)),
        "r_m_jj": ("m_jj", [{"count": "jet", "at_least": 2}], lin(0.0, 500.0, 10)),
        "r_m_jjj": ("m_jjj", [{"count": "jet", "at_least": 1}], lin(0.0, 800.0, 16)),
        "r_m_lb": ("m_lb", [one_lep, {"count": "jet.tag", "at_least": 1}, {"observable": "mt_w", "above": "mt_min"}],
                   lin(0.0, 400.0, 10)),
        "r_m_mixed": ("m_mixed", [{"count": "lepton.tag", "at_most": 1}], lin(0.0, 800.0, 16)),
        "r_m_bjj": ("m_bjj", [{"count": "jet", "at_least": 3}, {"count": "jet.tag", "at_least": 1}], lin(0.0, 600.0, 12)),
        "r_m_bjj_any": ("m_bjj", [], lin(0.0, 600.0, 12)),  # no trijet with a tag: 0 (the first bin)
        "r_mt_w": ("mt_w", [one_lep, {"count": "lepton.tag", "equals": 1}], lin(0.0, 200.0, 10)),
        "r_mt_j": ("mt_j", [{"count": "jet", "at_least": 2}, {"observable": "mt_w", "below": 150.0}], lin(0.0, 300.0, 10)),
        "r_dr_jj": ("dr_jj", [], lin(0.0, 6.0, 12)),
        "r_dr_lb": ("dr_lb", [one_lep], lin(0.0, 6.0, 12)),
        "r_nn": ("nn_out", [{"count": "lepton", "at_least": 1}, {"count": "jet", "at_least": 2}], lin(0.0, 1.0, 10)),
    }
    raw["regions"] = {name: {"observable": o, "require": req, "edges": e} for name, (o, req, e) in regions.items()}
    raw["systematics"] = {
        "jes": {"kind": "pt_scale", "object": "jet", "name": "JES", "factor": 1.03, "variation": "pt_scale_up"},
        "jer": {"kind": "pt_smear", "object": "jet", "name": "JER", "sigma": 0.05, "seed": 20151103,
                "variation": "pt_res_up"},
        "les": {"kind": "pt_scale", "object": "lepton", "name": "lepton scale", "factor": 0.98,
                "variation": "lepton_scale_down"},
        "btag": {"kind": "leading_object_weight", "object": "jet", "name": "b-tag", "n": 2, "rate": 0.075,
                 "pt_ref": 50.0, "variation": "btag_var"},
        "metw": {"kind": "event_weight", "name": "a weight from an event field", "up": "met_pt", "down": "met_phi",
                 "variation": "met_weight"},
        "lumi": {"kind": "normalization", "name": "Luminosity", "samples": "all", "up": 1.03, "down": 0.97},
        "ttbar_scale": {"kind": "alternative_sample", "name": "ttbar scale", "sample": "ttbar", "up": "scaleup",
                        "down": "scaledown"},
    }
    raw["nn"] = {"weights": nn.weights_to_json(nn_weights)}
    return raw


def _nn_weights() -> dict:
    """The seeded initial network with a random (not zero) output layer, so every feature matters."""
    w = nn.init_weights()
    rng = np.random.default_rng(21)
    w["w3"] = rng.normal(0.0, 1.0, w["w3"].shape)
    w["b3"] = np.asarray(0.3)
    return w


def _jacana_kind(kind: str) -> bool:
    """A kind registered by jacana itself (not a user's plugin, which another test may have loaded)."""
    return OBSERVABLES[kind].fn.__module__.startswith("jacana.")


def _real_columns(spec):
    """The real NanoAOD file's columns for ``spec`` (None where the file is unavailable)."""
    try:
        from skhep_testdata import data_path

        path = data_path(REAL_FILE)
    except Exception:  # not installed, or no network and no cached copy
        return None
    import uproot

    with uproot.open(path) as f:
        n = f["Events"].num_entries
    return read_chunk(Chunk("ttbar", "nominal", path, 0, n, n), spec)


def _events_shaped_like(columns, raw, shapes: dict, max_leptons: int = 2):
    """Some events of ``columns`` (file order) whose dense batches have the bucket widths and padded sizes
    ``shapes`` ({width: events}) and at most ``max_leptons`` leptons: the batches of the real file, so
    one compilation serves both (compiling is most of these tests' time). The events keep their
    values; the JER factors are drawn for their new entry numbers, the same in both implementations."""
    import dataclasses

    from jacana.stages.shapes import jet_bucket

    wide_open = {k: (np.inf if k == "jet_eta_max" else -np.inf) for k in raw["parameters"]}
    n_jets = ak.to_numpy(ak.num(gr.selected_objects(columns, raw, "jet", wide_open), axis=1))
    n_leptons = ak.to_numpy(ak.num(gr.selected_objects(columns, raw, "lepton", wide_open), axis=1))
    bucket = np.array([jet_bucket(int(n)) for n in n_jets])
    keep = np.sort(np.concatenate([np.flatnonzero((bucket == w) & (n_leptons <= max_leptons))[:n]
                                   for w, n in shapes.items()]))
    chunk = dataclasses.replace(columns.chunk, entry_stop=columns.chunk.entry_start + len(keep))
    return dataclasses.replace(columns, chunk=chunk, arrays={k: v[keep] for k, v in columns.arrays.items()},
                               jer_factor=None)


@pytest.fixture(scope="module")
def kinds_parity(single_top_fileset):
    """{source: (spec, engine hard histograms, plain histograms)} of the every-kind config on the real
    NanoAOD file (None where it is unavailable) and on synthetic ttbar events."""
    weights = _nn_weights()
    raw = _kinds_raw(weights)
    spec = AnalysisSpec(raw, source="every-kind config")
    out = {}
    real = _real_columns(spec)
    out["real"] = None if real is None else (spec, hard_mode_histograms(real, spec),
                                             gr.hard_histograms(real, raw, nn_weights=weights))
    synthetic = read_chunk(single_top_fileset.chunks("ttbar", "nominal")[0], spec)
    shapes = ({p.bucket_width: p.n_padded for p in make_batches(real, spec, prefilter=True).parts} if real is not None
              else {4: 256, 6: 256, 8: 128})
    synthetic = _events_shaped_like(synthetic, raw, shapes)
    out["synthetic"] = (spec, hard_mode_histograms(synthetic, spec),
                        gr.hard_histograms(synthetic, raw, nn_weights=weights))
    return out


def test_every_registered_observable_kind_has_a_parity_case():
    raw = _kinds_raw(_nn_weights())
    covered = {raw["observables"][r["observable"]]["kind"] for r in raw["regions"].values()}
    missing = sorted(k for k in OBSERVABLES.names() if _jacana_kind(k) and k not in covered)
    assert not missing, f"observable kinds without a parity case in {__file__}: {missing}"


@pytest.mark.parametrize("source", ["synthetic", "real"])
@pytest.mark.parametrize("kind", OBSERVABLES.names())
def test_observable_kind_hard_limit_equals_plain_awkward(kinds_parity, kind, source):
    if not _jacana_kind(kind):
        pytest.skip(f"{kind!r} is a user plugin's kind")
    if kinds_parity[source] is None:
        pytest.skip(f"{REAL_FILE} is not available")
    spec, got, want = kinds_parity[source]
    regions = [name for name, r in spec.raw["regions"].items() if spec.raw["observables"][r["observable"]]["kind"] == kind]
    assert regions, f"observable kind {kind!r} has no parity case (add a region to _kinds_raw)"
    assert_same_histograms({r: got[r] for r in regions}, {r: want[r] for r in regions}, f"{source} ({kind})")
    filled = [r for r in regions if want[r]["nominal"].values().sum() != 0]
    if source == "synthetic":
        assert filled == regions, f"empty regions on the synthetic events: {sorted(set(regions) - set(filled))}"


def test_the_every_kind_comparison_is_not_trivial(kinds_parity):
    """Every region has events on the synthetic sample, most on the real file, and the variations differ."""
    for source, result in kinds_parity.items():
        if result is None:
            continue
        _, _, want = result
        nominal = {r: want[r]["nominal"].values().sum() for r in want}
        filled = sum(v != 0 for v in nominal.values())
        assert filled >= (len(nominal) if source == "synthetic" else len(nominal) // 2), (source, nominal)
        for var in ("pt_scale_up", "pt_res_up", "lepton_scale_down", "btag_var_0_up", "met_weight_up"):
            assert any(not np.array_equal(want[r][var].values(), want[r]["nominal"].values()) for r in want), (source, var)


# -- 1c. the Jacobian of the soft yields = central finite differences ---------------------------------
@pytest.fixture(scope="module", params=["single_top_t_chan", "ttbar"])
def single_top_batches(request, single_top_fileset):
    """(columns, dense batches) of the first chunk of a nominal sample: the shapes test 1a compiled."""
    columns = _columns(single_top_fileset, SINGLE_TOP, request.param, "nominal")
    return columns, make_batches(columns, SINGLE_TOP, prefilter=True)


def test_single_top_jacobian_equals_finite_differences(single_top_batches):
    """On the 4- and 6-object buckets: the object loops unrolled (up to 4 objects) and scanned (more)."""
    batches = [p for p in single_top_batches[1].parts if p.bucket_width in (4, 6)]
    assert len(batches) == 2
    config, relax, p0 = soft_config(SINGLE_TOP), default_relax(SINGLE_TOP), default_params(SINGLE_TOP)
    jac = jax.jacfwd(lambda p: chunk_yields(p, relax, batches, config))(p0)
    for name in SINGLE_TOP.parameters:
        h = 1e-3 * SINGLE_TOP.parameters[name].temperature
        up = chunk_yields({**p0, name: p0[name] + h}, relax, batches, config)
        down = chunk_yields({**p0, name: p0[name] - h}, relax, batches, config)
        for region in up:
            for k in ("sumw", "sumw2"):
                fd = (np.asarray(up[region][k]) - np.asarray(down[region][k])) / (2 * h)
                j = np.asarray(jac[region][k][name])
                scale = np.abs(fd).max()
                assert scale > 0, f"d {region} {k} / d {name} is zero everywhere"
                np.testing.assert_allclose(j, fd, rtol=0, atol=1e-4 * scale, err_msg=f"d {region} {k} / d {name}")


# -- 1d. soft -> hard ------------------------------------------------------------------------------
def test_soft_yields_tend_to_the_hard_ones(single_top_batches):
    """Parameters and bin edges off the files' value grid (NanoAOD stores few mantissa bits, so values
    exactly on a round threshold are common; there the soft limit is 1/2, the hard cut's 0 or 1)."""
    columns, batches = single_top_batches
    config = soft_config(SINGLE_TOP)
    params = dict(default_params(SINGLE_TOP))
    shift = {"lepton_pt_min": 0.0371, "jet_pt_min": 0.0371, "jet_eta_max": -0.00371, "btag_min": 0.000371,
             "mt_min": 0.0371}
    params.update({k: params[k] + v for k, v in shift.items()})
    for name, region in SINGLE_TOP.regions.items():
        params[f"edges_{name}"] = np.asarray(region.edges) + 3.71e-4 * np.diff(region.edges).mean()
    hard = chunk_yields(params, hard_relax(SINGLE_TOP), batches, config)
    # the hard yields at these parameters and edges are the plain implementation's
    raw = copy.deepcopy(SINGLE_TOP.raw)
    for name in raw["regions"]:
        raw["regions"][name]["edges"] = [float(e) for e in params[f"edges_{name}"]]
    want = gr.hard_histograms(columns, raw, params={k: float(params[k]) for k in shift})
    names = config.variations(True)
    for region in hard:
        for i, var in enumerate(names):
            for k in ("sumw", "sumw2"):
                np.testing.assert_allclose(np.asarray(hard[region][k][i]), gr.to_arrays(want[region][var])[k], rtol=RTOL,
                                           atol=RTOL * np.abs(np.asarray(hard[region][k])).max(), err_msg=f"{region}/{var}")
    top = max(float(np.abs(np.asarray(v)).max()) for v in jax.tree.leaves(hard))
    assert top > 0
    errors = []  # the largest |soft - hard| relative to the region's largest hard bin (or to all regions')
    for scale in (1e-1, 1e-2, 1e-3, 1e-4):
        soft = chunk_yields(params, default_relax(SINGLE_TOP, scale=scale), batches, config)
        errors.append(max(float(np.abs(np.asarray(soft[r][k]) - np.asarray(hard[r][k])).max())
                          / (float(np.abs(np.asarray(hard[r][k])).max()) or top) for r in hard for k in ("sumw", "sumw2")))
    assert errors[-1] < 1e-9, errors
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors


# -- a fixed cut on pT under a kinematic variation ------------------------------------------------------
def _fixed_pt_cut_case():
    raw = {
        "name": "fixed_pt_cut", "tree": "Events", "luminosity_pb": 1.0, "use_genweight_sign": False,
        "collections": {"jet": {"prefix": "Jet", "fields": {"pt": "pt", "eta": "eta", "phi": "phi", "mass": "mass"}}},
        "parameters": {"jet_pt_min": {"value": 10.0, "bounds": [0.0, 100.0], "temperature": 1.0}},
        "objects": {"jet": {"from": {"jet": [{"field": "pt", "above": 30.0}]},
                            "cuts": [{"field": "pt", "above": "jet_pt_min"}]}},
        "observables": {"n_jet": {"kind": "count", "of": "jet"}},
        "regions": {"all": {"observable": "n_jet", "edges": [-0.5, 0.5, 1.5, 2.5, 3.5]}},
        "samples": {"s": {"xsec_pb": 1.0}},
        "poi": {"name": "mu", "sample": "s", "bounds": [0.0, 10.0]},
        "systematics": {
            "up": {"kind": "pt_scale", "object": "jet", "name": "up", "factor": 1.1, "variation": "jes_up"},
            "down": {"kind": "pt_scale", "object": "jet", "name": "down", "factor": 0.9, "variation": "jes_down"}},
    }
    from jacana.stages.columns import Columns

    def jagged(values):
        return ak.values_astype(ak.Array(values), np.float32)

    arrays = {"jet_pt": jagged([[29.0, 31.0], [45.0]]), "jet_eta": jagged([[0.1, -0.2], [1.0]]),
              "jet_phi": jagged([[0.5, 2.0], [-1.0]]), "jet_mass": jagged([[5.0, 6.0], [7.0]])}
    return raw, Columns(chunk=Chunk("s", "nominal", "fixed_pt_cut.root", 0, 2, 2), arrays=arrays)


def test_a_fixed_pt_cut_sees_the_varied_pt():
    """jets [29, 31] and [45] GeV, fixed cut pT > 30: JES x1.1 selects 2 and 1 jets, JES x0.9 none and 1."""
    raw, columns = _fixed_pt_cut_case()
    spec = AnalysisSpec(raw)
    want = gr.hard_histograms(columns, raw)
    w = 0.5  # xsec x luminosity / 2 events
    np.testing.assert_array_equal(want["all"]["nominal"].values(), [0, 2 * w, 0, 0])
    np.testing.assert_array_equal(want["all"]["jes_up"].values(), [0, w, w, 0])
    np.testing.assert_array_equal(want["all"]["jes_down"].values(), [w, w, 0, 0])
    assert_same_histograms(hard_mode_histograms(columns, spec), want, "fixed pT cut")
