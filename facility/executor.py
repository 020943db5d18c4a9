"""Executors: where the per-chunk soft analysis runs, behind one interface.

An executor reads every chunk once, keeps its dense batches where they were read, and on
each optimisation step returns the per-(sample, file variation) yields with their
Jacobians (forward mode) or, given cotangents, their vector-Jacobian products. Chunk results
are additive; the executor sums them.

:class:`InProcessExecutor` runs everything in this process (the default for small work);
:mod:`jacana.facility.dask_executor` runs the same functions on dask workers.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from jacana.stages.analysis import SoftConfig, add_yields, chunk_yields, soft_config
import dataclasses

from jacana.stages.batch import ChunkBatches, EventBatch, block_size_for, regroupable_batches, to_device
from jacana.stages.columns import read_ahead, read_chunk
from jacana.stages.errors import FilesetError, InputFileError
from jacana.stages.fileset import Chunk
from jacana.stages.jacobian import yields_and_jacobian, yields_vjp
from jacana.stages.stats.sensitivity import yields_key
from jacana.stages.spec import AnalysisSpec

from jacana.facility.hardrun import InputReport


#: Events per compiled call: every call has this many events, so each (jet bucket, file kind)
#: compiles once however many chunks and events there are.
CALL_EVENTS = 4096
#: Lepton slots of every batch (widened on demand to the next power of two).
LEPTON_WIDTH = 4


def _aligned_zeros(shape, dtype, align: int = 64) -> np.ndarray:
    """Zeros whose data starts on an ``align``-byte boundary: JAX's CPU client then uses the
    numpy buffer as the device buffer (no copy); numpy's own 16-byte alignment makes it copy
    about three arrays in four."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def rebatch(parts: Iterable[EventBatch], lepton_width: int = LEPTON_WIDTH,
            call_events: int = CALL_EVENTS) -> list[EventBatch]:
    """Regroup dense batches into fixed-shape calls: one shape per (jet bucket, kinematic set).

    Events of the same jet bucket from any number of chunks are concatenated (padding events
    dropped), lepton slots widened to a common width, and cut into calls of exactly
    ``call_events`` events (the last padded with zero-weight events), processed in blocks of
    :func:`~jacana.stages.batch.block_size_for` events.
    """
    groups: dict[tuple, list[EventBatch]] = {}
    for p in parts:
        groups.setdefault((p.n_jets, p.kinematic, p.weight_variations), []).append(p)
    out = []
    for (n_jets, kinematic, wv), members in sorted(groups.items(), key=lambda kv: kv[0][0]):
        block = min(block_size_for(n_jets), call_events)
        width = max([lepton_width] + [m.lepton_pt.shape[1] for m in members])
        width = 1 << (width - 1).bit_length()
        # each field written once into its zero-padded [n_calls * call, ...] array (padding is 0/False);
        # a call's slice starts at a multiple of call x row bytes, so it keeps the 64-byte alignment
        masks = [np.asarray(m.event_mask) for m in members]
        counts = [int(k.sum()) for k in masks]
        rows = [slice(None, c) if k[:c].all() else k for k, c in zip(masks, counts)]  # real events first
        call = call_events
        n_calls = max(1, -(-sum(counts) // call))
        fields = {}
        for f in dataclasses.fields(EventBatch):
            if f.metadata.get("static"):
                continue
            first = np.asarray(getattr(members[0], f.name))
            shape = [n_calls * call, *first.shape[1:]]
            if f.name.startswith("lepton_"):
                shape[1] = width
            dense = _aligned_zeros(shape, first.dtype)
            at = 0
            for m, r, c in zip(members, rows, counts):
                a = np.asarray(getattr(m, f.name))[r]
                if f.name.startswith("lepton_"):
                    dense[at:at + c, :a.shape[1]] = a
                else:
                    dense[at:at + c] = a
                at += c
            fields[f.name] = dense
        for i in range(n_calls):
            sl = slice(i * call, (i + 1) * call)
            out.append(EventBatch(**{k: v[sl] for k, v in fields.items()}, kinematic=kinematic,
                                  weight_variations=wv, block_size=block))
    return out


def load_batches(chunk: Chunk, spec: AnalysisSpec, dtype=np.float64) -> ChunkBatches:
    """Read one chunk and densify it (events that cannot pass at any parameter values dropped)."""
    return regroupable_batches(read_chunk(chunk, spec), spec, dtype=dtype)


class InProcessExecutor:
    """Batches in this process's memory (device memory under JAX); steps run here."""

    def __init__(self, spec: AnalysisSpec, chunks: Iterable[Chunk], dtype=np.float64, progress: bool = False,
                 report: InputReport | None = None):
        self.spec = spec
        self.config: SoftConfig = soft_config(spec)
        self.report = report or InputReport()
        self.batches: dict[str, list[EventBatch]] = {}
        self.n_events = 0
        parts: dict[str, list[EventBatch]] = {}
        chunks = list(chunks)
        reads = read_ahead(chunks, spec)  # the next chunk is read while this one is densified
        for chunk, future in tqdm(reads, total=len(chunks), desc="reading", unit="chunk", disable=not progress):
            if self.report.should_skip(chunk):
                continue
            try:
                columns = future.result()
            except InputFileError as exc:
                self.report.file_failed(chunk, exc)
                continue
            self.report.columns_read(columns)
            batches = regroupable_batches(columns, spec, dtype=dtype)
            parts.setdefault(yields_key(chunk.sample, chunk.variation), []).extend(batches.parts)
            self.n_events += chunk.n_events
        for key, group in parts.items():
            self.batches[key] = to_device(rebatch(group))
        expected = {yields_key(s, v) for s in spec.samples for v in spec.file_variations(s)}
        missing = sorted(expected - set(self.batches))
        if missing:
            raise FilesetError(f"no readable chunk for {missing}")

    def yields(self, params: Mapping, relax: Mapping) -> dict:
        """Soft yields per (sample, file variation), summed over chunks."""
        return {key: chunk_yields(params, relax, parts, self.config) for key, parts in self.batches.items()}

    def yields_and_jacobian(self, params: Mapping, relax: Mapping) -> tuple[dict, dict]:
        """(yields, d yields / d params) per (sample, file variation): forward mode, one pass."""
        ylds, jacs = {}, {}
        for key, parts in self.batches.items():
            ylds[key], jacs[key] = yields_and_jacobian(params, relax, parts, self.config)
        return ylds, jacs

    def yields_vjp(self, params: Mapping, relax: Mapping, cotangents: Mapping) -> tuple[dict, dict]:
        """(yields, sum over (sample, variation) of cotangent . d yields / d params): reverse mode."""
        ylds, grad = {}, None
        for key, parts in self.batches.items():
            ylds[key], g = yields_vjp(params, relax, parts, self.config, cotangents[key])
            grad = add_yields(grad, g)
        return ylds, grad

    def close(self) -> None:
        self.batches.clear()


def contract_all(jacobians: Mapping, cotangents: Mapping) -> dict:
    """d(objective)/d(params) = sum over (sample, variation, region, bin) of cotangent x Jacobian."""
    from jacana.stages.jacobian import contract

    grad: dict = {}
    for key, jac in jacobians.items():
        for name, g in contract(jac, cotangents[key]).items():
            grad[name] = g if name not in grad else grad[name] + g
    return jax.tree.map(np.asarray, grad)
