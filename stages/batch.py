"""Dense event batches: jagged NanoAOD columns -> padded arrays + masks, at the awkward boundary.

:func:`make_batches` turns the :class:`~jacana.stages.columns.Columns` of one chunk into a
:class:`ChunkBatches`: one :class:`EventBatch` per jet-multiplicity bucket. Every array of an
``EventBatch`` is dense ([events, objects]) with a boolean validity mask; the JAX stages never
see awkward arrays.

Shapes are bucketed so that a handful of programs compile for any chunking:

* objects: an event goes to the smallest jet bucket (4, 6, 8, 12, 16, 24, 32, ...) that holds all
  its jets, so nothing is ever truncated and a rare 20-jet event does not make every event pay
  for C(32, 3) trijets; electrons and muons share one lepton collection (they share the
  ``lepton_pt_min`` cut; ``lepton_is_muon`` tells them apart) whose width is a power of two;
* events: the event count of each bucket is padded (zero weight, masked) to a size of the
  form 2^k or 3 x 2^(k-1), a whole number of processing blocks.

Fixed (non-tunable) object definitions are applied here, hard, exactly as the conventional
analysis does: ``cutBased == 4``, ``tightId``, ``jetId == 6``, ``|eta| < 2.1``, ``sip3d``, ``iso``.
Objects failing them are removed (file order of the rest kept), which changes no count, no
"i-th selected jet" and no trijet order. The tunable cuts (lepton/jet pT, jet |eta|, b-tag) are
left to the soft stages.

Kinematic variations of the jet pT (JES, JER) are materialised here with exactly the
conventional arithmetic (``Jet_pt * factor`` in the file's dtype), so the hard limit is bit-exact;
``jet_pt`` is [events, variations, jets].

``prefilter=True`` drops events that cannot pass whatever the parameters (fewer lepton
candidates than the required lepton count, or fewer jet candidates than the minimum jet count);
their soft yield is exactly zero, so results do not change.

``pad=False`` leaves each bucket at exactly its events, for callers that regroup the batches
into fixed-shape calls anyway (:func:`jacana.facility.executor.rebatch` drops padding events):
the executors' reads then write, and the dask executor moves, about a fifth fewer bytes.
:func:`regroupable_batches` is that read path's call (prefiltered, unpadded), in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import awkward as ak
import jax
import numpy as np

from jacana.stages.columns import Columns, flat_counts, per_event_count
from jacana.stages.shapes import MIN_BLOCK, ChunkBatches, block_size_for, jet_bucket, padded_events
from jacana.stages.reference import event_weight as event_weights  # one definition of the event weight for both modes
from jacana.stages.spec import NOMINAL, AnalysisSpec

jax.config.update("jax_enable_x64", True)

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EventBatch:
    """Dense events of one jet bucket. Arrays are numpy or jax; the leading axis is events.

    ``jet_pt`` is [N, V, K]: one slice per kinematic variation named in ``kinematic``.
    Padded objects have mask False and zero values; padded events have weight 0.
    """

    lepton_pt: np.ndarray  # [N, L]: electrons then muons (both pass the fixed ID cuts)
    lepton_mask: np.ndarray
    lepton_is_muon: np.ndarray
    jet_pt: np.ndarray  # [N, V, K]
    jet_eta: np.ndarray  # [N, K]
    jet_cos_phi: np.ndarray  # direction and mass terms of the four-vectors (parameter-free)
    jet_sin_phi: np.ndarray
    jet_sinh_eta: np.ndarray
    jet_mass: np.ndarray
    jet_btag: np.ndarray
    jet_mask: np.ndarray
    weight: np.ndarray  # [N]
    event_mask: np.ndarray  # [N]
    kinematic: tuple = dataclasses.field(default=(NOMINAL,), metadata=dict(static=True))
    weight_variations: bool = dataclasses.field(default=True, metadata=dict(static=True))
    block_size: int = dataclasses.field(default=MIN_BLOCK, metadata=dict(static=True))

    @property
    def n_padded(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_jets(self) -> int:
        return int(self.jet_eta.shape[1])

    @property
    def dtype(self):
        return self.jet_eta.dtype

    @property
    def bucket_width(self) -> int:
        """Objects per event of the grouping collection (the jets)."""
        return self.n_jets

    def group_key(self) -> tuple:
        """Batches with equal keys regroup into one fixed-shape call (:func:`~jacana.facility.executor.rebatch`)."""
        return (self.n_jets, self.kinematic, self.weight_variations)

    def widened(self, path: tuple) -> bool:
        """Whether a field's object axis (its last) may differ between batches of one group: the leptons'."""
        return path[0].startswith("lepton_")

    def slice_events(self, start: int, stop: int) -> "EventBatch":
        """Events [start, stop) (for tests and benchmarks); keeps the static fields."""
        fields = {f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)
                  if not f.metadata.get("static")}
        return dataclasses.replace(self, **fields)


class _Jagged:
    """A one-level jagged column as flat numpy ``content`` and per-event ``counts``.

    Densifying with numpy scatters (one pass over the objects per field) instead of awkward's
    ``pad_none``/``fill_none``/``to_numpy`` per field and bucket: the first pass is dominated by
    this step, and the values are copied unchanged (bit-exact).
    """

    __slots__ = ("content", "counts", "starts")

    def __init__(self, content: np.ndarray, counts: np.ndarray):
        self.content = content
        self.counts = counts
        self.starts = np.cumsum(counts) - counts

    def event_and_slot(self) -> tuple[np.ndarray, np.ndarray]:
        """Per object: its event index and its position within the event."""
        event = np.repeat(np.arange(len(self.counts)), self.counts)
        return event, np.arange(len(self.content)) - self.starts[event]


class _Scatter:
    """Where the objects of one structure go in the dense [rows, width] array of one bucket."""

    __slots__ = ("target", "source", "shape")

    def __init__(self, source: np.ndarray, row: np.ndarray, slot: np.ndarray, n_rows: int, width: int):
        ok = slot < width
        self.source = source[ok]
        self.target = row[ok] * width + slot[ok]
        self.shape = (n_rows, width)

    def dense(self, content: np.ndarray, fill=0, dtype=np.float64) -> np.ndarray:
        out = np.full(self.shape[0] * self.shape[1], fill, dtype=dtype)
        out[self.target] = content[self.source]
        return out.reshape(self.shape)


class _Buckets:
    """The events of each jet bucket (in event order) and each event's row in its bucket, so the
    objects of every structure are grouped by bucket once (one sort), not once per bucket."""

    def __init__(self, bucket_of: np.ndarray):
        self.sizes = sorted(set(bucket_of.tolist()))
        # bucket numbers as uint8: numpy's stable sort of 8-bit keys is a radix sort, O(n)
        self.index = np.searchsorted(self.sizes, bucket_of).astype(np.uint8)
        self.order, self.bounds = self._group(self.index)
        self.row = np.empty(len(bucket_of), dtype=np.int64)
        self.row[self.order] = np.arange(len(bucket_of)) - np.repeat(self.bounds[:-1], np.diff(self.bounds))

    def _group(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(index, kind="stable")
        return order, np.concatenate([[0], np.cumsum(np.bincount(index, minlength=len(self.sizes)))])

    def events(self, i: int) -> np.ndarray:
        return self.order[self.bounds[i]:self.bounds[i + 1]]

    def objects(self, event: np.ndarray, slot: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per bucket: (object indices, their rows, their slots) of objects whose ``event`` is in it."""
        order, bounds = self._group(self.index[event])
        out = []
        for i in range(len(self.sizes)):
            idx = order[bounds[i]:bounds[i + 1]]
            out.append((idx, self.row[event[idx]], slot[idx]))
        return out


def _kinematic_jet_pt(columns: Columns, spec: AnalysisSpec, jet_pt: np.ndarray,
                      jets: np.ndarray) -> dict[str, np.ndarray]:
    """Jet pT of each kinematic variation (nominal files: nominal, JES, JER; others: nominal only) for
    the jets at flat indices ``jets`` (``jet_pt``: theirs), with the conventional analysis's arithmetic
    (``Jet_pt * factor``, elementwise)."""
    out = {NOMINAL: jet_pt}
    if columns.chunk.variation != NOMINAL:
        return out
    for s in spec.systematics:
        if s.kind == "jet_pt_scale":
            out[s.options["variation"]] = jet_pt * float(s.options["factor"])
        elif s.kind == "jet_pt_smear":
            out[s.options["variation"]] = jet_pt * columns.jer_factors_at(jets)
    return {k: out[k] for k in ([NOMINAL] + [k for k in spec.kinematic_variations() if k in out and k != NOMINAL])}


def make_batches(columns: Columns, spec: AnalysisSpec, dtype=np.float64, prefilter: bool = False,
                 pad: bool = True) -> ChunkBatches:
    """Dense, bucketed event batches of one chunk (see the module docstring); a general analysis's
    (:mod:`.definition`) come from :func:`~jacana.stages.dense.make_dense_batches`."""
    if spec.is_general:
        from jacana.stages.dense import make_dense_batches

        return make_dense_batches(columns, spec, dtype=dtype, prefilter=prefilter, pad=pad)
    c = spec.cuts
    flat = {name: flat_counts(columns[name]) for name in (
        "electron_pt", "electron_eta", "electron_id", "electron_sip3d",
        "muon_pt", "muon_eta", "muon_id", "muon_sip3d", "muon_iso",
        "jet_pt", "jet_eta", "jet_phi", "jet_mass", "jet_btag", "jet_id")}
    v = {name: content for name, (content, _) in flat.items()}
    # one structure per collection (the columns were checked to share their counts)
    counts = {coll: flat[f"{coll}_pt"][1] for coll in ("electron", "muon", "jet")}
    ok = {"electron": ((np.abs(v["electron_eta"]) < c["electron_eta_max"])
                       & (v["electron_id"] == c["electron_id_value"])
                       & (v["electron_sip3d"] < c["electron_sip3d_max"])),
          "muon": ((np.abs(v["muon_eta"]) < c["muon_eta_max"]) & (v["muon_id"] != 0)
                   & (v["muon_sip3d"] < c["muon_sip3d_max"]) & (v["muon_iso"] < c["muon_iso_max"])),
          "jet": v["jet_id"] == c["jet_id_value"]}
    n_ok = {coll: per_event_count(counts[coll], ok[coll]) for coll in ok}
    weight = event_weights(columns, spec)
    if prefilter:  # events that cannot pass at any parameter values go now, with their objects
        keep = (n_ok["electron"] + n_ok["muon"] >= int(c["n_leptons"])) & (n_ok["jet"] >= int(c["min_jets"]))
        if not keep.all():
            ok = {coll: m & np.repeat(keep, counts[coll]) for coll, m in ok.items()}
            n_ok = {coll: n[keep] for coll, n in n_ok.items()}
            weight = weight[keep]
    # the objects that stay, each field gathered once
    sel = {coll: np.flatnonzero(m) for coll, m in ok.items()}
    electrons = _Jagged(v["electron_pt"][sel["electron"]], n_ok["electron"])
    muons = _Jagged(v["muon_pt"][sel["muon"]], n_ok["muon"])
    jets = _Jagged(v["jet_eta"][sel["jet"]], n_ok["jet"])
    kin = _kinematic_jet_pt(columns, spec, v["jet_pt"][sel["jet"]], sel["jet"])
    jet_fields = {"eta": jets.content, **{name: v[f"jet_{name}"][sel["jet"]] for name in ("phi", "mass", "btag")}}

    n_e, n_m, n_j = electrons.counts, muons.counts, jets.counts
    buckets = np.array([jet_bucket(int(n)) for n in range(int(n_j.max(initial=0)) + 1)], dtype=np.int64)
    bucket_of = buckets[n_j] if len(n_j) else np.zeros(0, dtype=np.int64)
    e_event, e_slot = electrons.event_and_slot()
    m_event, m_slot = muons.event_and_slot()
    m_slot = m_slot + n_e[m_event]  # muons follow the electrons of their event
    j_event, j_slot = jets.event_and_slot()

    parts = []
    nominal_file = columns.chunk.variation == NOMINAL
    groups = _Buckets(bucket_of)
    e_by, m_by, j_by = (groups.objects(ev, sl) for ev, sl in ((e_event, e_slot), (m_event, m_slot), (j_event, j_slot)))
    for i, k in enumerate(groups.sizes):
        sel_k = groups.events(i)
        n = len(sel_k)
        n_pad, block = padded_events(n, block_size_for(k)) if pad else (n, block_size_for(k))

        nl = n_e[sel_k] + n_m[sel_k]
        width = 1 << int(max(nl.max(initial=0), 2) - 1).bit_length()  # 2, 4, 8, ... (few shapes)
        to_e = _Scatter(*e_by[i], n_pad, width)
        to_m = _Scatter(*m_by[i], n_pad, width)
        l_pt = to_e.dense(electrons.content, 0.0, dtype)
        l_pt.flat[to_m.target] = muons.content[to_m.source]
        l_mu = np.zeros((n_pad, width), dtype=bool)
        l_mu.flat[to_m.target] = True
        l_mask = np.arange(width)[None, :] < np.concatenate([nl, np.zeros(n_pad - n, np.int64)])[:, None]
        nj = np.concatenate([n_j[sel_k], np.zeros(n_pad - n, np.int64)])
        j_mask = np.arange(k)[None, :] < nj[:, None]
        to_j = _Scatter(*j_by[i], n_pad, k)
        jet_pt = np.stack([to_j.dense(x, 0.0, dtype) for x in kin.values()], axis=1)
        eta, phi = to_j.dense(jet_fields["eta"], 0.0, dtype), to_j.dense(jet_fields["phi"], 0.0, dtype)
        w = np.zeros(n_pad, dtype=dtype)
        w[:n] = weight[sel_k]
        ev = np.zeros(n_pad, dtype=bool)
        ev[:n] = True
        parts.append(EventBatch(
            lepton_pt=l_pt, lepton_mask=l_mask, lepton_is_muon=l_mu,
            jet_pt=jet_pt, jet_eta=eta, jet_cos_phi=np.cos(phi), jet_sin_phi=np.sin(phi),
            jet_sinh_eta=np.sinh(eta), jet_mass=to_j.dense(jet_fields["mass"], 0.0, dtype),
            jet_btag=to_j.dense(jet_fields["btag"], 0.0, dtype), jet_mask=j_mask,
            weight=w, event_mask=ev, kinematic=tuple(kin), weight_variations=nominal_file, block_size=block))
    return ChunkBatches(sample=columns.chunk.sample, variation=columns.chunk.variation,
                        n_events=len(columns), parts=tuple(parts))


def regroupable_batches(columns: Columns, spec: AnalysisSpec, dtype=np.float64) -> ChunkBatches:
    """A chunk densified for the executors and the coffea adapter, which regroup the parts into
    fixed-shape calls (``rebatch``): events that cannot pass dropped, buckets not padded."""
    return make_batches(columns, spec, dtype=dtype, prefilter=True, pad=False)


def to_device(batches: ChunkBatches | Sequence[EventBatch]):
    """The same batches with their arrays moved to the default JAX device (kept there for reuse)."""
    # one device_put of the whole tree: per-array calls cost ~0.2 ms each (1,700 arrays at 1M events)
    if isinstance(batches, ChunkBatches):
        return dataclasses.replace(batches, parts=tuple(jax.device_put(tuple(batches.parts))))
    return list(jax.device_put(tuple(batches)))
