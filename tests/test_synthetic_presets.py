"""The synthetic generator's presets ("agc", "single_top"), its MET branches and the per-preset caches.

The "agc" preset's pre-MET branches must stay what generator 1.1.0 wrote before presets and MET
existed (the cached samples and every published figure depend on them); MET and the single-top
preset draw from random streams of their own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from test_synthetic import collection, load_events  # the same file readers
from jacana.samples import synthetic
from jacana.samples.synthetic import generate

#: sha256 of every pre-MET branch (sorted by file and branch name, see ``_branch_digest``) of
#: ``generate(events=6000, seed=3, files_per_sample=1)``: the digest of generator 1.1.0's output,
#: computed before the presets and the MET branches were added.
AGC_DIGEST_1_1_0 = "9e7b277d3d74db34447b43b05720014ee5d8fc15b5e288cebe58da55c280d04e"
SINGLE_TOP = {"single_top_t_chan": {"nominal"}, "ttbar": {"nominal", "scaleup", "scaledown"},
              "wjets": {"nominal"}, "single_top_tW": {"nominal"}}


def _branch_digest(fileset: Path, exclude_prefixes=("MET_",)) -> str:
    fs = json.loads(fileset.read_text())
    h = hashlib.sha256()
    for process in sorted(fs):
        for variation in sorted(fs[process]):
            for f in fs[process][variation]["files"]:
                tree = uproot.open(fileset.parent / f["path"])["Events"]
                for name in sorted(tree.keys()):
                    if name.startswith(exclude_prefixes):
                        continue
                    flat = ak.to_numpy(ak.flatten(tree[name].array(), axis=None))
                    h.update(f"{f['path']}:{name}:{flat.dtype.str}:{len(flat)}".encode())
                    h.update(np.ascontiguousarray(flat).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def agc(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("agc"), events=6000, seed=3, files_per_sample=1, progress=False)


@pytest.fixture(scope="module")
def single_top(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("single_top"), events=4000, seed=3, progress=False, preset="single_top")


# -- (a) the AGC preset is generator 1.1.0's output, plus MET ---------------------------------------------
def test_agc_preset_branches_are_bit_identical_to_generator_1_1_0(agc):
    assert _branch_digest(agc) == AGC_DIGEST_1_1_0
    tree = uproot.open(agc.parent / "ttbar__nominal__0.root")["Events"]
    assert {"MET_pt", "MET_phi"} <= set(tree.keys())
    meta = json.loads((agc.parent / "generator.json").read_text())
    assert meta["preset"] == "agc" and meta["version"] == "1.1.0" and meta["met"]["branches"] == ["MET_pt", "MET_phi"]
    assert meta["oversample"] == {"wjets": 20} and meta["skims"]["wjets"]["min_jets"] == 4


# -- (b) MET -----------------------------------------------------------------------------------------------
def test_met_is_well_formed_in_every_file(agc, single_top):
    for fileset in (agc, single_top):
        fs = json.loads(fileset.read_text())
        for variations in fs.values():
            for block in variations.values():
                for f in block["files"]:
                    tree = uproot.open(fileset.parent / f["path"])["Events"]
                    assert tree["MET_pt"].typename == "float" and tree["MET_phi"].typename == "float"
                    pt, phi = tree["MET_pt"].array(library="np"), tree["MET_phi"].array(library="np")
                    assert len(pt) == len(phi) == f["nevts"]
                    assert np.all(np.isfinite(pt)) and np.all(np.isfinite(phi)) and np.all(pt >= 0)
                    assert np.all(np.abs(phi.astype(np.float64)) <= np.pi)
                    assert np.std(phi) > 1.0  # not all one direction


def test_met_branch_types_match_real_nanoaod(agc, real_nanoaod):
    real = uproot.open(real_nanoaod)["Events"]
    ours = uproot.open(agc.parent / "wjets__nominal__0.root")["Events"]
    for name in ("MET_pt", "MET_phi"):
        assert ours[name].typename == real[name].typename == "float", name


def test_met_follows_the_neutrinos(single_top):
    """Single top: MET from the W's neutrino (leptonic decays only) plus resolution. W+jets (W -> l nu
    only): the transverse mass of the lepton and MET has its Jacobian edge at m_W."""
    t_chan = ak.to_numpy(load_events(single_top, "single_top_t_chan").MET_pt)
    assert 20 < t_chan.mean() < 60
    a = load_events(single_top, "wjets")
    el, mu = collection(a, "Electron"), collection(a, "Muon")
    lep = ak.concatenate([el[["pt", "phi"]][(el.pt > 30) & (el.cutBased == 4)],
                          mu[["pt", "phi"]][(mu.pt > 30) & mu.tightId & (mu.pfRelIso04_all < 0.15)]], axis=1)
    one = ak.num(lep) == 1
    lep = lep[one][:, 0]
    met, phi = a.MET_pt[one], a.MET_phi[one]
    mt = ak.to_numpy(np.sqrt(2 * lep.pt * met * (1 - np.cos(lep.phi - phi))))
    assert len(mt) > 1000
    assert 20 < float(ak.mean(met)) < 80
    assert 55 < np.median(mt) < 85
    counts, edges = np.histogram(mt, bins=12, range=(0, 120))
    assert 60 <= edges[np.argmax(counts)] < 90  # the Jacobian peak just below m_W
    assert np.mean(mt > 100) < 0.05  # ... and the edge above it (the resolution smears it a little)
    assert np.corrcoef(ak.to_numpy(lep.pt), ak.to_numpy(met))[0, 1] > 0.2  # W at low pT: p_T(nu) ~ p_T(l)


def test_met_draws_leave_the_event_stream_alone():
    """MET's random numbers come from a stream of their own: a chunk's other columns do not depend on it."""
    a = synthetic._make_chunk(7, "ttbar", "nominal", 0, 0, 1, 3000, preset="agc")
    ss = np.random.SeedSequence([7, 0, 0, 0, 0])
    e = synthetic._Event(np.random.Generator(np.random.PCG64(ss)), 3000, synthetic.TUNES["nominal"])
    synthetic.PROCESSES["ttbar"](e)
    jets, _, _ = synthetic._detector(e)
    assert np.array_equal(ak.to_numpy(ak.flatten(a["Jet"].pt)), jets[1]["pt"])
    # without resolution MET is the neutrinos' sum: all-hadronic ttbar events (no neutrino) have ~ resolution only
    px, py = e.invisible_pt()
    assert np.mean(np.hypot(px, py) == 0) > 0.3
    met = ak.to_numpy(a["MET_pt"])
    assert np.median(met[np.hypot(px, py) == 0]) < 2 * synthetic.MET_SIGMA < np.median(met[np.hypot(px, py) > 0])


# -- (c) the single-top preset -------------------------------------------------------------------------------
def test_single_top_fileset_shape_and_loader(single_top):
    fs = json.loads(single_top.read_text())
    assert {p: set(v) for p, v in fs.items()} == SINGLE_TOP
    for process, variations in fs.items():
        for block in variations.values():
            assert set(block) == {"files", "nevts_total"}
            written = sum(f["nevts"] for f in block["files"])
            if process == "wjets":
                assert 0.1 * block["nevts_total"] < written < 0.6 * block["nevts_total"]
            else:
                assert written == block["nevts_total"]
    meta = json.loads((single_top.parent / "generator.json").read_text())
    assert meta["preset"] == "single_top" and meta["events_requested"] == 4000
    assert meta["skims"]["wjets"]["min_jets"] == 2 and meta["skims"]["wjets"]["jet_eta_max"] == 4.7
    assert meta["processes"]["single_top_t_chan"] == "_single_top_t_forward"
    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    loaded = load_fileset(single_top)
    assert loaded.nevts_total("wjets", "nominal") == fs["wjets"]["nominal"]["nevts_total"]
    assert len(loaded.chunks("single_top_t_chan", "nominal")) >= 1
    # the AGC selection needs less than the single-top skim keeps; softer leptons it does not have
    assert synthetic.skim_conflicts(load_spec(), loaded) == []
    lines = synthetic.skim_conflicts(load_spec(overrides={"parameters.lepton_pt_min.bounds": [20.0, 100.0]}), loaded)
    assert len(lines) == 1 and "lepton_pt_min can go down to 20 GeV" in lines[0] and "wjets" in lines[0]


def test_single_top_wjets_skim_keeps_two_forward_jets(single_top):
    a = load_events(single_top, "wjets")
    jet, el, mu = collection(a, "Jet"), collection(a, "Electron"), collection(a, "Muon")
    tight = (jet.jetId == 6) & (jet.pt >= 15) & (abs(jet.eta) < 4.7)
    n_jets = ak.to_numpy(ak.sum(tight, axis=1))
    n_lep = ak.to_numpy(ak.sum((el.pt >= 25) & (abs(el.eta) < 2.5), axis=1)
                        + ak.sum((mu.pt >= 25) & (abs(mu.eta) < 2.4), axis=1))
    assert np.all(n_jets >= 2) and np.all(n_lep >= 1)
    assert np.mean(n_jets == 2) > 0.2 and np.sum(n_jets == 3) > 100
    # jets beyond the tracker are stored; their b-tag discriminant is -10 (no tracks)
    flat = ak.flatten(jet)
    forward = abs(flat.eta) > 2.4
    assert ak.sum(forward & (flat.jetId == 6) & (flat.pt > 30)) > 100 and ak.max(abs(flat.eta)) < 4.7
    assert ak.all(flat.btagCSVV2[forward] == -10.0)


def test_t_channel_light_jet_is_forward(single_top):
    """In events with a lepton (pT > 25 GeV; the top decayed leptonically, mostly), the leading
    untagged tight jet (pT > 30 GeV, |eta| < 4.7) is the spectator quark in t-channel events (mean
    |eta| ~ 2-2.5 in real events), a W or radiation jet in ttbar (central)."""
    mean = {}
    for process in ("single_top_t_chan", "ttbar"):
        a = load_events(single_top, process)
        el, mu, jet = collection(a, "Electron"), collection(a, "Muon"), collection(a, "Jet")
        lepton = ak.to_numpy(ak.any(el.pt > 25, axis=1) | ak.any(mu.pt > 25, axis=1))
        jet = jet[(jet.pt > 30) & (abs(jet.eta) < 4.7) & (jet.jetId == 6) & (jet.btagCSVV2 < 0.5)]
        lead = ak.firsts(jet[lepton])
        mean[process] = float(np.mean(ak.to_numpy(abs(lead.eta[~ak.is_none(lead)]))))
    assert mean["single_top_t_chan"] > mean["ttbar"] + 0.5
    assert 1.6 < mean["single_top_t_chan"] < 2.8


def test_presets_draw_independent_events():
    kw = {"seed": 5, "process": "ttbar", "variation": "nominal", "file_index": 0, "chunk_index": 0,
          "first_event": 1, "n": 500}
    a = synthetic._make_chunk(**kw, preset="agc")
    b = synthetic._make_chunk(**kw, preset="single_top")
    assert not np.array_equal(ak.to_numpy(a["Jet"].pt[:, 0]), ak.to_numpy(b["Jet"].pt[:, 0]))
    assert ak.array_equal(b["Jet"].pt, synthetic._make_chunk(**kw, preset="single_top")["Jet"].pt)
    with pytest.raises(ValueError, match="preset"):
        generate("unused", events=1000, preset="nope", progress=False)


# -- (d) per-preset caches -------------------------------------------------------------------------------
def test_default_fileset_caches_per_preset(tmp_path, monkeypatch):
    from jacana.samples import datasets

    monkeypatch.setenv("JACANA_CACHE", str(tmp_path))
    agc = datasets.default_fileset("validate", events=1000, progress=False)
    st = datasets.default_fileset("validate", events=1000, progress=False, preset="single_top")
    # the AGC cache keeps the name it had before presets existed
    assert agc == tmp_path / "synthetic" / f"agc_v{synthetic.GENERATOR_VERSION}_seed2_events1000" / "fileset.json"
    assert st == tmp_path / "synthetic" / f"single_top_v{synthetic.GENERATOR_VERSION}_seed2_events1000" / "fileset.json"
    assert set(json.loads(st.read_text())) == set(SINGLE_TOP) and datasets.has_met(agc) and datasets.has_met(st)
    # a cache written before MET: still served as it is, regenerated only when MET is required
    meta = json.loads((agc.parent / "generator.json").read_text())
    meta.pop("met")
    (agc.parent / "generator.json").write_text(json.dumps(meta))
    assert not datasets.has_met(agc)
    assert datasets.default_fileset("validate", events=1000, progress=False) == agc and not datasets.has_met(agc)
    assert datasets.default_fileset("validate", events=1000, progress=False, require_met=True) == agc
    assert datasets.has_met(agc)
    with pytest.raises(ValueError, match="preset"):
        datasets.default_fileset("validate", events=1000, progress=False, preset="nope")
