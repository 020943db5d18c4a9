"""Reading the columns an analysis needs from NanoAOD files, with errors that name what is wrong.

Awkward stays at this boundary: :func:`read_chunk` returns a :class:`Columns` mapping of
logical names (``jet_pt``, ``muon_iso``, ...; see the config's ``branches``) to awkward
arrays, plus the derived per-jet resolution-smearing factors (drawn when needed), which are a
deterministic function of (file, entry, jet index) so every chunking of a file gives the same numbers.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import itertools
import math
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import awkward as ak
import numpy as np
import uproot
from scipy.special import ndtri

from jacana.stages.errors import InputFileError, MissingBranchError
from jacana.stages.fileset import Chunk
from jacana.stages.rootfile import open_tree
from jacana.stages.spec import AnalysisSpec



@dataclasses.dataclass
class Columns:
    """The logical columns of one chunk (awkward arrays) and where they came from.

    The JER smearing factors are given (``jer_factor``) or drawn when first needed from ``jer``
    (sigma, seed): :meth:`jer_factors` for every jet, :meth:`jer_factors_at` for some (the
    densifier needs them only for the jets that can pass, a fraction of all).
    """

    chunk: Chunk
    arrays: dict[str, ak.Array]
    jer_factor: ak.Array | None = None  # per-jet pT smearing factor of the JER variation
    nonfinite: dict[str, int] = dataclasses.field(default_factory=dict)  # branch -> NaN/inf values masked
    # (sigma, seed) of the JER smearing. With neither this nor jer_factor the factors are 1 (no smearing):
    # build Columns with columns_from_arrays, which sets it from the config
    jer: tuple[float, int] | None = None

    def __getitem__(self, name: str) -> ak.Array:
        return self.arrays[name]

    def __len__(self) -> int:
        return self.chunk.n_events

    def jer_factors(self) -> ak.Array:
        """Every jet's JER factor, [events, jets] (drawn once, then kept)."""
        if self.jer_factor is None:
            _, counts = flat_counts(self.arrays["jet_pt"])
            flat = (jer_factors(self.chunk.path, self.chunk.entry_start, counts, *self.jer) if self.jer
                    else np.ones(int(counts.sum())))
            self.jer_factor = ak.unflatten(flat, counts)
        return self.jer_factor

    def jer_factors_at(self, jets: np.ndarray) -> np.ndarray:
        """The JER factors of the jets at flat indices ``jets`` (into the chunk's flattened jets)."""
        jets = np.asarray(jets, dtype=np.int64)
        if self.jer_factor is not None:
            return flat_counts(self.jer_factor)[0][jets]
        if self.jer is None:
            return np.ones(len(jets))
        _, counts = flat_counts(self.arrays["jet_pt"])
        starts = np.cumsum(counts) - counts
        event = np.searchsorted(starts + counts, jets, side="right")  # the event holding each jet
        return jer_factors_at(self.chunk.path, self.chunk.entry_start + event, jets - starts[event], *self.jer)


def flat_counts(arr: ak.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, objects per event) of a one-level jagged array, as numpy.

    Reads the offsets of the usual layout (uproot's ListOffsetArray of numbers) directly:
    awkward's generic ``flatten``/``num`` cost more than the read itself on a first pass.
    """
    layout = ak.to_layout(arr)
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(layout.content, ak.contents.NumpyArray):
        offsets = np.asarray(layout.offsets.data).astype(np.int64, copy=False)
        return np.asarray(layout.content.data)[offsets[0]:offsets[-1]], np.diff(offsets)
    return ak.to_numpy(ak.flatten(arr, axis=1)), ak.to_numpy(ak.num(arr, axis=1)).astype(np.int64)


def per_event_count(counts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How many objects of each event have the flat per-object ``mask`` set (objects grouped by event)."""
    counts = np.asarray(counts, dtype=np.int64)
    cs = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    ends = np.cumsum(counts)
    return cs[ends] - cs[ends - counts]


def file_key(path: str) -> int:
    """A 32-bit key of a file's name (not its folder), so moved files give the same smearing."""
    return zlib.crc32(Path(path).name.encode())


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def counter_uniform(path: str, entry: np.ndarray, index: np.ndarray, seed: int) -> np.ndarray:
    """Uniform numbers in (0, 1), one per (entry, index), a pure function of (seed, file name, entry,
    index < 1024): counter-based, so any chunking, worker or order of evaluation gives the same ones."""
    key = (np.uint64(seed) << np.uint64(32)) ^ np.uint64(file_key(path))
    counter = np.asarray(entry, dtype=np.uint64) * np.uint64(1024) + np.asarray(index, dtype=np.uint64)
    bits = _splitmix64(_splitmix64(counter) ^ key)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


def jer_factors(path: str, entry_start: int, counts: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Per-jet N(1, sigma) smearing factors, flat, counter-based on (seed, file, entry, jet index).

    Counter-based (not a stateful RNG) so any chunking, any worker and any order of
    evaluation gives bit-identical factors for the same jet.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    entry = np.repeat(np.arange(entry_start, entry_start + len(counts), dtype=np.uint64), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    jet_index = np.arange(n, dtype=np.int64) - np.repeat(offsets, counts)
    return jer_factors_at(path, entry, jet_index, sigma, seed)


def jer_factors_at(path: str, entry: np.ndarray, jet_index: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The N(1, sigma) factors of the jets (``entry``, ``jet_index``) of file ``path``: those of
    :func:`jer_factors`, jet by jet."""
    if len(entry) == 0:
        return np.zeros(0, dtype=np.float64)
    return 1.0 + sigma * ndtri(counter_uniform(path, entry, jet_index, seed))


#: Seed domain of the bootstrap multipliers (kept apart from the JER smearing's seeds).
BOOTSTRAP_SALT = 0x5EED_B007
#: Poisson(1) cumulative probabilities P(k <= 0..15): the multipliers' inverse CDF (P(k > 15) < 1e-13).
_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(16)])
#: Most bootstrap replicas: the counter hash keeps 10 bits for the replica number.
MAX_BOOTSTRAP = 1023


def check_bootstrap(replicas: int) -> None:
    """``replicas`` is 0 (no bootstrap) or 2..:data:`MAX_BOOTSTRAP`, else a ValueError that says so."""
    if not (int(replicas) == 0 or 2 <= int(replicas) <= MAX_BOOTSTRAP):
        raise ValueError(f"bootstrap replicas must be 0 (none) or 2 to {MAX_BOOTSTRAP}, got {replicas}")


def bootstrap_multipliers(path: str, entry_start: int, n_events: int, replicas: int, seed: int = 0) -> np.ndarray:
    """Per-event weight multipliers of a Poisson bootstrap, [replicas + 1, n_events] uint8.

    Row 0 is all ones (the nominal); row r >= 1 draws Poisson(1) per event, a pure function of
    (seed, file name, entry, r), so every chunking and every parameter point sees the same
    replicas (differences between points are then paired). Replica r reweights each simulated
    event by its row: the spread of a result over the replicas is its Monte Carlo statistical
    uncertainty.

    >>> bootstrap_multipliers("f.root", 0, 5, 2, seed=1).shape
    (3, 5)
    """
    if not 1 <= replicas <= MAX_BOOTSTRAP:
        raise ValueError(f"bootstrap replicas must be 1 to {MAX_BOOTSTRAP}, got {replicas}")
    entry = np.arange(entry_start, entry_start + n_events, dtype=np.uint64)
    out = np.ones((replicas + 1, n_events), dtype=np.uint8)
    salted = (int(seed) ^ BOOTSTRAP_SALT) & 0xFFFFFFFF
    for r in range(1, replicas + 1):
        u = counter_uniform(path, entry, np.full(n_events, r, dtype=np.uint64), salted)
        out[r] = np.searchsorted(_POISSON1_CDF, u)
    return out


def _check_branches(tree, path: str, spec: AnalysisSpec) -> None:
    keys = set(tree.keys())
    for logical, branch in spec.branches.items():
        if branch not in keys:
            raise MissingBranchError(path, branch, difflib.get_close_matches(branch, sorted(keys), n=3, cutoff=0.5))


def _check_type(path: str, logical: str, branch: str, array: ak.Array, jagged: bool) -> ak.Array:
    layout = ak.to_layout(array)
    depth = layout.minmax_depth[1] if hasattr(layout, "minmax_depth") else layout.purelist_depth
    if jagged and depth != 2:
        raise InputFileError(path, f"branch {branch!r} ({logical}) must be a jagged per-object array, got {array.type}")
    if not jagged and depth != 1:
        raise InputFileError(path, f"branch {branch!r} ({logical}) must be one number per event, got {array.type}")
    prim = str(ak.type(array)).split("*")[-1].strip()
    if prim not in ("float32", "float64", "int32", "int64", "int16", "int8", "uint8", "uint32", "bool", "uint64"):
        raise InputFileError(path, f"branch {branch!r} ({logical}) must be numeric or boolean, got {prim}")
    return array


def read_chunk(chunk: Chunk, spec: AnalysisSpec) -> Columns:
    """Read only the branches ``spec`` needs for the entries of ``chunk``."""
    tree = open_tree(chunk.path, spec.tree)
    try:
        return _read_tree(tree, chunk, spec)
    finally:
        tree.file.close()  # the file handle now, not when a cycle collection gets to it


def _read_tree(tree, chunk: Chunk, spec: AnalysisSpec) -> Columns:
    _check_branches(tree, chunk.path, spec)
    if chunk.entry_stop > tree.num_entries:
        raise InputFileError(chunk.path, f"needs entries up to {chunk.entry_stop} but the tree has {tree.num_entries}"
                             " (the fileset's nevts is wrong or the file is truncated)")
    try:
        raw = tree.arrays(spec.needed_branches(), entry_start=chunk.entry_start,
                          entry_stop=chunk.entry_stop, library="ak", how=dict)
    except Exception as exc:
        raise InputFileError(chunk.path, f"cannot read entries {chunk.entry_start}-{chunk.entry_stop}"
                             f" ({type(exc).__name__}: {exc}); the file may be truncated or corrupt") from None
    return columns_from_arrays(chunk, spec, raw)


def read_ahead(chunks: Iterable[Chunk], spec: AnalysisSpec, depth: int = 2,
               reader: Callable[[Chunk, AnalysisSpec], "Columns"] | None = None) -> Iterator[tuple[Chunk, Future]]:
    """``(chunk, future of its Columns)`` in order, the next ``depth`` chunks read on background threads.

    The caller densifies one chunk while the next ones are read (zlib decompression and numpy
    release the GIL), so a first pass costs about the read alone rather than read + densify. At
    most ``depth + 1`` chunks' columns are held at once (the caller's and ``depth`` in reading). ``future.result()`` raises the chunk's
    :class:`InputFileError`; a caller that skips a chunk simply drops its future.

    >>> for chunk, columns in read_ahead(chunks, spec):   # doctest: +SKIP
    ...     batches = make_batches(columns.result(), spec)
    """
    reader = reader or read_chunk
    chunks = iter(chunks)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="jacana-read") as pool:
        pending = collections.deque((c, pool.submit(reader, c, spec)) for c in itertools.islice(chunks, depth))
        try:
            while pending:
                chunk, future = pending.popleft()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(reader, nxt, spec)))
                yield chunk, future
        finally:  # a consumer that stops early (an error) does not wait for reads nobody wants
            for _, future in pending:
                future.cancel()


def columns_from_arrays(chunk: Chunk, spec: AnalysisSpec, raw) -> Columns:
    """:class:`Columns` from arrays keyed by branch name (from uproot, or coffea's NanoEvents):
    type and multiplicity checks, non-finite masking, and the JER smearing factors."""
    branch_of = spec.branches
    scalar = set(spec.event_columns())
    arrays = {logical: _check_type(chunk.path, logical, branch, raw[branch], logical not in scalar)
              for logical, branch in branch_of.items()}
    _check_multiplicities(chunk.path, arrays, branch_of, spec.collections())
    arrays, nonfinite = _mask_nonfinite(arrays, branch_of, spec.collections(), spec.event_columns(),
                                        chunk.path, spec.max_nonfinite_fraction)
    jer = [s for s in spec.systematics if s.kind == "jet_pt_smear"]
    return Columns(chunk=chunk, arrays=arrays, nonfinite=nonfinite,
                   jer=(float(jer[0].options["sigma"]), int(jer[0].options["seed"])) if jer else None)


def _check_multiplicities(path: str, arrays: dict[str, ak.Array], branch_of: dict[str, str],
                          collections: tuple[str, ...]) -> None:
    for coll in collections:
        names = [n for n in arrays if n.startswith(coll + "_")]
        if not names:
            continue
        ref = flat_counts(arrays[names[0]])[1]
        for n in names[1:]:
            if not np.array_equal(flat_counts(arrays[n])[1], ref):
                raise InputFileError(path, f"branches {branch_of[names[0]]!r} and {branch_of[n]!r} have different"
                                     " object counts per event (they must belong to one collection)")


#: What a masked (non-finite) object becomes: it fails every cut, and has no b-tag value.
_MASKED_VALUE = {"pt": 0.0, "btag": -10.0}


def _mask_nonfinite(arrays: dict[str, ak.Array], branch_of: dict[str, str], collections: tuple[str, ...],
                    event_columns: tuple[str, ...], path: str = "<arrays>",
                    max_fraction: float = 1.0) -> tuple[dict[str, ak.Array], dict[str, int]]:
    """Neutralise NaN/inf values: the object fails every cut, the event weight becomes 0.

    Counted per branch and reported, never silently propagated (a NaN would poison every
    sum and every gradient it touches). A non-finite per-event number (genWeight, MET) becomes 0.
    More than ``max_fraction`` of a branch's values is an :class:`InputFileError` naming the file
    and branch: that is a broken file, and masking would silently change the yields.
    """
    counts: dict[str, int] = {}
    out = dict(arrays)

    def check(name: str, bad: int, total: int) -> None:
        if bad > max_fraction * total:
            raise InputFileError(path, f"branch {branch_of[name]!r} has {bad:,} non-finite (NaN/inf) values of"
                                 f" {total:,} ({bad / total:.1%}; at most {max_fraction:.0%} are masked): a broken"
                                 " file? --mask-non-finite (config non_finite.max_fraction: 1) masks them all")
    for coll in collections:
        names = [n for n in arrays if n.startswith(coll + "_")]
        bad = None
        for n in names:
            flat, num = flat_counts(arrays[n])
            if not np.issubdtype(flat.dtype, np.floating):
                continue
            mask = ~np.isfinite(flat)
            if mask.any():
                counts[branch_of[n]] = int(mask.sum())
                check(n, counts[branch_of[n]], len(flat))
                bad = mask if bad is None else (bad | mask)
        if bad is not None:
            for n in names:
                flat, num = flat_counts(arrays[n])
                value = _MASKED_VALUE.get(n[len(coll) + 1:], 0)
                out[n] = ak.unflatten(np.where(bad, np.asarray(value).astype(flat.dtype), flat), num)
    for name in event_columns:
        gw = ak.to_numpy(arrays[name])
        if np.issubdtype(gw.dtype, np.floating):
            bad = ~np.isfinite(gw)
            if bad.any():
                counts[branch_of[name]] = int(bad.sum())
                check(name, counts[branch_of[name]], len(gw))
                out[name] = ak.Array(np.where(bad, 0.0, gw).astype(gw.dtype))
    return out, counts
