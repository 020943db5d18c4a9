"""The AGC ttbar analysis in hard mode, written the conventional way (awkward + vector + hist).

This is what an AGC coffea user writes: boolean masks on jagged arrays, ``ak.combinations``
for trijets, ``hist`` histograms with weighted storage. It is deliberately independent of
jacana's differentiable stages, which must reproduce it exactly in their hard limit.

Example (needs a chunk of a fileset)::

    hists = fill_histograms(read_chunk(chunk, spec), spec)   # {region: {variation: hist.Hist}}
"""

from __future__ import annotations

from typing import Mapping

import awkward as ak
import hist
import numpy as np
import vector

from jacana.stages.observables import nn
from jacana.stages.columns import Columns
from jacana.stages.spec import NOMINAL, AnalysisSpec

vector.register_awkward()


def event_weight(columns: Columns, spec: AnalysisSpec) -> np.ndarray:
    """xsec x lumi / N_generated, times the sign of genWeight where the config asks for it."""
    chunk = columns.chunk
    norm = spec.samples[chunk.sample]["xsec_pb"] * spec.luminosity_pb / chunk.nevts_total
    w = np.full(len(columns), norm, dtype=np.float64)
    if spec.use_genweight_sign:
        w *= np.sign(ak.to_numpy(columns["gen_weight"]).astype(np.float64))
    return w


def _selection(columns: Columns, spec: AnalysisSpec, jet_pt: ak.Array):
    p, c = spec.param_values(), spec.cuts
    electrons = (
        (columns["electron_pt"] > p["lepton_pt_min"])
        & (abs(columns["electron_eta"]) < c["electron_eta_max"])
        & (columns["electron_id"] == c["electron_id_value"])
        & (columns["electron_sip3d"] < c["electron_sip3d_max"])
    )
    muons = (
        (columns["muon_pt"] > p["lepton_pt_min"])
        & (abs(columns["muon_eta"]) < c["muon_eta_max"])
        & (columns["muon_id"] != 0)
        & (columns["muon_sip3d"] < c["muon_sip3d_max"])
        & (columns["muon_iso"] < c["muon_iso_max"])
    )
    jets = (
        (jet_pt > p["jet_pt_min"])
        & (abs(columns["jet_eta"]) < p["jet_eta_max"])
        & (columns["jet_id"] == c["jet_id_value"])
    )
    n_leptons = ak.sum(electrons, axis=1) + ak.sum(muons, axis=1)
    n_jets = ak.sum(jets, axis=1)
    base = (n_leptons == c["n_leptons"]) & (n_jets >= c["min_jets"])
    lepton_pt = ak.sum(columns["electron_pt"][electrons], axis=1) + ak.sum(columns["muon_pt"][muons], axis=1)
    return base, jets, lepton_pt


def _observables(columns: Columns, spec: AnalysisSpec, jet_pt: ak.Array, jets_mask: ak.Array, btag_min: float):
    sel = ak.zip(
        {
            "pt": jet_pt[jets_mask],
            "eta": columns["jet_eta"][jets_mask],
            "phi": columns["jet_phi"][jets_mask],
            "mass": columns["jet_mass"][jets_mask],
            "btag": columns["jet_btag"][jets_mask],
        },
        with_name="Momentum4D",
    )
    n_btag = ak.sum(sel.btag > btag_min, axis=1)
    ht = ak.sum(sel.pt, axis=1)
    trijet = ak.combinations(sel, 3, fields=["j1", "j2", "j3"])
    p4 = trijet.j1 + trijet.j2 + trijet.j3
    has_b = (trijet.j1.btag > btag_min) | (trijet.j2.btag > btag_min) | (trijet.j3.btag > btag_min)
    p4 = p4[has_b]
    best = ak.argmax(p4.pt, axis=1, keepdims=True)
    m_bjj = ak.fill_none(ak.firsts(p4[best].mass), np.nan)
    return sel, n_btag, {"ht": ak.to_numpy(ht).astype(np.float64), "m_bjj": ak.to_numpy(m_bjj).astype(np.float64)}


def nn_observable(spec: AnalysisSpec, sel: ak.Array, obs: Mapping, lepton_pt: ak.Array) -> np.ndarray:
    """The trained network (:mod:`.nn`) on the hard features of every event."""
    lead = ak.fill_none(ak.pad_none(sel.pt, 4, axis=1, clip=True), 0.0)
    values = {"ht": obs["ht"], "n_jets": ak.to_numpy(ak.num(sel, axis=1)).astype(np.float64),
              "lepton_pt": ak.to_numpy(lepton_pt).astype(np.float64),
              "m_bjj": np.nan_to_num(obs["m_bjj"], nan=0.0)}
    for i in range(4):
        values[f"jet{i + 1}_pt"] = ak.to_numpy(lead[:, i]).astype(np.float64)
    return nn.mlp(spec.nn_weights(), nn.stack_features(values), np)


def _region_masks(spec: AnalysisSpec, base: np.ndarray, n_btag: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for name, region in spec.regions.items():
        tag = (n_btag == 1) if region.btag == "exactly_1" else (n_btag >= 2)
        out[name] = base & tag
    return out


def new_histogram(edges: np.ndarray, replicas: int = 0) -> hist.Hist:
    """A weighted histogram of the observable; with ``replicas``, a leading replica axis of that size."""
    axes = [hist.axis.Variable(edges, name="observable")]
    if replicas:
        axes.insert(0, hist.axis.Integer(0, replicas, name="replica", underflow=False, overflow=False))
    return hist.Hist(*axes, storage=hist.storage.Weight())


def fill_histograms(columns: Columns, spec: AnalysisSpec,
                    replicas: np.ndarray | None = None) -> dict[str, dict[str, hist.Hist]]:
    """Hard-mode histograms of one chunk: ``{region: {variation: hist.Hist}}``.

    Nominal files give every kinematic (JES, JER) and weight (b-tag) variation; an
    alternative-sample file (``ME_var``, ``scaleup``, ...) gives only its own nominal,
    stored under the file's variation name.

    ``replicas`` ([R, events] weight multipliers, e.g. :func:`~jacana.stages.columns.bootstrap_multipliers`):
    every histogram gets a leading replica axis; replica r holds each event as many times as row r says
    (so ``sumw2`` is that of a sample with those copies; a row of ones gives exactly the histogram
    without replicas).
    """
    chunk = columns.chunk
    if replicas is not None and (replicas.ndim != 2 or replicas.shape[1] != len(columns)):
        raise ValueError(f"{chunk.path}: replicas must be [R, {len(columns)}] (one row per replica, one column per"
                         f" event of entries {chunk.entry_start}-{chunk.entry_stop}), got {replicas.shape}")
    weight = event_weight(columns, spec)
    btag_min = spec.param_values()["btag_min"]
    out: dict[str, dict[str, hist.Hist]] = {r: {} for r in spec.regions}
    kinematic = spec.kinematic_variations() if chunk.variation == NOMINAL else [NOMINAL]
    factors = {NOMINAL: 1.0}
    for s in spec.systematics:
        if s.kind == "jet_pt_scale":
            factors[s.options["variation"]] = float(s.options["factor"])
        elif s.kind == "jet_pt_smear":
            factors[s.options["variation"]] = columns.jer_factors()
    for kin in kinematic:
        jet_pt = columns["jet_pt"] * factors[kin]
        base, jets_mask, lepton_pt = _selection(columns, spec, jet_pt)
        sel, n_btag, obs = _observables(columns, spec, jet_pt, jets_mask, btag_min)
        if spec.uses_nn():
            obs["nn"] = nn_observable(spec, sel, obs, lepton_pt)
        masks = _region_masks(spec, ak.to_numpy(base), ak.to_numpy(n_btag))
        key = kin if chunk.variation == NOMINAL else chunk.variation
        weights = {key: weight}
        if kin == NOMINAL and chunk.variation == NOMINAL:
            for s in spec.systematics_of("btag_weight"):
                lead = ak.pad_none(sel.pt, int(s.options["n_jets"]), axis=1)
                for i in range(int(s.options["n_jets"])):
                    pt_i = ak.to_numpy(ak.fill_none(lead[:, i], 0.0)).astype(np.float64)
                    shift = float(s.options["rate"]) * pt_i / float(s.options["pt_ref"])
                    weights[f"btag_var_{i}_up"] = weight * (1.0 + shift)
                    weights[f"btag_var_{i}_down"] = weight * (1.0 - shift)
        for name, region in spec.regions.items():
            m = masks[name]
            out[name].update(fill_selected(region.edges, obs[region.observable][m], {v: w[m] for v, w in weights.items()},
                                           None if replicas is None else replicas[:, m]))
    return out


def fill_selected(edges, x: np.ndarray, weights: Mapping[str, np.ndarray],
                  replicas: np.ndarray | None = None) -> dict[str, hist.Hist]:
    """One weighted histogram per entry of ``weights`` ({variation: [n]}) of the selected events'
    observable ``x`` [n], filled in event order; with ``replicas`` ([R, n] multipliers of those events)
    a leading replica axis where replica r holds each event as many times as row r says."""
    if replicas is None:
        out = {}
        for var, w in weights.items():
            h = new_histogram(edges)
            h.fill(observable=x, weight=w)
            out[var] = h
        return out
    # an event drawn k times is k entries of weight w (sumw2 gains k w^2, not (k w)^2);
    # replica-major, so each replica's bins add up in event order as without replicas
    k = replicas.astype(np.intp)
    copies = np.repeat(np.tile(np.arange(len(x)), len(k)), k.ravel())
    replica_of, x_copies = np.repeat(np.arange(len(k)), k.sum(axis=1)), x[copies]
    out = {}
    for var, w in weights.items():
        h = new_histogram(edges, len(k))
        h.fill(replica=replica_of, observable=x_copies, weight=w[copies])
        out[var] = h
    return out


def add_histograms(total: dict, part: Mapping) -> dict:
    """Accumulate ``{region: {variation: hist}}`` chunk results (in place on ``total``)."""
    for region, by_var in part.items():
        for var, h in by_var.items():
            slot = total.setdefault(region, {})
            slot[var] = slot[var] + h if var in slot else h.copy()
    return total


def to_arrays(h: hist.Hist) -> dict[str, np.ndarray]:
    """``{"edges", "sumw", "sumw2"}`` of a weighted histogram (flow bins dropped; ``sumw`` and
    ``sumw2`` are [replicas, bins] where the histogram has a replica axis)."""
    view = h.view(flow=False)
    return {"edges": np.asarray(h.axes["observable"].edges, dtype=np.float64),
            "sumw": np.asarray(view.value, dtype=np.float64),
            "sumw2": np.asarray(view.variance, dtype=np.float64)}
