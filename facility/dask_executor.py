"""The soft analysis on dask workers: batches stay where they were read, one message per step.

:class:`DaskExecutor` answers exactly what :class:`~jacana.facility.executor.InProcessExecutor`
answers (``yields``, ``yields_and_jacobian``, ``yields_vjp``, ``config``, ``n_events``,
``report``, ``close``), on a local dask cluster (``workers=N``), any running scheduler
(``scheduler="tcp://..."``), a facility profile (``profile="coffea-casa"``, see
:mod:`jacana.facility.profiles`) or a :class:`distributed.Client` you already have.

Reading (once)
    One task per chunk (:func:`load_chunk_task`) reads it and densifies it with
    :func:`~jacana.stages.batch.regroupable_batches` (prefiltered, unpadded), on a worker chosen
    beforehand (:func:`place_chunks`: the chunks of one sample and variation together where the
    balance of events allows). The driver then gets a few numbers per chunk (events per jet
    bucket) and plans the work: every (sample, file variation, jet bucket) *unit* goes to one
    shard, balancing the estimated compute per shard and preferring the worker that read the
    unit's events (longest-processing-time first). One task per shard (:func:`build_shard_task`) regroups its units into the same
    fixed-shape calls as the in-process executor (:func:`~jacana.facility.executor.rebatch`);
    of a chunk read on another worker it receives only the parts it needs
    (:func:`select_parts_task` runs where the chunk is). The shards stay in worker memory: the
    driver holds the shard futures, so dask keeps them there, and recomputes them from their
    task graph (re-reading the chunks elsewhere) if a worker is lost.

One step
    The driver encodes one request message (parameters, relaxation, and for reverse mode the
    cotangents; :mod:`jacana.protocol.message`) and submits :func:`step_task` once per shard.
    Each returns one encoded response message: the yields of every (sample, file variation),
    their packed Jacobians (``jacobian:<name>``, last axis over the parameters) or the VJP
    (``cotangent:<param>``), the provenance of the chunks it answers for, and a ledger of the
    events and parts it counted per chunk. :func:`sum_messages_task` sums them in a binary tree
    on the cluster (:func:`~jacana.protocol.pipeline.reduce_partials`: duplicates and overlaps
    are refused), so one message reaches the driver, which checks that the provenance is exactly
    the expected chunk list and the ledger exactly the events that were read.

Only module-level functions, plain data (chunk descriptions, the analysis config as a dict)
and message bytes cross between driver and workers; every worker compiles each call shape
once (the persistent compilation cache in ``$JACANA_CACHE`` is shared by workers on one
machine).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

from jacana.protocol.errors import JacanaError, ProvenanceError
from jacana.protocol.message import Message, decode, encode
from jacana.protocol.provenance import Provenance, merge
from jacana.protocol.rpc import raise_if_error
from jacana.protocol.transport import DaskTransport
from jacana.stages.errors import FilesetError, InputFileError
from jacana.stages.fileset import Chunk
from jacana.stages.spec import AnalysisSpec

from jacana.facility.executor import CALL_EVENTS, RequestExecutor
from jacana.facility.hardrun import InputReport
from jacana.facility.errors import FacilityError
from jacana.facility.profiles import (announce_dashboard, connect, connect_scheduler, dashboard_address, load_profile,
                                      plugin_for)

#: Balance tolerance of the planner: a unit stays on the worker holding its events when that
#: shard's load is within this fraction of the mean shard load of the lightest shard.
LOCALITY_SLACK = 0.05

# Worker side: the tasks live in :mod:`jacana.facility.worker_tasks` (no JAX at import, for the scheduler)
from jacana.facility.worker_tasks import (LEDGER, ChunkLoad, WorkerShard, build_shard_task,  # noqa: E402,F401
                                          chunk_summary_task, load_chunk_task, noop_task, select_parts_task,
                                          step_task, sum_messages_task)


async def _wait_all(futures) -> None:
    from distributed.client import _wait

    await _wait(futures)

# =========================================================================================
# Driver side
# =========================================================================================
def _unit_cost(n_jets: int, events: int, n_var: int) -> float:
    """Estimated compute of one (key, jet bucket) unit: padded events x trijets x variations."""
    calls = max(1, math.ceil(events / CALL_EVENTS))
    return calls * CALL_EVENTS * (max(math.comb(n_jets, 3), 1) + n_jets) * max(n_var, 1)


def plan_shards(summaries: Sequence[Mapping], keys_of: Sequence[str], where: Sequence[str | None],
                n_shards: int, shard_worker: Sequence[str]) -> tuple[list[list], list[int], list[float]]:
    """Assign (key, jet bucket) units to shards: LPT on estimated cost, preferring data locality.

    Returns (units per shard, owner shard per chunk, estimated cost per shard).
    """
    units: dict[tuple[str, int], dict] = {}
    for s in summaries:
        if s["error"] is not None:
            continue
        for n_jets, events, n_var in s["parts"]:
            u = units.setdefault((keys_of[s["index"]], n_jets), {"events": 0, "n_var": n_var, "local": Counter()})
            u["events"] += events
            u["local"][where[s["index"]]] += events
    costs = {k: _unit_cost(k[1], u["events"], u["n_var"]) for k, u in units.items()}
    mean = sum(costs.values()) / max(n_shards, 1)
    load = [0.0] * n_shards
    assign: dict[tuple[str, int], int] = {}
    for k in sorted(units, key=lambda k: (-costs[k], k)):
        best = min(range(n_shards), key=lambda i: (load[i], i))
        choice = best
        home = units[k]["local"].most_common(1)[0][0] if units[k]["local"] else None
        for i in sorted(range(n_shards), key=lambda i: (load[i], i)):
            if shard_worker[i] == home and load[i] <= load[best] + LOCALITY_SLACK * mean:
                choice = i
                break
        assign[k] = choice
        load[choice] += costs[k]
    per_shard: list[list] = [[] for _ in range(n_shards)]
    for k, i in sorted(assign.items()):
        per_shard[i].append([k[0], k[1]])
    owner = []
    for s in summaries:
        best = max(s["parts"], key=lambda p: p[1], default=None) if s["error"] is None else None
        owner.append(assign[(keys_of[s["index"]], best[0])] if best else s["index"] % n_shards)
    return per_shard, owner, load


def place_chunks(chunks: Sequence[Chunk], keys_of: Sequence[str], workers: Sequence[str]) -> list[str]:
    """The worker to read each chunk on, before anything is read: balanced, keys kept together.

    The shards are planned per (sample, file variation, jet bucket) unit after reading, and a
    unit whose events were read on several workers is moved to one of them (a transfer of
    densified arrays, slow on small machines). So each key (largest first) goes whole to the
    least-loaded worker when that keeps it within ``LOCALITY_SLACK`` of an even share of the
    events; a key too big for that is spread chunk by chunk (largest first, least-loaded worker).
    """
    cost = [c.n_events for c in chunks]
    per_key: dict[str, list[int]] = {}
    for i, k in enumerate(keys_of):
        per_key.setdefault(k, []).append(i)
    limit = sum(cost) / max(len(workers), 1) * (1 + LOCALITY_SLACK)
    load = [0] * len(workers)
    out: list[str] = [workers[0]] * len(chunks)
    for k in sorted(per_key, key=lambda k: (-sum(cost[i] for i in per_key[k]), k)):
        best = min(range(len(workers)), key=lambda w: (load[w], w))
        whole = load[best] + sum(cost[i] for i in per_key[k]) <= limit
        for i in sorted(per_key[k], key=lambda i: (-cost[i], i)):
            w = best if whole else min(range(len(workers)), key=lambda w: (load[w], w))
            load[w] += cost[i]
            out[i] = workers[w]
    return out


class DaskExecutor(RequestExecutor):
    """The executor interface on dask workers (see the module docstring).

    Exactly one of ``client`` (an existing :class:`distributed.Client`: a notebook's),
    ``scheduler`` (an address), ``workers`` (a local cluster of that many processes) or
    ``profile`` (a facility profile name or path; ``workers`` then overrides its size) says
    where. A cluster or client created here is closed by :meth:`close`.
    """

    def __init__(self, spec: AnalysisSpec, chunks: Iterable[Chunk], *, client=None, scheduler: str | None = None,
                 workers: int | None = None, profile: str | Mapping | None = None, dtype=np.float64,
                 progress: bool = False, report: InputReport | None = None, shards_per_worker: int = 1,
                 connect_timeout: float | None = None, timeout: float | None = 3600.0, plugin: bool = True,
                 stage_factory=None):
        from jacana.stages.analysis import soft_config
        from jacana.stages.stats.sensitivity import yields_key

        from jacana.stages.soft_stage import SoftYieldsStage

        self.spec = spec
        self.stage_factory = stage_factory or SoftYieldsStage  # pickled by reference: importable on the workers
        self.config = soft_config(spec)
        self.report = report or InputReport()
        self.timeout = timeout
        self.cluster = None
        self._own_client = False
        self._token = uuid.uuid4().hex[:8]
        self._step = 0
        self.shards: list = []
        self.last_step: dict = {}
        self._spw = max(1, int(shards_per_worker))
        prof = None
        if sum(x is not None for x in (client, scheduler, profile)) > 1:
            raise FacilityError("give one of client, scheduler or profile (workers may size a local or profile cluster)")
        if client is not None:
            self.client = client
        elif scheduler is not None:
            self.client = connect_scheduler(scheduler, 10.0 if connect_timeout is None else connect_timeout)
            self._own_client = True
        else:
            prof = load_profile(profile or "local", workers=workers, connect_timeout=connect_timeout)
            self.client, self.cluster = connect(prof)
            self._own_client = True
        if progress and (prof is None or prof["kind"] != "local" or dashboard_address(prof) is not None):
            announce_dashboard(self.client)  # once per link: where to watch the tasks (a local cluster may have none)
        try:
            self._setup(spec, list(chunks), prof, plugin, workers, dtype, progress, yields_key)
        except BaseException:
            self.close()
            raise

    # -- reading ----------------------------------------------------------------------------
    def _setup(self, spec, chunks, prof, plugin, workers, dtype, progress, yields_key) -> None:
        from distributed import as_completed
        from tqdm.auto import tqdm

        from jacana.facility.plugin import JacanaWorkerPlugin

        wait_n = workers or (prof.get("workers") if prof and prof["kind"] in ("local",) else None) or 1
        wait_timeout = float(prof["connect_timeout"]) if prof else 60.0
        try:
            self.client.wait_for_workers(int(wait_n), timeout=wait_timeout)
        except TimeoutError:
            raise FacilityError(f"no {wait_n} dask workers joined within {wait_timeout:g} s") from None
        self.resources = dict(prof.get("task_resources", {})) if prof else {}
        if plugin:
            try:
                self.client.register_plugin(plugin_for(prof) if prof else JacanaWorkerPlugin(), name="jacana")
            except FacilityError:
                raise
            except Exception as exc:
                raise FacilityError(f"setting up the dask workers failed: {type(exc).__name__}: {exc}") from exc
        self.workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        spec_dict = spec.to_dict()
        keys_of = [yields_key(c.sample, c.variation) for c in chunks]
        todo = [i for i, c in enumerate(chunks) if not self.report.should_skip(c)]
        t0 = time.perf_counter()
        placed = place_chunks([chunks[i] for i in todo], [keys_of[i] for i in todo], self.workers)
        # allow_other_workers: a lost worker's chunks are read elsewhere
        loads = {i: self.client.submit(load_chunk_task, i, dataclasses.asdict(chunks[i]), spec_dict,
                                       np.dtype(dtype).name, pure=False, key=f"jacana-load-{self._token}-{i}",
                                       workers=[w], allow_other_workers=True)
                 for i, w in zip(todo, placed)}
        summaries_f = {i: self.client.submit(chunk_summary_task, f, pure=False, key=f"jacana-summary-{self._token}-{i}")
                       for i, f in loads.items()}
        for _ in tqdm(as_completed(list(summaries_f.values()), loop=self.client.loop), total=len(summaries_f), desc="reading", unit="chunk",
                      disable=not progress):
            pass
        summaries = self.client.gather([summaries_f[i] for i in todo])
        by_index = {s["index"]: s for s in summaries}
        ok = []
        for i in todo:
            s, c = by_index[i], chunks[i]
            if s["error"] is not None:
                msg = s["error"][len(c.path) + 2:] if s["error"].startswith(c.path + ": ") else s["error"]
                self.report.file_failed(c, InputFileError(c.path, msg))  # raises under the "fail" policy
                continue
            self.report.nonfinite_read(c, s["nonfinite"])
            ok.append(i)
        for i in todo:
            if i not in ok:
                loads.pop(i).release()
        self.n_events = sum(chunks[i].n_events for i in ok)
        expected_keys = [(s, v) for s in spec.samples for v in spec.file_variations(s)]
        missing = sorted({yields_key(s, v) for s, v in expected_keys} - {keys_of[i] for i in ok})
        if missing:
            raise FilesetError(f"no readable chunk for {missing}")
        self.keys = tuple(expected_keys)
        # plan: where each chunk was read; units to shards
        who = self.client.who_has([loads[i] for i in ok])
        where = [None] * len(chunks)
        for i in ok:
            holders = who.get(loads[i].key) or []
            where[i] = holders[0] if holders else None
        n_shards = max(1, len(self.workers) * self._spw)
        shard_worker = [self.workers[i % len(self.workers)] for i in range(n_shards)]
        ok_summaries = [by_index[i] for i in ok]
        per_shard, owner_of, self.shard_costs = plan_shards(
            [dict(s, index=j) for j, s in enumerate(ok_summaries)], [keys_of[i] for i in ok],
            [where[i] for i in ok], n_shards, shard_worker)
        self.chunks = [chunks[i] for i in ok]
        self.expected = [Provenance(c.path, c.entry_start, c.entry_stop, c.n_events) for c in self.chunks]
        self._expected_events = np.array([sum(p[1] for p in s["parts"]) for s in ok_summaries], np.int64)
        self._expected_parts = np.array([len(s["parts"]) for s in ok_summaries], np.int64)
        self.loaded_bytes = sum(s["nbytes"] for s in ok_summaries)
        # build the shards (the chunk futures are released once every shard holds its calls)
        ok_loads = [loads[i] for i in ok]
        shards = []
        for si in range(n_shards):
            units = per_shard[si]
            unit_set = {(k, n) for k, n in units}
            needed = [j for j, s in enumerate(ok_summaries)
                      if any((keys_of[ok[j]], p[0]) in unit_set for p in s["parts"])]
            owned = [dataclasses.asdict(self.expected[j]) for j in range(len(ok)) if owner_of[j] == si]
            # a chunk read on another worker sends only the parts this shard needs
            deps = [ok_loads[j] if where[ok[j]] == shard_worker[si] else self.client.submit(
                        select_parts_task, ok_loads[j], units, pure=False, key=f"jacana-select-{self._token}-{si}-{j}",
                        workers=[where[ok[j]]] if where[ok[j]] else None, allow_other_workers=True)
                    for j in needed]
            shards.append(self.client.submit(
                build_shard_task, si, n_shards, spec_dict, units, owned, len(ok), self.stage_factory, *deps,
                pure=False, key=f"jacana-shard-{self._token}-{si}", workers=[shard_worker[si]],
                allow_other_workers=True, resources=self.resources or None))
        self.client.sync(_wait_all, shards)
        for f in shards:
            if f.status == "error":
                raise FacilityError(f"building a shard failed: {f.exception()!r}") from f.exception()
        self.shards = shards
        del loads, ok_loads
        self.read_seconds = time.perf_counter() - t0

    # -- steps ------------------------------------------------------------------------------
    def run(self, request: Message) -> Message:
        """One request on the cluster: the summed, checked response message (ledger and timings removed)."""
        if not self.shards:
            raise FacilityError("this executor is closed")
        t0 = time.perf_counter()
        self._step += 1
        step, data = self._step, encode(request)
        level = [DaskTransport(shard, self.client).submit(data, key=f"jacana-step-{self._token}-{step}-{i}",
                                                          resources=self.resources or None)
                 for i, shard in enumerate(self.shards)]
        n_tasks, depth = len(level), 0
        while len(level) > 1:
            depth += 1
            nxt = [self.client.submit(sum_messages_task, *level[j:j + 2], pure=False,
                                      key=f"jacana-sum-{self._token}-{step}-{depth}-{j // 2}")
                   if j + 1 < len(level) else level[j] for j in range(0, len(level), 2)]
            n_tasks += sum(1 for j in range(0, len(level), 2) if j + 1 < len(level))
            level = nxt
        try:
            reply = level[0].result(timeout=self.timeout)
        except TimeoutError:
            raise FacilityError(f"step {step} took longer than {self.timeout} s on the cluster") from None
        except JacanaError:
            raise
        except Exception as exc:
            raise FacilityError(f"step {step} failed on the cluster: {type(exc).__name__}: {exc}") from exc
        if not isinstance(reply, (bytes, bytearray)):
            raise FacilityError(f"step {step}: the cluster returned {type(reply).__name__}, not message bytes")
        msg = raise_if_error(decode(reply))
        if msg.kind != request.kind or msg.step != request.step or msg.params_digest != request.params_digest:
            raise FacilityError(f"step {step}: reply is for step {msg.step}, kind {msg.kind!r} (stale or foreign)")
        merge([msg.provenance], expected=self.expected)  # every chunk exactly once
        ledger = {k: msg.tensors[k] for k in LEDGER}
        if not (np.array_equal(ledger["ledger.events"], self._expected_events)
                and np.array_equal(ledger["ledger.parts"], self._expected_parts)):
            bad = np.nonzero((ledger["ledger.events"] != self._expected_events)
                             | (ledger["ledger.parts"] != self._expected_parts))[0]
            raise ProvenanceError(f"step {step}: events of chunks {[self.expected[j].label for j in bad[:5]]}"
                                  " were not counted exactly once")
        self.last_step = {"seconds": time.perf_counter() - t0, "bytes_to_driver": len(reply),
                          "request_bytes": len(data), "tasks": n_tasks, "tree_depth": depth,
                          "shard_wall": ledger["timing.wall"].tolist(), "shard_cpu": ledger["timing.cpu"].tolist()}
        return dataclasses.replace(msg, tensors={k: v for k, v in msg.tensors.items() if k not in LEDGER})

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the worker-resident batches; close a client or cluster created here."""
        for f in self.shards:
            try:
                f.release()
            except Exception:
                pass
        self.shards = []
        if self._own_client and getattr(self, "client", None) is not None:
            try:
                self.client.close()
            finally:
                self._own_client = False
        if self.cluster is not None:
            try:
                self.cluster.close()
            finally:
                self.cluster = None

    def __enter__(self) -> "DaskExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
