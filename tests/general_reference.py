"""A plain-awkward hard-mode implementation of jacana's general analysis config form (for the tests).

Written from the config's documented semantics (``stages/definition.py``'s docstring, issue #21),
without jacana's engine: boolean masks on jagged arrays, ``ak.combinations`` for trijets, ``hist``
histograms with weighted storage, the way a coffea user writes an analysis. The tests compare the
engine at its hard limit (:func:`jacana.stages.analysis.hard_mode_histograms`) against it.

From jacana it takes only the inputs (the :class:`~jacana.stages.columns.Columns` of a chunk), the
random-number definition of the pT smearing (:func:`~jacana.stages.columns.jer_factors`) and the
network formula of the ``nn`` observable (:func:`~jacana.stages.observables.nn.mlp`).

Semantics (the spec the engine is held to):

* an object set: per source collection (config order) the objects passing every fixed cut, the
  sources concatenated per event, file order kept; then the tunable cuts (``above: p``: value > p,
  ``below: p``: value < p, on ``|value|`` with ``abs``) and the tag (same rule on the tag field);
* counts: ``equals``, ``at_least``, ``at_most`` (both may be given), ``range``, ``veto`` on the
  number of selected (``set``) or selected-and-tagged (``set.tag``) objects; ``{observable: x,
  above: p}`` is x > p (``below``: x < p; ``p`` a parameter or a number);
* observables: see :func:`observable`; an object that is not there (fewer selected than its index)
  has every component 0 (a zero four-vector, eta = phi = 0);
* the event weight ``xsec_pb * luminosity_pb / nevts_total * sign(genWeight)``; histogram bins
  ``[lo, hi)``, under- and overflow dropped;
* kinematic systematics change the pT of one object set's sources (``pt_scale``: ``pt * factor`` in the
  file's dtype; ``pt_smear``: ``pt * jer_factors(...)`` over all objects of the collection), and every
  cut on pT sees the varied pT, a fixed one too (the engine does not yet: ``test_general_parity.py::
  test_a_fixed_pt_cut_sees_the_varied_pt``); weight systematics reweight the nominal selection
  (``leading_object_weight``: ``w (1 +/- rate pT_i / pt_ref)``, pT_i of the i-th selected object, 0 if fewer).

Comparisons of values with thresholds are done in float64 on the values as stored (a float32 value
converted exactly), i.e. as real numbers.
"""

from __future__ import annotations

from typing import Mapping

import awkward as ak
import hist
import numpy as np

from jacana.stages.columns import jer_factors
from jacana.stages.observables import nn as nn_formula

NOMINAL = "nominal"
FIXED_OPS = {"above": np.greater, "below": np.less, "at_least": np.greater_equal, "at_most": np.less_equal,
             "equals": np.equal, "not_equal": np.not_equal}
KIND_ALIASES = {"jet_pt_scale": "pt_scale", "jet_pt_smear": "pt_smear", "btag_weight": "leading_object_weight"}


def kind_of(entry: Mapping) -> str:
    return KIND_ALIASES.get(entry["kind"], entry["kind"])


def f64(a):
    """A jagged or flat array as float64 (float32 values convert exactly)."""
    return ak.values_astype(a, np.float64)


def to_np(a) -> np.ndarray:
    return np.asarray(ak.to_numpy(a), dtype=np.float64)


def param_values(raw: Mapping, params: Mapping | None = None) -> dict:
    out = {k: float(p["value"]) for k, p in raw["parameters"].items()}
    out.update({k: float(v) for k, v in (params or {}).items() if k in out})
    return out


def region_edges(region: Mapping) -> np.ndarray:
    e = region["edges"]
    if isinstance(e, Mapping):
        return np.linspace(e["low"], e["high"], e["bins"] + 1)
    return np.asarray(e, dtype=np.float64)


def event_weight(columns, raw: Mapping) -> np.ndarray:
    chunk = columns.chunk
    norm = float(raw["samples"][chunk.sample]["xsec_pb"]) * float(raw["luminosity_pb"]) / chunk.nevts_total
    w = np.full(len(columns), norm, dtype=np.float64)
    if raw.get("use_genweight_sign", True):
        w = w * np.sign(to_np(columns["gen_weight"]))
    return w


# -- object sets ------------------------------------------------------------------------------------
def kinematic_variations(raw: Mapping) -> list[tuple[str, str, Mapping]]:
    """(variation name, object set, systematic entry) of every kinematic systematic, config order."""
    return [(s["variation"], s.get("object", "jet"), s) for s in raw["systematics"].values()
            if kind_of(s) in ("pt_scale", "pt_smear")]


def varied_pt(columns, coll: str, syst: Mapping | None):
    pt = columns[f"{coll}_pt"]
    if syst is None:
        return pt
    if kind_of(syst) == "pt_scale":
        return pt * float(syst["factor"])  # float32 * python float: float32 (numpy's rule)
    counts = ak.to_numpy(ak.num(pt, axis=1))
    chunk = columns.chunk
    factors = jer_factors(chunk.path, chunk.entry_start, counts, float(syst["sigma"]), int(syst["seed"]))
    return pt * ak.unflatten(factors, counts)


def _passes(values, rule: Mapping, threshold: float):
    x = abs(values) if rule.get("abs", False) else values
    return (x > threshold) if "above" in rule else (x < threshold)


def selected_objects(columns, raw: Mapping, name: str, p: Mapping, syst: Mapping | None = None):
    """The selected objects of set ``name``: a jagged record array (fields float64, ``tag`` boolean)."""
    o = raw["objects"][name]
    colls = raw["collections"]
    common = sorted(set.intersection(*(set(colls[c]["fields"]) for c in o["from"])))
    parts = []
    for coll, fixed in o["from"].items():
        pt = f64(varied_pt(columns, coll, syst))
        keep = None
        for cut in fixed:  # a fixed cut on pT sees the varied pT, like every other cut of the variation
            (op,) = [k for k in cut if k in FIXED_OPS]
            x = pt if cut["field"] == "pt" else f64(columns[f"{coll}_{cut['field']}"])
            if cut.get("abs", False):
                x = abs(x)
            m = FIXED_OPS[op](x, float(cut[op]))
            keep = m if keep is None else keep & m
        fields = {f: f64(columns[f"{coll}_{f}"]) for f in common if f != "pt"}
        fields["pt"] = pt
        rec = ak.zip(fields)
        parts.append(rec if keep is None else rec[keep])
    objs = parts[0] if len(parts) == 1 else ak.concatenate(parts, axis=1)
    sel = None
    for cut in o.get("cuts", []):
        m = _passes(objs[cut["field"]], cut, p[cut.get("above", cut.get("below"))])
        sel = m if sel is None else sel & m
    if sel is not None:
        objs = objs[sel]
    if "tag" in o:
        t = o["tag"]
        tag = _passes(objs[t["field"]], t, p[t.get("above", t.get("below"))])
    else:
        tag = ak.zeros_like(objs["pt"], dtype=bool)
    return ak.with_field(objs, tag, "tag")


def pick(objs, select: str = "all"):
    if select == "all":
        return objs
    if select == "tagged":
        return objs[objs.tag]
    if select == "untagged":
        return objs[~objs.tag]
    raise ValueError(select)


def nth(values, index: int) -> np.ndarray:
    """The ``index``-th entry per event (file order), 0 where there are fewer."""
    return to_np(ak.fill_none(ak.pad_none(values, index + 1, axis=1)[:, index], 0.0))


def p4(objs):
    """(px, py, pz, E) per object, jagged."""
    pt, eta, phi, m = objs.pt, objs.eta, objs.phi, objs.mass
    return (pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta),
            np.sqrt(pt * pt * np.cosh(eta) ** 2 + m * m))


def mass_of(px, py, pz, e):
    return np.sqrt(np.maximum(e * e - px * px - py * py - pz * pz, 0.0))


# -- observables ------------------------------------------------------------------------------------
def observable(kind: str, args: Mapping, sets: Mapping, event: Mapping, values: Mapping, nn_weights=None):
    """The hard value of one observable per event (numpy float64)."""
    a = dict(args)
    if kind == "count":
        return to_np(ak.num(pick(sets[a["of"]], a.get("select", "all")), axis=1))
    if kind == "event_field":
        return event[a["field"]]
    if kind == "scalar_sum":
        objs = pick(sets[a["of"]], a.get("select", "all"))
        return to_np(ak.sum(objs[a.get("field", "pt")], axis=1))
    if kind == "vector_sum_pt":
        objs = pick(sets[a["of"]], a.get("select", "all"))
        px, py = (to_np(ak.sum(objs.pt * f(objs.phi), axis=1)) for f in (np.cos, np.sin))
        return np.sqrt(px * px + py * py)
    if kind == "leading":
        objs = pick(sets[a["of"]], a.get("select", "all"))
        v = nth(objs[a.get("field", "pt")], int(a.get("index", 0)))
        return np.abs(v) if a.get("abs", False) else v
    if kind == "invariant_mass":
        if "parts" in a:
            parts = [{"index": 0, "select": "all", **q} for q in a["parts"]]
        else:
            parts = [{"of": a["of"], "index": i, "select": "all"} for i in range(int(a.get("n", 2)))]
        total = np.zeros((4, len(event["__n__"])))
        for q in parts:
            objs = pick(sets[q["of"]], q.get("select", "all"))
            total += np.stack([nth(c, int(q.get("index", 0))) for c in p4(objs)])
        return mass_of(*total)
    if kind == "trijet_mass":
        jets = sets[a.get("of", "jet")]
        c = ak.combinations(ak.zip({**dict(zip(("px", "py", "pz", "e"), p4(jets))), "tag": jets.tag}),
                            3, fields=["j1", "j2", "j3"])  # lexicographic in file order
        px, py, pz, e = (c.j1[k] + c.j2[k] + c.j3[k] for k in ("px", "py", "pz", "e"))
        has_tag = c.j1.tag | c.j2.tag | c.j3.tag
        tpt = np.sqrt(px * px + py * py)[has_tag]
        mass = mass_of(px, py, pz, e)[has_tag]
        best = ak.argmax(tpt, axis=1, keepdims=True)  # the first of the highest-pT trijets
        return to_np(ak.fill_none(ak.firsts(mass[best]), 0.0))  # 0: no trijet with a tag
    if kind == "transverse_mass":
        met = dict(a.get("met") or {"pt": "met_pt", "phi": "met_phi"})
        objs = pick(sets[a["of"]], a.get("select", "all"))
        i = int(a.get("index", 0))
        pt, phi = nth(objs.pt, i), nth(objs.phi, i)
        m_pt, m_phi = event[met["pt"]], event[met["phi"]]
        mt2 = 2.0 * (pt * m_pt - pt * np.cos(phi) * m_pt * np.cos(m_phi) - pt * np.sin(phi) * m_pt * np.sin(m_phi))
        return np.sqrt(np.maximum(mt2, 0.0))
    if kind == "delta_r":
        ends = []
        for q in (a["a"], a["b"]):
            objs = pick(sets[q["of"]], q.get("select", "all"))
            i = int(q.get("index", 0))
            ends.append((nth(objs.eta, i), nth(objs.phi, i)))  # a missing object: eta = phi = 0
        deta = ends[0][0] - ends[1][0]
        dphi = np.mod(ends[0][1] - ends[1][1] + np.pi, 2.0 * np.pi) - np.pi
        return np.sqrt(deta * deta + dphi * dphi)
    if kind == "nn":
        x = np.stack([values[a["features"][f]] for f in nn_formula.FEATURES], axis=-1)
        return nn_formula.mlp(nn_weights, x, np)
    raise NotImplementedError(f"no plain implementation of observable kind {kind!r}")


def _dependencies(kind: str, args: Mapping) -> list[str]:
    return list(args["features"].values()) if kind == "nn" else []


def all_observables(raw: Mapping, sets: Mapping, event: Mapping, nn_weights=None) -> dict:
    values: dict = {}

    def visit(name):
        if name in values:
            return
        o = raw["observables"][name]
        args = {k: v for k, v in o.items() if k not in ("kind", "read")}
        for dep in _dependencies(o["kind"], args):
            visit(dep)
        values[name] = np.asarray(observable(o["kind"], args, sets, event, values, nn_weights), np.float64)

    for name in raw["observables"]:
        visit(name)
    return values


# -- selections -------------------------------------------------------------------------------------
def _requirement_mask(req: Mapping, sets: Mapping, values: Mapping, p: Mapping) -> np.ndarray:
    if "observable" in req:
        x = values[req["observable"]]
        t = req["above"] if "above" in req else req["below"]
        t = p[t] if isinstance(t, str) else float(t)
        return (x > t) if "above" in req else (x < t)
    target, _, sub = req["count"].partition(".")
    objs = sets[target]
    n = to_np(ak.sum(objs.tag, axis=1) if sub == "tag" else ak.num(objs, axis=1))
    if "equals" in req:
        return n == req["equals"]
    if "veto" in req:
        return n == 0
    if "range" in req:
        lo, hi = req["range"]
        return (n >= lo) & (n <= hi)
    m = n >= req.get("at_least", 0)
    if "at_most" in req:
        m = m & (n <= req["at_most"])
    return m


def region_mask(raw: Mapping, region: Mapping, sets: Mapping, values: Mapping, p: Mapping, n: int) -> np.ndarray:
    m = np.ones(n, dtype=bool)
    for req in list(raw.get("selection", [])) + list(region.get("require", [])):
        m &= _requirement_mask(req, sets, values, p)
    return m


def _weight_variations(raw: Mapping, sets: Mapping, event: Mapping, w: np.ndarray) -> dict:
    out = {}
    for s in raw["systematics"].values():
        kind = kind_of(s)
        if kind == "leading_object_weight":
            prefix = s.get("variation", "btag_var")
            objs = sets[s.get("object", "jet")]
            for i in range(int(s.get("n", s.get("n_jets", 0)))):
                shift = float(s["rate"]) * nth(objs.pt, i) / float(s["pt_ref"])
                out[f"{prefix}_{i}_up"] = w * (1.0 + shift)
                out[f"{prefix}_{i}_down"] = w * (1.0 - shift)
        elif kind == "event_weight":
            out[f"{s['variation']}_up"] = w * event[s["up"]]
            if "down" in s:
                out[f"{s['variation']}_down"] = w * event[s["down"]]
    return out


def new_histogram(edges) -> hist.Hist:
    return hist.Hist(hist.axis.Variable(np.asarray(edges, np.float64), name="observable"),
                     storage=hist.storage.Weight())


def hard_histograms(columns, raw: Mapping, params: Mapping | None = None, nn_weights=None,
                    with_values: bool = False):
    """``{region: {variation: hist.Hist}}`` of one chunk, as :func:`~jacana.stages.analysis.hard_mode_histograms`.

    Nominal files give every kinematic and weight variation; an alternative file only its own
    nominal, under the file's variation name. ``params``: parameter values other than the config's.
    ``with_values``: also return ``{variation: (observable values, region masks)}`` (for checks).
    """
    p = param_values(raw, params)
    chunk = columns.chunk
    nominal_file = chunk.variation == NOMINAL
    w = event_weight(columns, raw)
    n = len(w)
    event = {f: to_np(columns[f]) for f in raw.get("event_fields", {})}
    event["__n__"] = np.zeros(n)
    kinematic = [(NOMINAL, None, None)] + (kinematic_variations(raw) if nominal_file else [])
    out: dict = {r: {} for r in raw["regions"]}
    details = {}
    for var, target, syst in kinematic:
        sets = {name: selected_objects(columns, raw, name, p, syst if name == target else None)
                for name in raw["objects"]}
        values = all_observables(raw, sets, event, nn_weights)
        weights = {var if nominal_file else chunk.variation: w}
        if var == NOMINAL and nominal_file:
            weights.update(_weight_variations(raw, sets, event, w))
        masks = {}
        for rname, region in raw["regions"].items():
            m = region_mask(raw, region, sets, values, p, n)
            masks[rname] = m
            x = values[region["observable"]][m]
            for key, wv in weights.items():
                h = new_histogram(region_edges(region))
                h.fill(observable=x, weight=wv[m])
                out[rname][key] = h
        details[var] = (values, masks)
    return (out, details) if with_values else out


def to_arrays(h: hist.Hist) -> dict:
    view = h.view(flow=False)
    return {"edges": np.asarray(h.axes[0].edges, np.float64), "sumw": np.asarray(view.value, np.float64),
            "sumw2": np.asarray(view.variance, np.float64)}


__all__ = ["hard_histograms", "to_arrays", "selected_objects", "observable", "event_weight"]
