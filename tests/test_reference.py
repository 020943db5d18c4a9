"""Hard mode equals an independent plain-awkward computation, bin by bin, on the real NanoAOD file."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest

from jacana.stages.columns import read_chunk
from jacana.stages.fileset import Chunk
from jacana.stages.reference import fill_histograms, to_arrays
from jacana.stages.spec import load_spec

# The real file has about one event passing the AGC selection (and no muon passing
# Muon_tightId above 25 GeV): loosen the cuts so that 3 events pass; a b-tag threshold of
# 0.5 puts them all in 4j1b, one of 0.2 all in 4j2b.
LOOSE = ["jet_pt_min=20", "lepton_pt_min=25", "cuts.min_jets=3"]
BTAG_POINTS = (0.2, 0.5)


def _plain_awkward(arrays, spec, jet_pt_factor=1.0):
    """The AGC selection written from scratch: explicit kinematics, no vector, no hist."""
    p, c = spec.param_values(), spec.cuts
    e = ((arrays.Electron_pt > p["lepton_pt_min"]) & (np.abs(arrays.Electron_eta) < c["electron_eta_max"])
         & (arrays.Electron_cutBased == c["electron_id_value"]) & (arrays.Electron_sip3d < c["electron_sip3d_max"]))
    m = ((arrays.Muon_pt > p["lepton_pt_min"]) & (np.abs(arrays.Muon_eta) < c["muon_eta_max"]) & arrays.Muon_tightId
         & (arrays.Muon_sip3d < c["muon_sip3d_max"]) & (arrays.Muon_pfRelIso04_all < c["muon_iso_max"]))
    pt = arrays.Jet_pt * jet_pt_factor
    j = (pt > p["jet_pt_min"]) & (np.abs(arrays.Jet_eta) < p["jet_eta_max"]) & (arrays.Jet_jetId == c["jet_id_value"])
    nlep = ak.sum(e, axis=1) + ak.sum(m, axis=1)
    base = ak.to_numpy((nlep == c["n_leptons"]) & (ak.sum(j, axis=1) >= c["min_jets"]))
    jpt, jeta, jphi, jm, jb = pt[j], arrays.Jet_eta[j], arrays.Jet_phi[j], arrays.Jet_mass[j], arrays.Jet_btagCSVV2[j]
    nb = ak.to_numpy(ak.sum(jb > p["btag_min"], axis=1))
    ht = ak.to_numpy(ak.sum(jpt, axis=1))
    mbjj = np.full(len(base), np.nan)
    for i in np.flatnonzero(base):  # per event, by hand: the point is independence, not speed
        v = np.array([jpt[i], jeta[i], jphi[i], jm[i], jb[i]], dtype=np.float64).T
        best_pt, best_m = -1.0, np.nan
        n = len(v)
        for a in range(n):
            for b in range(a + 1, n):
                for d in range(b + 1, n):
                    tri = v[[a, b, d]]
                    if not np.any(tri[:, 4] > p["btag_min"]):
                        continue
                    px = np.sum(tri[:, 0] * np.cos(tri[:, 2]))
                    py = np.sum(tri[:, 0] * np.sin(tri[:, 2]))
                    pz = np.sum(tri[:, 0] * np.sinh(tri[:, 1]))
                    en = np.sum(np.sqrt((tri[:, 0] * np.cosh(tri[:, 1])) ** 2 + tri[:, 3] ** 2))
                    tpt = np.hypot(px, py)
                    if tpt > best_pt:
                        best_pt, best_m = tpt, np.sqrt(max(en**2 - px**2 - py**2 - pz**2, 0.0))
        mbjj[i] = best_m
    return base, nb, ht, mbjj, jpt


def _hist(x, w, edges):
    idx = np.searchsorted(edges, x, side="right") - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    return (np.bincount(idx[ok], weights=w[ok], minlength=len(edges) - 1),
            np.bincount(idx[ok], weights=w[ok] ** 2, minlength=len(edges) - 1))


@pytest.fixture(scope="module", params=BTAG_POINTS, ids=lambda b: f"btag{b}")
def real(real_nanoaod, request):
    import uproot

    spec = load_spec(overrides=LOOSE + [f"btag_min={request.param}"])
    arrays = uproot.open(real_nanoaod)["Events"].arrays(spec.needed_branches())
    chunk = Chunk("ttbar", "nominal", real_nanoaod, 0, 200, 200)
    return spec, arrays, read_chunk(chunk, spec)


def test_loose_cuts_populate_a_region(real):
    spec, arrays, _ = real
    base, nb, ht, mbjj, _ = _plain_awkward(arrays, spec)
    in_1b = base & (nb == 1) & (ht >= 110) & (ht < 550)
    in_2b = base & (nb >= 2) & (mbjj >= 110) & (mbjj < 550)
    assert np.sum(in_1b) + np.sum(in_2b) >= 2


@pytest.mark.parametrize("variation", ["nominal", "pt_scale_up", "pt_res_up", "btag_var_0_up", "btag_var_3_down"])
def test_hard_mode_matches_plain_awkward_bin_by_bin(real, variation):
    spec, arrays, columns = real
    hists = fill_histograms(columns, spec)
    factor = {"nominal": 1.0, "pt_scale_up": 1.03, "pt_res_up": columns.jer_factors()}.get(variation, 1.0)
    base, nb, ht, mbjj, jpt = _plain_awkward(arrays, spec, factor)
    norm = spec.samples["ttbar"]["xsec_pb"] * spec.luminosity_pb / 200
    w = norm * np.sign(ak.to_numpy(arrays.genWeight).astype(np.float64))
    if variation.startswith("btag_var"):
        i, sign = int(variation.split("_")[2]), (1.0 if variation.endswith("up") else -1.0)
        pt_i = ak.to_numpy(ak.fill_none(ak.pad_none(jpt, 4, axis=1)[:, i], 0.0)).astype(np.float64)
        w = w * (1.0 + sign * 0.075 * pt_i / 50.0)
    for region, obs, sel in (("4j1b", ht, base & (nb == 1)), ("4j2b", mbjj, base & (nb >= 2))):
        edges = spec.regions[region].edges
        sumw, sumw2 = _hist(obs[sel], w[sel], edges)
        got = to_arrays(hists[region][variation])
        np.testing.assert_allclose(got["sumw"], sumw, rtol=1e-12, atol=0)
        np.testing.assert_allclose(got["sumw2"], sumw2, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(got["edges"], edges)


def test_agc_cuts_select_about_one_event(real_nanoaod):
    """The AGC.md fact: about one event of the 200 passes the full selection."""
    spec = load_spec()
    columns = read_chunk(Chunk("ttbar", "nominal", real_nanoaod, 0, 200, 200), spec)
    hists = fill_histograms(columns, spec)
    norm = spec.samples["ttbar"]["xsec_pb"] * spec.luminosity_pb / 200
    n = sum(to_arrays(hists[r]["nominal"])["sumw2"].sum() for r in spec.regions) / norm**2
    assert 0 <= round(n) <= 3
