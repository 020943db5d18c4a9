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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import awkward as ak
import jax
import numpy as np

from .columns import Columns
from .reference import event_weight as event_weights  # one definition of the event weight for both modes
from .spec import NOMINAL, AnalysisSpec

jax.config.update("jax_enable_x64", True)

JET_BUCKETS_MIN = 4
#: Target number of (event x trijet) elements per processing block (bounds temporary memory).
BLOCK_ELEMENTS = 1 << 16  # ~0.5 MB per float64 array: stays in cache
MIN_BLOCK = 128


def jet_bucket(n: int, minimum: int = JET_BUCKETS_MIN) -> int:
    """Smallest bucket size >= n from 4, 6, 8, 12, 16, 24, 32, 48, ... (2^k and 3 x 2^(k-1))."""
    size = minimum
    while size < n:
        size = _next_size(size)
    return size


def _next_size(size: int) -> int:
    p = 1 << (size.bit_length() - 1)
    return p * 3 // 2 if size == p and p >= 4 else (p * 2)


def nice_size(n: int, minimum: int = 1) -> int:
    """Smallest number >= n (and >= minimum) of the form 2^k or 3 x 2^(k-1)."""
    n = max(n, minimum, 1)
    p = 1 << (n - 1).bit_length()  # next power of two
    three = (p // 4) * 3
    return three if p >= 4 and three >= n else p


def block_size_for(n_jets: int) -> int:
    """Events per processing block for a jet bucket: about BLOCK_ELEMENTS event x trijet elements."""
    n_trijets = max(math.comb(n_jets, 3), 1)
    b = max(MIN_BLOCK, BLOCK_ELEMENTS // n_trijets)
    return 1 << (b.bit_length() - 1)


def padded_events(n: int, block: int) -> tuple[int, int]:
    """(padded event count, block size): one block of ``nice_size(n)`` if small, else whole blocks."""
    if n <= block:
        size = nice_size(n, MIN_BLOCK)
        return size, size
    return nice_size(-(-n // block)) * block, block


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

    def slice_events(self, start: int, stop: int) -> "EventBatch":
        """Events [start, stop) (for tests and benchmarks); keeps the static fields."""
        fields = {f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)
                  if not f.metadata.get("static")}
        return dataclasses.replace(self, **fields)


@dataclasses.dataclass(frozen=True)
class ChunkBatches:
    """The dense batches of one chunk of one (sample, file variation)."""

    sample: str
    variation: str  # the file variation: "nominal", "ME_var", ...
    n_events: int  # events of the chunk (before padding and prefiltering)
    parts: tuple[EventBatch, ...]

    @property
    def n_padded(self) -> int:
        return sum(p.n_padded for p in self.parts)


def _pad(arr: ak.Array, width: int, fill, dtype) -> np.ndarray:
    padded = ak.fill_none(ak.pad_none(arr, width, axis=1, clip=True), fill)
    out = ak.to_numpy(padded).astype(dtype, copy=False)
    return out.reshape(len(arr), width)


def kinematic_jet_pt(columns: Columns, spec: AnalysisSpec) -> dict[str, ak.Array]:
    """Jet pT of each kinematic variation (nominal files: nominal, JES, JER; others: nominal only)."""
    out = {NOMINAL: columns["jet_pt"]}
    if columns.chunk.variation != NOMINAL:
        return out
    for s in spec.systematics:
        if s.kind == "jet_pt_scale":
            out[s.options["variation"]] = columns["jet_pt"] * float(s.options["factor"])
        elif s.kind == "jet_pt_smear":
            out[s.options["variation"]] = columns["jet_pt"] * columns.jer_factor
    return {k: out[k] for k in ([NOMINAL] + [k for k in spec.kinematic_variations() if k in out and k != NOMINAL])}


def make_batches(columns: Columns, spec: AnalysisSpec, dtype=np.float64, prefilter: bool = False) -> ChunkBatches:
    """Dense, bucketed event batches of one chunk (see the module docstring)."""
    c = spec.cuts
    e_ok = ((abs(columns["electron_eta"]) < c["electron_eta_max"])
            & (columns["electron_id"] == c["electron_id_value"])
            & (columns["electron_sip3d"] < c["electron_sip3d_max"]))
    m_ok = ((abs(columns["muon_eta"]) < c["muon_eta_max"])
            & (columns["muon_id"] != 0)
            & (columns["muon_sip3d"] < c["muon_sip3d_max"])
            & (columns["muon_iso"] < c["muon_iso_max"]))
    j_ok = columns["jet_id"] == c["jet_id_value"]
    electrons = columns["electron_pt"][e_ok]
    muons = columns["muon_pt"][m_ok]
    leptons = ak.concatenate([electrons, muons], axis=1)
    is_muon = ak.concatenate([ak.zeros_like(electrons, dtype=bool), ak.ones_like(muons, dtype=bool)], axis=1)
    kin = {k: v[j_ok] for k, v in kinematic_jet_pt(columns, spec).items()}
    jets = {name: columns[f"jet_{name}"][j_ok] for name in ("eta", "phi", "mass", "btag")}
    weight = event_weights(columns, spec)

    n_e = ak.to_numpy(ak.num(electrons, axis=1))
    n_m = ak.to_numpy(ak.num(muons, axis=1))
    n_j = ak.to_numpy(ak.num(jets["eta"], axis=1))
    keep = np.ones(len(columns), dtype=bool)
    if prefilter:
        keep &= (n_e + n_m >= int(c["n_leptons"])) & (n_j >= int(c["min_jets"]))
    buckets = np.array([jet_bucket(int(n)) for n in range(int(n_j.max(initial=0)) + 1)], dtype=np.int64)
    bucket_of = buckets[n_j] if len(n_j) else np.zeros(0, dtype=np.int64)

    parts = []
    nominal_file = columns.chunk.variation == NOMINAL
    for k in sorted(set(bucket_of[keep].tolist())):
        sel = np.nonzero(keep & (bucket_of == k))[0]
        n = len(sel)
        n_pad, block = padded_events(n, block_size_for(k))

        def dense(arr, width, fill=0.0, dt=dtype):
            out = np.full((n_pad, width), fill, dtype=dt)
            out[:n] = _pad(arr[sel], width, fill, dt)
            return out

        nl = n_e[sel] + n_m[sel]
        width = 1 << int(max(nl.max(initial=0), 2) - 1).bit_length()  # 2, 4, 8, ... (few shapes)
        l_pt = dense(leptons, width)
        l_mu = dense(is_muon, width, False, bool)
        l_mask = np.arange(width)[None, :] < np.concatenate([nl, np.zeros(n_pad - n, np.int64)])[:, None]
        nj = np.concatenate([n_j[sel], np.zeros(n_pad - n, np.int64)])
        j_mask = np.arange(k)[None, :] < nj[:, None]
        jet_pt = np.stack([dense(v, k) for v in kin.values()], axis=1)
        eta, phi = dense(jets["eta"], k), dense(jets["phi"], k)
        w = np.zeros(n_pad, dtype=dtype)
        w[:n] = weight[sel]
        ev = np.zeros(n_pad, dtype=bool)
        ev[:n] = True
        parts.append(EventBatch(
            lepton_pt=l_pt, lepton_mask=l_mask, lepton_is_muon=l_mu,
            jet_pt=jet_pt, jet_eta=eta, jet_cos_phi=np.cos(phi), jet_sin_phi=np.sin(phi),
            jet_sinh_eta=np.sinh(eta), jet_mass=dense(jets["mass"], k), jet_btag=dense(jets["btag"], k), jet_mask=j_mask,
            weight=w, event_mask=ev, kinematic=tuple(kin), weight_variations=nominal_file, block_size=block))
    return ChunkBatches(sample=columns.chunk.sample, variation=columns.chunk.variation,
                        n_events=len(columns), parts=tuple(parts))


def to_device(batches: ChunkBatches | Sequence[EventBatch]):
    """The same batches with their arrays moved to the default JAX device (kept there for reuse)."""
    if isinstance(batches, ChunkBatches):
        return dataclasses.replace(batches, parts=tuple(jax.device_put(p) for p in batches.parts))
    return [jax.device_put(p) for p in batches]
