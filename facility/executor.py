"""Executors: where an additive stage runs over chunks of events, behind one interface.

An executor reads every chunk once, keeps its dense batches where they were read (this
process, or dask workers' memory), and offers the analysis' per-chunk work as one
:class:`~jacana.protocol.stage.Stage` (:meth:`Executor.stage`): the soft yields of every
(sample, file variation) with their Jacobians or VJPs, summed over every chunk it holds. What
runs on each part of the data is always :class:`~jacana.stages.soft_stage.SoftYieldsStage`;
what crosses a process boundary is always a protocol message.

:class:`InProcessExecutor` runs everything in this process (the default for small work);
:class:`jacana.facility.dask_executor.DaskExecutor` on dask workers; the coffea processor
(:mod:`jacana.facility.coffea_adapter`) inside coffea's Runner. :func:`jacana.facility.factory.make_executor`
chooses one from the options.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

import jax
import numpy as np
from tqdm.auto import tqdm

from jacana.protocol.stage import Stage
from jacana.stages.analysis import SoftConfig, default_params, soft_config
from jacana.stages.batch import EventBatch, regroupable_batches, to_device
from jacana.stages.shapes import ChunkBatches
from jacana.stages.columns import read_ahead, read_chunk
from jacana.stages.errors import FilesetError, InputFileError
from jacana.stages.fileset import Chunk
from jacana.stages.keyed import Key, KeyedBatch
from jacana.stages.soft_stage import (ChunkStageFactory, SoftYieldsStage, cotangents_from, jacobian_by_key, params_inputs, relax_inputs,
                                      yields_by_key)
from jacana.stages.spec import AnalysisSpec
from jacana.stages.stats.sensitivity import yields_key
from jacana.stages.stats.stage import analysis_keys

from jacana.facility.devices import (CPU_CALL_EVENTS, assign_devices, block_events_for, call_events_for, is_accelerator,
                                     local_devices, platform_of_default_device)
from jacana.facility.hardrun import InputReport


@runtime_checkable
class Executor(Protocol):
    """Where the per-chunk stage runs: the contract every executor meets."""

    spec: AnalysisSpec
    config: SoftConfig
    n_events: int
    report: InputReport

    def stage(self, params_like: Mapping | None = None, apply_program: str = "auto") -> Stage:
        """The additive stage over every chunk held, for parameters named and shaped like ``params_like``
        (default: the analysis' cut parameters): ``relax.*`` inputs, ``yields.*`` outputs.
        ``apply_program``: see :data:`jacana.stages.soft_stage.APPLY_PROGRAMS`."""

    def close(self) -> None:
        """Release the batches (and a cluster started for them)."""


class ExecutorBase:
    """Trees in, trees out: the per-(sample, variation) view of :meth:`Executor.stage` for callers
    that hold parameters, relaxation and cotangents as nested dicts (benchmarks, tests, studies)."""

    spec: AnalysisSpec

    def stage(self, params_like: Mapping | None = None, apply_program: str = "auto") -> Stage:  # pragma: no cover
        raise NotImplementedError

    def _call_args(self, params: Mapping, relax: Mapping, apply_program: str = "auto") -> tuple[Stage, dict, dict]:
        params = default_params(self.spec) if params is None else params
        return self.stage(params, apply_program), params_inputs(params), relax_inputs(relax)

    def yields(self, params: Mapping, relax: Mapping) -> dict:
        """Soft yields per (sample, file variation), summed over chunks (the forward program)."""
        stage, p, i = self._call_args(params, relax, "forward")
        return yields_by_key(stage.apply(p, i))

    def yields_and_jacobian(self, params: Mapping, relax: Mapping) -> tuple[dict, dict]:
        """(yields, d yields / d params) per (sample, file variation): forward mode, one pass."""
        stage, p, i = self._call_args(params, relax)
        outs, jac = stage.jacobian(p, i, tuple(p))
        return yields_by_key(outs), jacobian_by_key(jac, p, tuple(p))

    def yields_vjp(self, params: Mapping, relax: Mapping, cotangents: Mapping) -> tuple[dict, dict]:
        """(yields, sum over (sample, variation) of cotangent . d yields / d params): reverse mode."""
        from jacana.protocol.tree import unflatten

        stage, p, i = self._call_args(params, relax)
        outs = stage.apply(p, i)
        grads = stage.vjp(p, i, cotangents_from(cotangents), tuple(p))
        return yields_by_key(outs), unflatten(grads)


class RequestExecutor(ExecutorBase):
    """An executor whose stage is one protocol round trip per call: :meth:`run` answers a request
    message over all the data the executor holds (a dask cluster's shards, coffea Runner passes)."""

    def stage(self, params_like: Mapping | None = None, apply_program: str = "auto") -> Stage:
        from jacana.protocol.rpc import MessageStage

        params_like = default_params(self.spec) if params_like is None else params_like
        declared = self.stage_factory(self.config, self.keys, params_like).describe()  # no data: the signature
        if apply_program == "auto":
            return MessageStage(self.run, declared)
        return MessageStage(lambda req: self.run(dataclasses.replace(req, meta={**req.meta, "apply_program": apply_program})),
                            declared)

    def run(self, request):  # pragma: no cover -- each executor answers its own way
        raise NotImplementedError


#: Events per compiled call on the CPU: every call has this many events, so each (jet bucket, file
#: kind) compiles once however many chunks and events there are (accelerators: see facility.devices).
CALL_EVENTS = CPU_CALL_EVENTS
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


def rebatch(parts: Iterable, lepton_width: int = LEPTON_WIDTH,
            call_events: int | None = None, platform: str | None = None) -> list:
    """Regroup dense batches into fixed-shape calls: one shape per group (bucket width, kinematic set).

    Works on any batch type with a leading event axis on every array, a ``group_key()``, a
    ``bucket_width`` and a ``widened(path)`` rule (:class:`~jacana.stages.batch.EventBatch`,
    :class:`~jacana.stages.dense.DenseBatch`). Events of one group from any number of chunks are
    concatenated (padding events dropped), the object axes that may differ (the AGC's leptons, a
    general analysis's object sets) widened to a common power of two (at least ``lepton_width``), and cut into calls of
    ``call_events`` events (the last padded with zero-weight events), processed in blocks. The call and block
    sizes suit the ``platform`` (default: JAX's default device; :mod:`jacana.facility.devices`):
    on the CPU calls of 4096 events in cache-sized blocks, on an accelerator one large call per group.
    """
    platform = platform or platform_of_default_device()
    out = []
    for members in _groups((None, p) for p in parts):
        out += [batch for batch, _ in _calls_of(members, lepton_width, call_events, platform)]
    return out


def resident_calls(parts_by_key: Mapping[Key, Sequence], lepton_width: int = LEPTON_WIDTH,
                   call_events: int | None = None, platform: str | None = None,
                   merge: bool | None = None) -> dict[Key, list]:
    """The fixed-shape calls of every (sample, file variation) key's dense parts, as the stage holds them.

    Without ``merge`` each key's parts are regrouped on their own (:func:`rebatch`). With it (the
    default on accelerators) every group of equal shape (file kind, jet bucket) becomes one set of
    calls over all its keys' events, each a :class:`~jacana.stages.keyed.KeyedBatch` listed under
    its first key: a step is then about one call per (file kind, jet bucket), not one per
    (sample, file variation, jet bucket). A group that only one key has stays that key's plain calls.
    The CPU keeps per-key calls: there small calls are what is fastest, and its sums keep their order.
    """
    platform = platform or platform_of_default_device()
    merge = is_accelerator(platform) if merge is None else merge
    if not merge:
        return {tuple(key): rebatch(parts, lepton_width, call_events, platform) for key, parts in parts_by_key.items()}
    keys = [tuple(k) for k in parts_by_key]
    out: dict[Key, list] = {}
    for members in _groups((i, p) for i, key in enumerate(keys) for p in parts_by_key[key]):
        used = sorted({i for i, _ in members})
        if len(used) == 1:
            out.setdefault(keys[used[0]], []).extend(b for b, _ in _calls_of(members, lepton_width, call_events,
                                                                               platform))
            continue
        group_keys = tuple(keys[i] for i in used)
        labelled = [(used.index(i), p) for i, p in members]
        out.setdefault(group_keys[0], []).extend(
            KeyedBatch(b, index, group_keys) for b, index in _calls_of(labelled, lepton_width, call_events, platform,
                                                                       key_index=True))
    return out


def merges_keys(stage_factory, platform: str) -> bool:
    """Whether calls are merged across keys (:func:`resident_calls`): on accelerators, for stage factories
    that take :class:`~jacana.stages.keyed.KeyedBatch` calls (``accepts_keyed_batches``, as
    :class:`~jacana.stages.soft_stage.SoftYieldsStage` does); another stage gets each key's own calls."""
    return is_accelerator(platform) and bool(getattr(stage_factory, "accepts_keyed_batches", False))


def _groups(labelled: Iterable[tuple]) -> list[list[tuple]]:
    """(label, part) pairs grouped by part type and ``group_key()``, by type and bucket width."""
    groups: dict[tuple, list] = {}
    for label, p in labelled:
        groups.setdefault((type(p).__name__,) + p.group_key(), []).append((label, p))
    return [members for _, members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


def _calls_of(members: Sequence[tuple], lepton_width: int, call_events: int | None, platform: str,
              key_index: bool = False) -> list[tuple]:
    """One group's (label, part) pairs as fixed-shape calls: ``(batch, key index [call] int32 or None)``
    (the index: each event's label, with ``key_index``)."""
    first_batch = members[0][1]
    block = block_events_for(first_batch.bucket_width, platform)
    # each field written once into its zero-padded [n_calls * call, ...] array (padding is 0/False);
    # a call's slice starts at a multiple of call x row bytes, so it keeps the 64-byte alignment
    masks = [np.asarray(m.event_mask) for _, m in members]
    counts = [int(k.sum()) for k in masks]
    rows = [slice(None, c) if k[:c].all() else k for k, c in zip(masks, counts)]  # real events first
    call = call_events or call_events_for(platform, sum(counts), block)
    block = min(block, call)
    n_calls = max(1, -(-sum(counts) // call))
    flat = [jax.tree_util.tree_flatten_with_path(m) for _, m in members]
    treedef = flat[0][1]
    leaves = []
    for i, (path, first) in enumerate(flat[0][0]):
        first = np.asarray(first)
        keys = tuple(getattr(k, "name", getattr(k, "key", None)) for k in path)
        shape = [n_calls * call, *first.shape[1:]]
        widen = first_batch.widened(keys)
        if widen:
            width = max([lepton_width] + [np.shape(f[0][i][1])[-1] for f in flat])
            shape[-1] = 1 << (width - 1).bit_length()
        dense = _aligned_zeros(shape, first.dtype)
        at = 0
        for f, r, c in zip(flat, rows, counts):
            a = np.asarray(f[0][i][1])[r]
            if widen:
                dense[at:at + c, ..., :a.shape[-1]] = a
            else:
                dense[at:at + c] = a
            at += c
        leaves.append(dense)
    index = None
    if key_index:
        index = _aligned_zeros([n_calls * call], np.int32)
        index[:sum(counts)] = np.repeat([label for label, _ in members], counts)
    out = []
    for i in range(n_calls):
        sl = slice(i * call, (i + 1) * call)
        batch = jax.tree_util.tree_unflatten(treedef, [v[sl] for v in leaves])
        out.append((dataclasses.replace(batch, block_size=block), None if index is None else index[sl]))
    return out


def load_batches(chunk: Chunk, spec: AnalysisSpec, dtype=np.float64) -> ChunkBatches:
    """Read one chunk and densify it (events that cannot pass at any parameter values dropped)."""
    return regroupable_batches(read_chunk(chunk, spec), spec, dtype=dtype)


class InProcessExecutor(ExecutorBase):
    """Batches in this process's memory (device memory under JAX); steps run here, no messages.

    ``stage_factory`` builds the stage that runs on the batches (default: the soft analysis,
    :class:`~jacana.stages.soft_stage.SoftYieldsStage`; see :data:`~jacana.stages.soft_stage.ChunkStageFactory`)."""

    def __init__(self, spec: AnalysisSpec, chunks: Iterable[Chunk], dtype=np.float64, progress: bool = False,
                 report: InputReport | None = None, stage_factory: ChunkStageFactory = SoftYieldsStage,
                 devices: Sequence | None = None, platform: str | None = None):
        self.spec = spec
        self.stage_factory = stage_factory
        self.config: SoftConfig = soft_config(spec)
        self.report = report or InputReport()
        self.batches: dict[str, list[EventBatch]] = {}
        self.n_events = 0
        parts: dict[Key, list[EventBatch]] = {}
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
            parts.setdefault((chunk.sample, chunk.variation), []).extend(batches.parts)
            self.n_events += chunk.n_events
        self.devices = list(devices) if devices is not None else local_devices()
        if not self.devices:
            raise ValueError("devices: at least one JAX device is needed")
        self.platform = platform or self.devices[0].platform
        calls = resident_calls(parts, platform=self.platform, merge=merges_keys(stage_factory, self.platform))
        if len(self.devices) == 1:
            for key, group in calls.items():
                self.batches[yields_key(*key)] = to_device(group)
        else:  # several GPUs of a node (or a split host): each call lives on one device; JAX runs them all at once
            flat = [(key, b) for key, group in calls.items() for b in group]
            where = assign_devices([b.n_padded * max(b.bucket_width, 1) for _, b in flat], len(self.devices))
            for (key, b), d in zip(flat, where):
                self.batches.setdefault(yields_key(*key), []).append(jax.device_put(b, self.devices[d]))
        self.keys = analysis_keys(spec)
        missing = sorted({yields_key(*k) for k in self.keys} - {yields_key(*k) for k in parts})
        if missing:
            raise FilesetError(f"no readable chunk for {missing}")
        self._stages: dict = {}

    def stage(self, params_like: Mapping | None = None, apply_program: str = "auto") -> SoftYieldsStage:
        params_like = default_params(self.spec) if params_like is None else params_like
        layout = (tuple((k, np.shape(v)) for k, v in params_inputs(params_like).items()), apply_program)
        if layout not in self._stages:  # one stage per parameter layout; all share the batches
            batches = {k: self.batches.get(yields_key(*k), []) for k in self.keys}
            self._stages[layout] = self.stage_factory(self.config, self.keys, params_like, batches,
                                                      **({} if apply_program == "auto" else {"apply_program": apply_program}))
        return self._stages[layout]

    def calls(self) -> list:
        """Every compiled call of one pass, once each (a :class:`~jacana.stages.keyed.KeyedBatch` is
        listed under its first key only)."""
        return [b for group in self.batches.values() for b in group]

    def close(self) -> None:
        self.batches.clear()
        self._stages.clear()
