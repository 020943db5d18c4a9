"""The synthetic AGC sample generator: files, fileset, NanoAOD conventions and physics sanity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from jacana.samples import synthetic
from jacana.samples.synthetic import generate

EVENTS = 20_000
VARIATIONS = {"ttbar": {"nominal", "scaledown", "scaleup", "ME_var", "PS_var"},
              "single_top_s_chan": {"nominal"}, "single_top_t_chan": {"nominal"},
              "single_top_tW": {"nominal"}, "wjets": {"nominal"}}


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn"), events=EVENTS, seed=3, progress=False)


def load_events(fileset: Path, process: str, variation: str = "nominal") -> ak.Array:
    fs = json.loads(fileset.read_text())
    return ak.concatenate([uproot.open(fileset.parent / f["path"])["Events"].arrays()
                           for f in fs[process][variation]["files"]])


def collection(a: ak.Array, name: str) -> ak.Array:
    return ak.zip({k[len(name) + 1:]: a[k] for k in a.fields if k.startswith(name + "_")})


def _agc_selection(a: ak.Array):
    """Per event: (exactly one tight lepton & >= 4 jets, number of b-tags, selected jets)."""
    el, mu, jet = collection(a, "Electron"), collection(a, "Muon"), collection(a, "Jet")
    sel_e = (el.pt > 30) & (abs(el.eta) < 2.1) & (el.cutBased == 4) & (el.sip3d < 4)
    sel_m = ((mu.pt > 30) & (abs(mu.eta) < 2.1) & mu.tightId & (mu.sip3d < 4)
             & (mu.pfRelIso04_all < 0.15))
    jets = jet[(jet.pt > 30) & (abs(jet.eta) < 2.4) & (jet.jetId == 6)]
    base = (ak.sum(sel_e, axis=1) + ak.sum(sel_m, axis=1) == 1) & (ak.num(jets) >= 4)
    return base, ak.sum(jets.btagCSVV2 > 0.5, axis=1), jets


def _p4(j):
    px, py, pz = j.pt * np.cos(j.phi), j.pt * np.sin(j.phi), j.pt * np.sinh(j.eta)
    return px, py, pz, np.sqrt(px ** 2 + py ** 2 + pz ** 2 + j.mass ** 2)


def test_fileset_shape_and_counts(gen):
    assert gen.name == "fileset.json"
    fs = json.loads(gen.read_text())
    assert {p: set(v) for p, v in fs.items()} == VARIATIONS
    total = generated = 0
    for process, variations in fs.items():
        for variation, block in variations.items():
            assert set(block) == {"files", "nevts_total"}
            assert 2 <= len(block["files"]) <= 6
            oversample = synthetic.OVERSAMPLE.get(process, 1)
            expected = int(EVENTS * synthetic.SAMPLE_FRACTIONS[(process, variation)]) * oversample
            assert abs(block["nevts_total"] - expected) <= len(synthetic.SAMPLES) * oversample
            written = sum(f["nevts"] for f in block["files"])
            if process in synthetic.SKIMS:  # nevts_total counts generated events, the files the kept ones
                assert 0.01 * block["nevts_total"] < written < 0.1 * block["nevts_total"]
            else:
                assert block["nevts_total"] == written
            generated += block["nevts_total"]
            events = []
            for f in block["files"]:
                assert set(f) == {"path", "nevts"} and not Path(f["path"]).is_absolute()
                tree = uproot.open(gen.parent / f["path"])["Events"]
                assert tree.num_entries == f["nevts"]
                events.append(tree["event"].array(library="np"))
            events = np.concatenate(events)
            assert len(np.unique(events)) == len(events)  # unique within a (process, variation)
            total += written
    meta = json.loads((gen.parent / "generator.json").read_text())
    assert meta["seed"] == 3 and meta["version"] == synthetic.GENERATOR_VERSION
    assert meta["events"] == total and meta["events_generated"] == generated and meta["events_requested"] == EVENTS
    # readable by the pipeline's own fileset loader
    from jacana.stages.fileset import load_fileset
    loaded = load_fileset(gen)
    assert loaded.nevts_total("ttbar", "nominal") == fs["ttbar"]["nominal"]["nevts_total"]


def test_atomic_writes_leave_no_temporaries(gen):
    assert not list(gen.parent.glob("*.tmp"))
    assert sorted(p.suffix for p in gen.parent.iterdir() if p.suffix != ".root") == [".json", ".json"]


def test_branch_names_and_types_match_real_nanoaod(gen, real_nanoaod):
    real = uproot.open(real_nanoaod)["Events"]
    ours = uproot.open(gen.parent / "ttbar__nominal__0.root")["Events"]
    expected = {"run", "luminosityBlock", "event", "genWeight", "nJet", "nElectron", "nMuon"}
    expected |= {f"Jet_{k}" for k in ("pt", "eta", "phi", "mass", "btagCSVV2", "jetId", "hadronFlavour")}
    expected |= {f"Electron_{k}" for k in ("pt", "eta", "phi", "mass", "sip3d", "cutBased", "charge")}
    expected |= {f"Muon_{k}" for k in ("pt", "eta", "phi", "mass", "sip3d", "pfRelIso04_all", "tightId", "charge")}
    expected |= {"MET_pt", "MET_phi"}
    assert set(ours.keys()) == expected
    for name in expected:
        if name.startswith("n") and name[1:] in ("Jet", "Electron", "Muon"):
            # uproot writes counters as int32; NanoAOD's are uint32
            assert ours[name].typename == "int32_t" and real[name].typename == "uint32_t"
            continue
        assert ours[name].typename == real[name].typename, name


def test_deterministic_for_a_seed(tmp_path):
    a = generate(tmp_path / "a", events=2_000, seed=5, progress=False)
    b = generate(tmp_path / "b", events=2_000, seed=5, progress=False)
    c = generate(tmp_path / "c", events=2_000, seed=6, progress=False)
    assert a.read_text() == b.read_text()
    # another seed generates as many events; only the skimmed W+jets files keep another number
    fa, fc = json.loads(a.read_text()), json.loads(c.read_text())
    assert {p: {v: b["nevts_total"] for v, b in vs.items()} for p, vs in fa.items()} == \
        {p: {v: b["nevts_total"] for v, b in vs.items()} for p, vs in fc.items()}
    assert fa["wjets"] != fc["wjets"] and {p: fa[p] for p in fa if p != "wjets"} == {p: fc[p] for p in fc if p != "wjets"}
    fs = json.loads(a.read_text())
    for process, variations in fs.items():
        for variation, block in variations.items():
            for f in block["files"]:
                xa, xb = (uproot.open(d.parent / f["path"])["Events"].arrays() for d in (a, b))
                assert xa.fields == xb.fields
                for k in xa.fields:
                    assert ak.array_equal(xa[k], xb[k]), (f["path"], k)
    # a different seed gives different events
    xa = load_events(a, "ttbar")
    xc = load_events(c, "ttbar")
    assert not np.array_equal(ak.to_numpy(xa.nJet), ak.to_numpy(xc.nJet))


def test_nanoaod_conventions(gen):
    for process in ("ttbar", "wjets"):
        a = load_events(gen, process)
        for name in ("Jet", "Electron", "Muon"):
            pt = a[f"{name}_pt"]
            assert ak.all(pt[:, 1:] <= pt[:, :-1]), name  # sorted by pT, descending
        jet = collection(a, "Jet")
        assert ak.min(jet.pt) >= 15.0 and ak.max(abs(jet.eta)) < 4.7
        flat = ak.flatten(jet)
        assert np.all(ak.to_numpy(flat.btagCSVV2[abs(flat.eta) > 2.4]) == -10.0)
        central = flat.btagCSVV2[abs(flat.eta) <= 2.4]
        valued = ak.to_numpy(central[central != -10.0])
        assert valued.min() >= 0.0 and valued.max() <= 1.0
        assert 0.03 < np.mean(ak.to_numpy(central) == -10.0) < 0.4
        ids, counts = np.unique(ak.to_numpy(flat.jetId), return_counts=True)
        assert set(ids) == {0, 2, 6} and counts[ids == 6][0] / counts.sum() > 0.75
        assert set(np.unique(ak.to_numpy(flat.hadronFlavour))) <= {0, 4, 5}
        el, mu = collection(a, "Electron"), collection(a, "Muon")
        assert np.allclose(ak.to_numpy(ak.flatten(el.mass)), 0.000511)
        assert np.allclose(ak.to_numpy(ak.flatten(mu.mass)), 0.1057)
        assert set(np.unique(ak.to_numpy(ak.flatten(el.cutBased)))) == {0, 1, 2, 3, 4}
        assert set(np.unique(ak.to_numpy(ak.flatten(mu.charge)))) == {-1, 1}
        assert ak.all(a.run == 1)
        assert ak.all(a.luminosityBlock == (a.event - 1) // 100 + 1)


def test_negative_weight_fractions(gen):
    for process, frac in synthetic.NEG_WEIGHT_FRACTION.items():
        w = ak.to_numpy(load_events(gen, process).genWeight)
        assert len(np.unique(np.abs(w))) == 1
        n = len(w)
        assert abs(np.mean(w < 0) - frac) < 4 * np.sqrt(frac * (1 - frac) / n) + 1e-9, process


def test_btag_by_flavour(gen):
    jet = ak.flatten(collection(load_events(gen, "ttbar"), "Jet"))
    jet = jet[jet.btagCSVV2 >= 0]
    mean = {f: float(ak.mean(jet.btagCSVV2[jet.hadronFlavour == f])) for f in (0, 4, 5)}
    assert mean[5] > 0.7 > mean[4] > mean[0]
    assert mean[0] < 0.3
    eff_b = float(ak.mean(jet.btagCSVV2[jet.hadronFlavour == 5] > 0.5))
    mistag = float(ak.mean(jet.btagCSVV2[jet.hadronFlavour == 0] > 0.5))
    assert 0.8 < eff_b < 0.97 and 0.03 < mistag < 0.15


def _generated(fileset: Path, process: str, variation: str = "nominal") -> int:
    return json.loads(fileset.read_text())[process][variation]["nevts_total"]


def test_ttbar_has_more_btags_than_wjets(gen):
    btags = {}
    for process in ("ttbar", "wjets"):  # per selected event (one lepton, >= 4 jets), which the skim keeps
        base, nb, _ = _agc_selection(load_events(gen, process))
        btags[process] = float(ak.mean(nb[base]))
    assert btags["ttbar"] > 3 * btags["wjets"]
    assert btags["ttbar"] > 1.0


def test_agc_selection_prefers_ttbar(gen):
    rate = {}
    for process in VARIATIONS:  # per generated event
        base, nb, _ = _agc_selection(load_events(gen, process))
        rate[process] = float(ak.sum(base & (nb >= 1))) / _generated(gen, process)
    assert 0.03 < rate["ttbar"] < 0.2
    assert rate["ttbar"] > 20 * rate["wjets"]
    for single_top in ("single_top_s_chan", "single_top_t_chan", "single_top_tW"):
        assert rate[single_top] < rate["ttbar"] / 2
    assert rate["single_top_tW"] > 5 * rate["wjets"]  # tW has a hadronic top


def test_ttbar_trijet_mass_peaks_at_top_mass(gen):
    """The AGC's m_bjj (highest-pT trijet with a b-tag) in 4j2b ttbar events peaks near m_top."""
    base, nb, jets = _agc_selection(load_events(gen, "ttbar"))
    jets = jets[base & (nb >= 2)]
    tri = ak.combinations(jets, 3, fields=["a", "b", "c"])
    pa, pb, pc = _p4(tri.a), _p4(tri.b), _p4(tri.c)
    px, py, pz, e = (pa[i] + pb[i] + pc[i] for i in range(4))
    mass = np.sqrt(np.maximum(e ** 2 - px ** 2 - py ** 2 - pz ** 2, 0))
    has_b = (tri.a.btagCSVV2 > 0.5) | (tri.b.btagCSVV2 > 0.5) | (tri.c.btagCSVV2 > 0.5)
    trijet_pt = ak.where(has_b, np.hypot(px, py), -1)
    m_bjj = ak.to_numpy(ak.fill_none(ak.flatten(mass[ak.argmax(trijet_pt, axis=1, keepdims=True)]), -1.0))
    assert len(m_bjj) > 100
    assert 150 < np.median(m_bjj) < 200
    counts, edges = np.histogram(m_bjj, bins=25, range=(50, 550))  # the AGC binning
    assert 150 <= edges[np.argmax(counts)] < 200
    assert np.mean((m_bjj > 140) & (m_bjj < 210)) > 0.4


def test_ttbar_variations_are_modest(gen):
    """Alternative ttbar samples move the >= 4 jet acceptance and jet multiplicity by per cents only."""
    def stats(variation):
        a = load_events(gen, "ttbar", variation)
        _, _, jets = _agc_selection(a)
        return float(ak.mean(ak.num(jets) >= 4)), float(ak.mean(a.nJet))

    ref = stats("nominal")
    var = {v: stats(v) for v in ("scaleup", "scaledown", "ME_var", "PS_var")}
    for v, (ge4, njet) in var.items():
        assert abs(ge4 / ref[0] - 1) < 0.12, v
        assert abs(njet / ref[1] - 1) < 0.08, v
    assert var["scaleup"][1] > var["scaledown"][1]  # more radiation


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path, events=3, progress=False)
    with pytest.raises(ValueError):
        generate(tmp_path, events=1000, files_per_sample=0, progress=False)
    fs = generate(tmp_path / "one", events=1000, files_per_sample=1, progress=False)
    assert all(len(v["files"]) == 1 for vs in json.loads(fs.read_text()).values() for v in vs.values())


def test_wjets_skim_keeps_exactly_the_events_that_pass_it():
    """The skim drops events, never changes one: a skimmed chunk is the unskimmed chunk, filtered."""
    full = synthetic._make_chunk(4, "wjets", "nominal", 0, 0, 1, 20_000, skim=False)
    kept = synthetic._make_chunk(4, "wjets", "nominal", 0, 0, 1, 20_000)
    jet, el, mu = full["Jet"], full["Electron"], full["Muon"]
    n_jets = ak.sum((abs(jet.eta) < 2.4) & (jet.jetId == 6), axis=1)
    n_lep = ak.sum((el.pt >= 25) & (abs(el.eta) < 2.5), axis=1) + ak.sum((mu.pt >= 25) & (abs(mu.eta) < 2.4), axis=1)
    mask = ak.to_numpy((n_jets >= 4) & (n_lep >= 1))
    assert 0.02 < mask.mean() < 0.08
    assert set(kept) == set(full)
    for k in full:
        assert ak.array_equal(kept[k], full[k][mask]), k
    # an event the AGC selection takes at the loosest bounds is never skimmed away
    loose_jets = (jet.pt > 20) & (abs(jet.eta) < 2.4) & (jet.jetId == 6)
    loose = ak.to_numpy((ak.sum(loose_jets, axis=1) >= 4)
                        & (ak.sum((el.pt > 25) & (abs(el.eta) < 2.1), axis=1)
                           + ak.sum((mu.pt > 25) & (abs(mu.eta) < 2.1), axis=1) >= 1))
    assert loose.sum() > 20 and np.all(mask[loose])


def test_default_config_stays_inside_the_wjets_skim():
    """Lowering a bound below the skim (e.g. lepton_pt_min < 25) would silently lose W+jets events."""
    from jacana.stages.spec import load_spec

    spec = load_spec()
    skim = synthetic.SKIMS["wjets"]
    bounds = {name: p["bounds"] for name, p in spec.raw["parameters"].items()}
    assert bounds["lepton_pt_min"][0] >= skim.lepton_pt_min
    assert bounds["jet_eta_max"][1] <= skim.jet_eta_max
    assert spec.cuts["jet_id_value"] == skim.jet_id and spec.cuts["min_jets"] >= skim.min_jets
    assert spec.cuts["n_leptons"] >= skim.min_leptons
    assert spec.cuts["electron_eta_max"] <= 2.5 and spec.cuts["muon_eta_max"] <= 2.4


def test_a_config_looser_than_the_skim_is_named(gen, tmp_path):
    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    fileset = load_fileset(gen)
    assert synthetic.skim_conflicts(load_spec(), fileset) == []
    loose = load_spec(overrides={"parameters.lepton_pt_min.bounds": [20.0, 100.0], "cuts.min_jets": 3})
    lines = synthetic.skim_conflicts(loose, fileset)
    assert len(lines) == 2 and "lepton_pt_min can go down to 20 GeV" in lines[0] and "25 GeV" in lines[0]
    assert "min_jets is 3" in lines[1] and "wjets" in lines[1]
    # the train/held-out halves of a split fileset point at the same folder
    assert synthetic.skim_conflicts(loose, fileset.split_alternate()[1]) == lines
    # samples whose generator.json predates the recorded lepton |eta| limits (same limits, then literals)
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((gen.parent / "generator.json").read_text())
    for skim in meta["skims"].values():
        skim.pop("electron_eta_max"), skim.pop("muon_eta_max")
    (old / "generator.json").write_text(json.dumps(meta))
    moved = load_fileset(gen).entries
    old_fileset = type(fileset)({s: {v: ((dataclasses.replace(files[0], path=str(old / "x.root")),), n)
                                     for v, (files, n) in by_var.items()} for s, by_var in moved.items()})
    assert synthetic.skim_conflicts(loose, old_fileset) == [line.replace(str(gen.parent), str(old)) for line in lines]
    # a fileset elsewhere (no generator.json beside its files) is not judged
    other = tmp_path / "fileset.json"
    other.write_text(json.dumps({"ttbar": {"nominal": {"files": [{"path": str(tmp_path / "x.root"), "nevts": 1}]}}}))
    assert synthetic.skim_conflicts(loose, load_fileset(other)) == []
