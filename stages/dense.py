"""Dense, bucketed events of a general analysis (:mod:`.definition`): the soft analysis's input.

Per object set, the objects of its source collections that pass the fixed cuts, in file order
(sources concatenated per event in config order), as ``[events, objects]`` arrays padded with
``mask = False``. pT carries the kinematic variations that act on the set (``pt`` is
``[events, variations, objects]``), materialised with the conventional arithmetic (``pt * factor``
in the file's dtype), so the hard limit is exact. Events are grouped by the multiplicity of the
definition's bucket set (:func:`~.batch.jet_bucket` sizes), like the AGC's jet buckets; the other
sets take the next power of two of their largest count.

``prefilter`` drops events that no parameter values can select (fewer objects passing the fixed
cuts than a count requirement's minimum): their soft yield is exactly zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import awkward as ak
import jax
import numpy as np

from jacana.stages.shapes import BLOCK_ELEMENTS, MIN_BLOCK, ChunkBatches, block_size_for, jet_bucket, padded_events
from jacana.stages.columns import Columns, flat_counts, jer_factors_at, per_event_count
from jacana.stages.definition import NOMINAL, Definition, ObjectSet
from jacana.stages.reference import event_weight
from jacana.stages.systematics import SYSTEMATICS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseBatch:
    """Dense events of one bucket. ``objects[set][field]`` is [N, K_set] (``pt``: [N, V_set, K_set]),
    ``objects[set]["mask"]`` marks real objects (``fixed_pass`` [N, V_set, K], where present, whether each
    passes the set's fixed pT cuts under each variation); ``event[field]`` [N]; padded events have weight 0."""

    objects: dict
    event: dict
    weight: Any
    event_mask: Any
    kinematic: tuple = dataclasses.field(default=(NOMINAL,), metadata=dict(static=True))
    weight_variations: bool = dataclasses.field(default=True, metadata=dict(static=True))
    block_size: int = dataclasses.field(default=128, metadata=dict(static=True))
    bucket: str = dataclasses.field(default="jet", metadata=dict(static=True))

    @property
    def n_padded(self) -> int:
        return int(self.weight.shape[0])

    @property
    def bucket_width(self) -> int:
        """Objects per event of the bucket set (the grouping key, as ``n_jets`` is for the AGC)."""
        return int(self.objects[self.bucket]["mask"].shape[1])

    @property
    def dtype(self):
        return self.weight.dtype

    def group_key(self) -> tuple:
        return (self.bucket_width, self.kinematic, self.weight_variations)

    def widened(self, path: tuple) -> bool:
        """Whether a field's object axis (its last) may differ between batches of one group: every
        object set's but the bucket set's (its width is the group's key)."""
        return path[0] == "objects" and path[1] != self.bucket


def _smear(columns: Columns, coll: str, flat_index: np.ndarray):
    """The N(1, sigma) factors of the objects at flat indices of collection ``coll`` (counter-based on
    (seed, file, entry, index in the event), like the AGC's JER)."""
    _, counts = flat_counts(columns[f"{coll}_pt"])
    starts = np.cumsum(counts) - counts

    def factors(sigma: float, seed: int) -> np.ndarray:
        event = np.searchsorted(starts + counts, flat_index, side="right")
        return jer_factors_at(columns.chunk.path, columns.chunk.entry_start + event, flat_index - starts[event],
                              sigma, seed)
    return factors


def _varied_pt(columns: Columns, spec, definition: Definition, objset: ObjectSet, coll: str, pt: np.ndarray,
               flat_index: np.ndarray) -> dict[str, np.ndarray]:
    """pT of the objects of one source collection under each kinematic variation acting on the set."""
    out = {NOMINAL: pt}
    if columns.chunk.variation != NOMINAL:
        return out
    target = dict(definition.kinematic_target)
    for s in spec.systematics:
        kind = SYSTEMATICS[s.kind]
        if kind.category != "kinematic":
            continue
        for v in kind.kinematic_variations(s.options):
            if target.get(v) == objset.name:
                out[v] = kind.varied_pt(s.options, pt, _smear(columns, coll, flat_index))
    return out


def make_dense_batches(columns: Columns, spec, dtype=np.float64, prefilter: bool = False,
                       pad: bool = True) -> ChunkBatches:
    """Dense, bucketed batches of one chunk of a general analysis (see the module docstring)."""
    definition: Definition = spec.definition
    n_events = len(columns)
    weight = event_weight(columns, spec)
    nominal_file = columns.chunk.variation == NOMINAL
    kinematic = definition.kinematic if nominal_file else (NOMINAL,)

    # per set and source: flat values of the objects passing the fixed cuts, and per-event counts.
    # A fixed cut on the pT of a set that kinematic variations act on is decided per variation (the
    # varied pT): the objects kept are those passing under any variation, and ``fixed_pass``
    # [N, V_set, K] says under which (the soft program multiplies it into the selection weight).
    varied_sets = {name for _, name in definition.kinematic_target} if nominal_file else set()
    sets: dict[str, list] = {}
    counts: dict[str, np.ndarray] = {}
    for objset in definition.objects:
        parts, total = [], np.zeros(n_events, np.int64)
        for coll, fixed in objset.sources:
            flat = {f: flat_counts(columns[f"{coll}_{f}"]) for f in
                    set(objset.fields) | {c.field for c in fixed}}
            n = flat["pt"][1]
            per_variation = [c for c in fixed if c.field == "pt"] if objset.name in varied_sets else []
            ok = np.ones(len(flat["pt"][0]), dtype=bool)
            for c in fixed:
                if c not in per_variation:
                    ok &= c.mask(flat[c.field][0])
            if per_variation:
                idx = np.flatnonzero(ok)
                varied = _varied_pt(columns, spec, definition, objset, coll, flat["pt"][0][idx], idx)
                ok[idx] = np.logical_or.reduce([_passes(per_variation, pt) for pt in varied.values()])
            parts.append((coll, {f: flat[f][0] for f in objset.fields}, n, ok, per_variation))
            total = total + per_event_count(n, ok)
        sets[objset.name] = parts
        counts[objset.name] = total

    keep = np.ones(n_events, dtype=bool)
    if prefilter:  # a count below every region's minimum can never pass
        for objset in definition.objects:
            need = min(max([q.lo for q in r.require if q.target == objset.name and not q.tagged], default=0)
                       for r in definition.regions)
            keep &= counts[objset.name] >= need
    rows = np.flatnonzero(keep)

    # per set: dense-ready object lists (event index among kept events, slot, values)
    remap = np.full(n_events, -1, np.int64)  # event -> its row among the kept events
    remap[rows] = np.arange(len(rows))
    dense_src: dict[str, dict] = {}
    for objset in definition.objects:
        slot_offset = np.zeros(n_events, np.int64)
        ev_all, slot_all, values = [], [], {f: [] for f in objset.fields}
        pts: dict[str, list] = {}
        passes: dict[str, list] = {}
        has_pass = any(part[4] for part in sets[objset.name])
        for coll, flat, n, ok, per_variation in sets[objset.name]:
            ok = ok & np.repeat(keep, n)
            idx = np.flatnonzero(ok)
            event = np.repeat(np.arange(n_events), n)[idx]
            n_ok = per_event_count(n, ok)
            starts = np.cumsum(n_ok) - n_ok
            slot = np.arange(len(idx)) - np.repeat(starts, n_ok) + slot_offset[event]
            slot_offset = slot_offset + n_ok
            ev_all.append(event)
            slot_all.append(slot)
            for f in objset.fields:
                values[f].append(flat[f][idx])
            for v, pt in _varied_pt(columns, spec, definition, objset, coll, flat["pt"][idx], idx).items():
                pts.setdefault(v, []).append(pt)
                if has_pass:
                    passes.setdefault(v, []).append(_passes(per_variation, pt))
        ev = np.concatenate(ev_all) if ev_all else np.zeros(0, np.int64)
        dense_src[objset.name] = {
            "row": remap[ev], "slot": np.concatenate(slot_all) if slot_all else np.zeros(0, np.int64),
            "values": {f: np.concatenate(v) for f, v in values.items()},
            "pt": {v: np.concatenate(p) for v, p in pts.items()},
            "fixed_pass": {v: np.concatenate(p) for v, p in passes.items()},
            "count": counts[objset.name][rows],
        }

    weight = weight[rows]
    n_kept = len(rows)
    b_counts = dense_src[definition.bucket]["count"]
    sizes = np.array([jet_bucket(int(n)) for n in range(int(b_counts.max(initial=0)) + 1)], dtype=np.int64)
    bucket_of = sizes[b_counts] if n_kept else np.zeros(0, np.int64)
    event_values = {f: ak.to_numpy(columns[f]).astype(np.float64)[rows] for f in definition.event_fields}

    parts, part_rows = [], []
    for k in sorted(set(bucket_of.tolist())):
        members = np.flatnonzero(bucket_of == k)
        part_rows.append(rows[members])
        n = len(members)
        block = block_size_for(k) if definition.combinatorial else _plain_block(k)
        n_pad, block = padded_events(n, block) if pad else (n, block)
        row_in = np.full(n_kept, -1, np.int64)
        row_in[members] = np.arange(n)
        objects = {}
        for objset in definition.objects:
            src = dense_src[objset.name]
            width = k if objset.name == definition.bucket else \
                1 << int(max(src["count"][members].max(initial=0), 2) - 1).bit_length()
            r = row_in[src["row"]]
            sel = (r >= 0) & (src["slot"] < width)
            target = r[sel] * width + src["slot"][sel]
            fields = {}
            for f in objset.fields:
                if f == "pt":
                    continue
                a = np.zeros(n_pad * width, dtype)
                a[target] = src["values"][f][sel]
                fields[f] = a.reshape(n_pad, width)
            set_vars = definition.set_variations(objset.name, kinematic)

            def by_variation(values: dict, kind) -> np.ndarray:  # [n_pad, variations, width]
                out = np.zeros((n_pad, len(set_vars), width), kind)
                for i, v in enumerate(set_vars):
                    col = np.zeros(n_pad * width, kind)
                    col[target] = values[v][sel]
                    out[:, i, :] = col.reshape(n_pad, width)
                return out

            fields["pt"] = by_variation(src["pt"], dtype)
            if src["fixed_pass"]:
                fields["fixed_pass"] = by_variation(src["fixed_pass"], bool)
            mask = np.zeros(n_pad * width, bool)
            mask[target] = True
            fields["mask"] = mask.reshape(n_pad, width)
            if "phi" in fields:
                fields["cos_phi"], fields["sin_phi"] = np.cos(fields["phi"]), np.sin(fields["phi"])
            if "eta" in fields:
                fields["sinh_eta"] = np.sinh(fields["eta"])
            objects[objset.name] = fields
        w = np.zeros(n_pad, dtype)
        w[:n] = weight[members]
        ev_mask = np.zeros(n_pad, bool)
        ev_mask[:n] = True
        event = {}
        for f, vals in event_values.items():
            a = np.zeros(n_pad, dtype)
            a[:n] = vals[members]
            event[f] = a
        parts.append(DenseBatch(objects=objects, event=event, weight=w, event_mask=ev_mask, kinematic=tuple(kinematic),
                                weight_variations=nominal_file, block_size=block, bucket=definition.bucket))
    return ChunkBatches(sample=columns.chunk.sample, variation=columns.chunk.variation, n_events=n_events,
                        parts=tuple(parts), rows=tuple(part_rows))


def _passes(cuts, pt: np.ndarray) -> np.ndarray:
    """Whether each object's (varied) pT passes every fixed pT cut."""
    ok = np.ones(len(pt), dtype=bool)
    for c in cuts:
        ok &= c.mask(pt)
    return ok


def _plain_block(n_objects: int) -> int:
    """Events per block without combinatorial observables: about BLOCK_ELEMENTS / objects."""
    b = max(MIN_BLOCK, BLOCK_ELEMENTS // max(4 * n_objects, 1))
    return 1 << (b.bit_length() - 1)

