"""The soft analysis of a general definition (:mod:`.definition`) on one block of dense events.

For each kinematic variation (one compiled body, looped over the variation axis):

1. per object set, the selection weight ``w = prod(soft cuts on pT) x prod(other soft cuts) x mask``
   and the tag probability ``q`` (:func:`~.selection.soft.soft_step`: exact steps at zero temperature);
2. per region, the probability of its count requirements: per object set the probability that the
   exact joint distribution of (selected, selected-and-tagged) counts is in a state the requirements
   allow (:func:`~.selection.multiplicity.count_probabilities`), multiplied over object sets;
3. the observables (:mod:`.observables.library`), binned by the relaxed histograms (kernel width:
   :func:`bandwidth_unit`, the same fraction of a bin in every region).

Weight variations (:mod:`.systematics`) reweight the nominal variation. The AGC ttbar analysis written
in this form gives the AGC-specific program's yields (``tests/test_definition.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jacana.stages.definition import Definition, thaw
from jacana.stages.histograms.relaxed import fill_variations
from jacana.stages.observables.kinematics import LOG_ZERO
from jacana.stages.observables.library import compute
from jacana.stages.observables.objects import ObservableContext, Objects
from jacana.stages.selection.multiplicity import count_probabilities, state_keys
from jacana.stages.selection.soft import log_soft_steps, soft_step
from jacana.stages.systematics import SYSTEMATICS


#: The relaxation's ``bandwidth`` is given for bins of this width (the AGC's 40 GeV): a region's kernel
#: width is ``bandwidth x (its mean bin width / REFERENCE_BIN_WIDTH)``, the same fraction of a bin in
#: any observable's units (GeV, |eta|, a network's (0, 1)).
REFERENCE_BIN_WIDTH = 40.0


def bandwidth_unit(region) -> float:
    """Kernel width per unit of the ``bandwidth`` relaxation in ``region``'s observable units."""
    return (region.edges[-1] - region.edges[0]) / (len(region.edges) - 1) / REFERENCE_BIN_WIDTH


def _cut(cut, values, p, r):
    x = jnp.abs(values) if cut.abs else values
    return soft_step(x, p[cut.param], r[cut.param]) if cut.above else soft_step(p[cut.param], x, r[cut.param])


def _log_cut(cut, values, p, r):
    """``(log w, log(1 - w))`` of :func:`_cut` from its logit (:func:`~.selection.soft.log_soft_steps`)."""
    x = jnp.abs(values) if cut.abs else values
    a, b = (x, p[cut.param]) if cut.above else (p[cut.param], x)
    return log_soft_steps(a, b, r[cut.param], LOG_ZERO)


def _caps(definition: Definition) -> dict:
    """Per object set: (count cap, tag cap) that decide every requirement on it (0: none)."""
    caps = {}
    for reg in definition.regions:
        for q in reg.require:
            n, t = caps.get(q.target, (0, 0))
            caps[q.target] = (n, max(t, q.cap)) if q.tagged else (max(n, q.cap), t)
    return {k: (max(n, t, 1), t) for k, (n, t) in caps.items()}


def _requirement_probabilities(objs, caps: dict, definition: Definition) -> dict:
    """{region: P(all its count requirements)} (None: none), the object sets independent: per set one
    :func:`count_probabilities` over the states each region's requirements on it allow."""
    per_set = {}
    for name, (n_cap, t_cap) in caps.items():
        tagged = t_cap > 0 and objs[name].q is not None
        keys = state_keys(n_cap, t_cap if tagged else 0)
        regions = [reg for reg in definition.regions if any(q.target == name for q in reg.require)]
        allows = lambda reg, n, t: all(q.passes(t if q.tagged else n, t_cap if q.tagged else n_cap)  # noqa: E731
                                       for q in reg.require if q.target == name)
        accept = [tuple((n, t) for n, t in keys if allows(reg, n, t)) for reg in regions]
        probs = count_probabilities(objs[name].w, objs[name].q if tagged else None, n_cap, t_cap, accept)
        per_set.update({(reg.name, name): probs[i] for i, reg in enumerate(regions)})
    out = {}
    for reg in definition.regions:
        prob = None
        for o in definition.objects:
            if (reg.name, o.name) in per_set:
                prob = per_set[reg.name, o.name] if prob is None else prob * per_set[reg.name, o.name]
        out[reg.name] = prob
    return out


def block_yields(p, r, edges, extra, b, definition: Definition):
    """Histogram contributions of one block of dense events: {region: (sumw [V, bins], sumw2 [V, bins])}."""
    values, sel, factors = _event_terms(p, r, extra, b, definition)
    binning = {reg.name: (edges[reg.name], r["bandwidth"] * bandwidth_unit(reg)) for reg in definition.regions}
    return fill_variations(values, sel, b.weight, factors, binning, definition.flow, definition.kernel)


def block_events(p, r, extra, b, definition: Definition):
    """Per-event terms of one block (the hard mode's input): ``(values, selection, factors)`` with
    ``values[region]`` [V, B] the region's observable and ``selection[region]`` [V, B] its selection
    weight under each kinematic variation, and ``factors`` [W, B] the weight variations' factors (on
    the nominal variation). At the hard limit every selection weight is exactly 0 or 1."""
    values, sel, factors = _event_terms(p, r, extra, b, definition)
    return values, sel, (jnp.stack(factors) if factors else jnp.zeros((0,) + b.weight.shape, b.weight.dtype))


def _event_terms(p, r, extra, b, definition: Definition):
    """(per-region observable values [V, B]; per-region selection weights [V, B]; weight-variation
    factors, a list of [B])."""
    caps = _caps(definition)
    obs_defs = {name: (kind, thaw(opts) if opts else {}) for name, kind, opts in definition.observables}
    needed = list(dict.fromkeys([reg.observable for reg in definition.regions]
                                + [c.observable for reg in definition.regions for c in reg.cuts]))

    # float32: the objects also carry their log weights from the cuts' logits (m_bjj's choice at narrow
    # temperatures, where the weights underflow; as the AGC program does); float64 keeps log(weight)
    narrow = jnp.finfo(b.weight.dtype).bits < 64
    static_w, static_log_w, q_tag, log_not_q, fields = {}, {}, {}, {}, {}
    for o in definition.objects:
        d = b.objects[o.name]
        fields[o.name] = {k: v for k, v in d.items() if k not in ("pt", "fixed_pass")}
        w = d["mask"].astype(d["pt"].dtype)
        log_w = jnp.where(d["mask"], 0.0, LOG_ZERO).astype(w.dtype) if narrow else None
        for cut in o.cuts:
            if cut.field != "pt":
                w = _cut(cut, d[cut.field], p, r) * w
                log_w = log_w + _log_cut(cut, d[cut.field], p, r)[0] if narrow else None
        static_w[o.name], static_log_w[o.name] = w, log_w
        q_tag[o.name] = _cut(o.tag, d[o.tag.field], p, r) if o.tag is not None and o.tag.field != "pt" else None
        log_not_q[o.name] = (_log_cut(o.tag, d[o.tag.field], p, r)[1] if narrow and q_tag[o.name] is not None
                             else None)

    # the sets whose pT varies are looped over the variation axis (their pT and, with fixed pT cuts,
    # which objects pass them); the others keep their nominal pT
    xs = {}
    for o in definition.objects:
        slots = definition.set_variations(o.name, b.kinematic)
        if len(slots) > 1:
            idx = [slots.index(v) if v in slots else 0 for v in b.kinematic]
            for key in ("pt", "fixed_pass"):
                if key in b.objects[o.name]:
                    a = b.objects[o.name][key]
                    xs.setdefault(o.name, {})[key] = jnp.moveaxis(a if idx == list(range(a.shape[1])) else a[:, idx, :], 1, 0)
    if not xs:
        xs[definition.bucket] = {"pt": jnp.moveaxis(b.objects[definition.bucket]["pt"][:, :1, :], 1, 0)}

    def objects_at(per_set):
        objs, p_sel = {}, {}
        for o in definition.objects:
            pt = per_set[o.name]["pt"] if o.name in per_set else b.objects[o.name]["pt"][:, 0, :]
            w, log_w = None, static_log_w[o.name]
            for cut in o.cuts:
                if cut.field == "pt":
                    c = _cut(cut, pt, p, r)
                    w = c if w is None else w * c
                    log_w = log_w + _log_cut(cut, pt, p, r)[0] if narrow else None
            w = static_w[o.name] if w is None else w * static_w[o.name]
            if o.name in per_set and "fixed_pass" in per_set[o.name]:
                w = w * per_set[o.name]["fixed_pass"].astype(w.dtype)
                log_w = jnp.where(per_set[o.name]["fixed_pass"], log_w, LOG_ZERO) if narrow else None
            q = q_tag[o.name] if not (o.tag is not None and o.tag.field == "pt") else _cut(o.tag, pt, p, r)
            log_q = log_not_q[o.name]
            if narrow and o.tag is not None and o.tag.field == "pt":
                log_q = _log_cut(o.tag, pt, p, r)[1]
            logs = (jnp.maximum(log_w, LOG_ZERO), log_q) if narrow and log_q is not None else None
            objs[o.name] = Objects({**fields[o.name], "pt": pt}, w=w, q=q, log_inputs=logs)
            p_sel[o.name] = w
        return objs, p_sel

    def per_kinematic(pts):
        objs, p_sel = objects_at(pts)
        ctx = ObservableContext(objs, b.event, r, extra, {})
        values = compute(needed, obs_defs, ctx)
        values_of = {reg.name: values[reg.observable] for reg in definition.regions}
        probs = _requirement_probabilities(objs, caps, definition)
        sel = {}
        for reg in definition.regions:
            prob = probs[reg.name]
            for cut in reg.cuts:  # event-level cuts on observables
                x = values[cut.observable]
                theta, tau = (p[cut.param], r[cut.param]) if cut.param else (jnp.asarray(cut.value, x.dtype), 0.0)
                c = soft_step(x, theta, tau) if cut.above else soft_step(theta, x, tau)
                prob = c if prob is None else prob * c
            sel[reg.name] = jnp.ones_like(b.weight) if prob is None else prob
        return values_of, sel, p_sel

    values, sel, p_sel = jax.lax.map(per_kinematic, xs)  # [V, B, ...]
    factors = []
    if b.weight_variations and definition.weight_systematics:
        nominal = {}
        for o in definition.objects:
            pt = xs[o.name]["pt"][0] if o.name in xs else b.objects[o.name]["pt"][:, 0, :]
            q = q_tag[o.name] if not (o.tag is not None and o.tag.field == "pt") else _cut(o.tag, pt, p, r)
            nominal[o.name] = Objects({**fields[o.name], "pt": pt}, w=p_sel[o.name][0], q=q)
        for key, kind, opts in definition.weight_systematics:
            for up, down in SYSTEMATICS[kind].factors(thaw(opts), nominal, b.event):
                factors += [up] + ([down] if down is not None else [])
    return values, sel, factors
