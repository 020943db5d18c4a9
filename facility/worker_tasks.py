"""The worker side of :mod:`jacana.facility.dask_executor`: the tasks dask runs on workers.

Module-level functions only (dask pickles a reference to them, never a closure), in a module
that imports no JAX at load time: since distributed 2023.4 the *scheduler* unpickles every task
it receives, which imports the module that defines the task's function. With the tasks in
``dask_executor`` (which imports JAX, about 2 s) a fresh scheduler spent that long on the
first pass's first task and then held JAX in its memory. This module needs numpy and jacana's
protocol and config modules only (0.2 s); JAX and the stages are imported inside the tasks, on
the workers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jacana.protocol.message import Message, decode, encode
from jacana.protocol.pipeline import reduce_partials
from jacana.protocol.provenance import Provenance
from jacana.stages.errors import InputFileError
from jacana.stages.fileset import Chunk
from jacana.stages.spec import AnalysisSpec

_SPEC_CACHE: dict[str, tuple] = {}


def spec_and_config(spec_dict: Mapping):
    """(AnalysisSpec, SoftConfig) of a config dict, built once per worker process."""
    from jacana.stages.analysis import soft_config

    token = json.dumps(spec_dict, sort_keys=True, default=str)
    if token not in _SPEC_CACHE:
        spec = AnalysisSpec(spec_dict)
        _SPEC_CACHE[token] = (spec, soft_config(spec))
    return _SPEC_CACHE[token]


@dataclasses.dataclass
class ChunkLoad:
    """The dense (numpy) batches of one chunk, or why it could not be read. Lives on a worker."""

    index: int
    chunk: Chunk
    parts: tuple
    nonfinite: dict
    error: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(np.asarray(a).nbytes) for p in self.parts for a in jax.tree.leaves(p))


def load_chunk_task(index: int, chunk: Mapping, spec_dict: Mapping, dtype: str = "float64") -> ChunkLoad:
    """Read chunk ``index`` (a plain dict of :class:`Chunk` fields) and densify it.

    A file that cannot be read is not raised here: the driver applies its bad-file policy.
    """
    from jacana.stages.batch import regroupable_batches
    from jacana.stages.columns import read_chunk

    spec, _ = spec_and_config(spec_dict)
    c = Chunk(**chunk)
    try:
        columns = read_chunk(c, spec)
    except InputFileError as exc:
        return ChunkLoad(index, c, (), {}, error=str(exc))
    batches = regroupable_batches(columns, spec, dtype=np.dtype(dtype))
    return ChunkLoad(index, c, tuple(batches.parts), dict(columns.nonfinite))


def chunk_summary_task(load: ChunkLoad) -> dict:
    """What the planner needs of a loaded chunk: events per jet bucket, errors, masked values."""
    return {"index": load.index, "error": load.error, "nonfinite": load.nonfinite,
            "parts": [[p.bucket_width, int(np.asarray(p.event_mask).sum()), len(p.kinematic)] for p in load.parts],
            "nbytes": load.nbytes}


def _unit_set(units: Sequence) -> set:
    """``units`` ([key, n_jets], as they cross from the driver) as a set of tuples."""
    return {(k, int(n)) for k, n in units}


def _parts_in(load: ChunkLoad, wanted: set) -> tuple[str, tuple]:
    """(the chunk's key, its parts whose (key, jet bucket) unit is in ``wanted``)."""
    from jacana.stages.stats.sensitivity import yields_key

    key = yields_key(load.chunk.sample, load.chunk.variation)
    return key, tuple(p for p in load.parts if (key, p.bucket_width) in wanted)


def select_parts_task(load: ChunkLoad, units: Sequence) -> ChunkLoad:
    """The parts of ``load`` that belong to ``units`` ([key, n_jets]): what another worker's shard
    needs of this chunk, so that only those arrays travel (no copy on this worker)."""
    return dataclasses.replace(load, parts=_parts_in(load, _unit_set(units))[1])


@dataclasses.dataclass
class WorkerShard:
    """A shard's fixed-shape calls per (sample, file variation), on the worker's JAX device."""

    index: int
    n_shards: int
    config: Any
    batches: dict
    provenance: tuple
    ledger_events: np.ndarray  # [n_chunks] events counted per chunk
    ledger_parts: np.ndarray  # [n_chunks] jet-bucket parts counted per chunk
    nbytes: int = 0
    keys: tuple = ()  # every (sample, file variation) the analysis needs: each response carries all of them
    stage_factory: Any = None  # what runs on the batches (default: jacana.stages.soft_stage.SoftYieldsStage)

    def serve_bytes(self, request: bytes) -> bytes:
        """Answer one encoded request (:func:`step_task`): what :func:`jacana.protocol.transport.serve_task` calls."""
        return step_task(self, request)


def build_shard_task(index: int, n_shards: int, spec_dict: Mapping, units: Sequence, owned: Sequence[Mapping],
                     n_chunks: int, stage_factory: Any, *loads: ChunkLoad) -> WorkerShard:
    """Regroup the ``units`` ([key, n_jets]) of the given chunk loads into calls kept on this worker."""
    from jacana.stages.batch import to_device

    from jacana.facility.devices import platform_of_default_device
    from jacana.facility.executor import merges_keys, resident_calls

    from jacana.stages.soft_stage import SoftYieldsStage
    from jacana.stages.stats.sensitivity import yields_key
    from jacana.stages.stats.stage import analysis_keys

    spec, config = spec_and_config(spec_dict)
    wanted = _unit_set(units)
    groups: dict[tuple, list] = {}  # per (sample, file variation)
    events = np.zeros(n_chunks, np.int64)
    parts = np.zeros(n_chunks, np.int64)
    for load in sorted(loads, key=lambda ld: ld.index):  # chunk order: the in-process concatenation order
        _, mine = _parts_in(load, wanted)
        for p in mine:
            groups.setdefault((load.chunk.sample, load.chunk.variation), []).append(p)
            events[load.index] += int(np.asarray(p.event_mask).sum())
            parts[load.index] += 1
    factory = stage_factory or SoftYieldsStage
    calls = resident_calls(groups, merge=merges_keys(factory, platform_of_default_device()))
    batches = {yields_key(*key): to_device(group) for key, group in calls.items()}
    nbytes = sum(int(a.nbytes) for group in batches.values() for b in group for a in _arrays(b))
    prov = tuple(Provenance(**p) for p in owned)
    return WorkerShard(index, n_shards, config, batches, prov, events, parts, nbytes, analysis_keys(spec),
                       stage_factory)


def _arrays(batch) -> list:
    """Every array of a batch (any batch type: its pytree leaves)."""
    return jax.tree.leaves(batch)


#: Tensors a shard adds to every response: events and parts counted per chunk, the shard's times.
LEDGER = ("ledger.events", "ledger.parts", "timing.wall", "timing.cpu")


def shard_stage(shard: WorkerShard, request: Message):
    """The shard's :class:`~jacana.stages.soft_stage.SoftYieldsStage` for the request's parameter
    layout (built once per layout; every layout shares the shard's batches)."""
    from jacana.stages.soft_stage import SoftYieldsStage
    from jacana.stages.stats.sensitivity import KEY_SEP

    factory = shard.stage_factory or SoftYieldsStage

    params = {n: request.tensors[n] for n in request.param_names}
    program = request.meta.get("apply_program", "auto") if isinstance(request.meta, Mapping) else "auto"
    layout = (tuple((n, np.shape(v)) for n, v in params.items()), program)
    cache = shard.__dict__.setdefault("_stages", {})
    if layout not in cache:
        batches = {tuple(k.split(KEY_SEP, 1)): v for k, v in shard.batches.items()}
        from jacana.protocol.tree import unflatten

        cache[layout] = factory(shard.config, shard.keys, unflatten(params), batches,
                                **({} if program == "auto" else {"apply_program": program}))
    return cache[layout]


def step_task(shard: WorkerShard, request: bytes) -> bytes:
    """Answer one request message with the shard's stage (:func:`jacana.protocol.rpc.handle`) and
    add the shard's ledger and timings (:data:`LEDGER`) and provenance to the response."""
    from jacana.protocol.rpc import error_message, handle, split_request

    t0, c0 = time.perf_counter(), time.process_time()
    req = decode(request)
    try:
        split_request(req)  # the parameters match their digest before any work
        stage = shard_stage(shard, req)
    except Exception as exc:
        return encode(error_message(exc, req))
    resp = handle(stage, req)
    if resp.kind == "error":
        return encode(resp)
    out = dict(resp.tensors)
    out["ledger.events"] = shard.ledger_events
    out["ledger.parts"] = shard.ledger_parts
    for name, value in (("timing.wall", time.perf_counter() - t0), ("timing.cpu", time.process_time() - c0)):
        out[name] = np.zeros(shard.n_shards)
        out[name][shard.index] = value
    return encode(dataclasses.replace(resp, tensors=out, provenance=shard.provenance))


def sum_messages_task(*blobs: bytes) -> bytes:
    """Sum partial response messages (provenance checked: no chunk twice, no overlap)."""
    return encode(reduce_partials([decode(b) for b in blobs]))


def noop_task(x=None):
    """A task that does nothing (to measure the per-task overhead of a cluster)."""
    return x


def _register_sizeof() -> None:
    """Tell dask how big worker-resident objects are (so it never thinks moving them is free)."""
    try:
        from dask.sizeof import sizeof
    except ImportError:  # pragma: no cover
        return
    sizeof.register(WorkerShard)(lambda s: int(s.nbytes) + 1024)
    sizeof.register(ChunkLoad)(lambda ld: ld.nbytes + 1024)


_register_sizeof()


