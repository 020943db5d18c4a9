"""jacana's differentiable pass as a coffea processor, for coffea's own Runner and executors.

:class:`JacanaProcessor` is a :class:`coffea.processor.ProcessorABC`: ``process(events)`` takes
the NanoEvents of one coffea work item, builds jacana's columns from them (the analysis
config's branch names mapped to NanoEvents fields: ``Jet_pt`` -> ``events.Jet.pt``,
``genWeight`` -> ``events.genWeight``), densifies them exactly as jacana's reader does, and
and answers one request of the analysis' per-chunk stage
(:class:`~jacana.stages.soft_stage.SoftYieldsStage`, the same stage every executor runs): the
soft yields and their Jacobians in the parameters (or, given cotangents, the VJP) at the
processor's parameters and relaxation, as a coffea accumulator (dicts of numpy arrays, which
coffea adds)::

    {"tensors":    {"yields.ttbar.nominal.4j1b.sumw": [V, bins], "jacobian:yields....": [V, bins, N], ...},
     "provenance": [[file, entry_start, entry_stop, n_events], ...],
     "nonfinite":  {branch: values masked}}

so the differentiable pass runs through ``processor.Runner`` with ``IterativeExecutor``,
``FuturesExecutor`` or ``DaskExecutor`` on a coffea-style fileset (:func:`coffea_fileset`
converts jacana's). :func:`executor_output` turns the accumulator into what
:class:`~jacana.facility.executor.InProcessExecutor` returns, after checking that every entry of
every file was counted exactly once.

Example (see ``docs/facility.md``)::

    from coffea import processor
    from coffea.nanoevents import NanoAODSchema
    run = processor.Runner(executor=processor.IterativeExecutor(), schema=NanoAODSchema, chunksize=100_000)
    out = run(coffea_fileset(fileset, spec), JacanaProcessor(spec, params, relax), treename="Events")
    ylds, jacs = executor_output(out, spec, fileset)
"""

from __future__ import annotations

from typing import Any, Mapping

import awkward as ak
import numpy as np
from coffea import processor

from jacana.protocol.errors import ProvenanceError
from jacana.protocol.provenance import Provenance, merge
from jacana.stages.columns import Columns, columns_from_arrays
from jacana.stages.errors import InputFileError
from jacana.stages.fileset import NEVTS_KEYS, NOMINAL_VARIATION as NOMINAL, SAMPLE_KEYS, Chunk, Fileset
from jacana.stages.spec import AnalysisSpec

DATASET_SEP = "__"
MODES = ("jacobian", "yields", "vjp")


def coffea_fileset(fileset: Fileset, spec: AnalysisSpec) -> dict:
    """jacana's fileset as coffea's: ``{"<sample>__<variation>": {"files": {path: tree}, "metadata": {...}}}``.

    Only the (sample, file variation) pairs the analysis needs; the metadata carries the sample,
    the file variation and ``nevts_total`` (the weight's denominator).
    """
    out = {}
    for sample in spec.samples:
        for variation in spec.file_variations(sample):
            files = fileset.files(sample, variation)
            out[f"{sample}{DATASET_SEP}{variation}"] = {
                "files": {f.path: spec.tree for f in files},
                "metadata": {"sample": sample, "variation": variation,
                             "nevts_total": int(fileset.nevts_total(sample, variation))},
            }
    return out


def _field(events, branch: str):
    """The NanoEvents field of a flat NanoAOD branch name: ``Jet_pt`` -> ``events.Jet.pt``."""
    fields = events.fields
    if branch in fields:
        arr = events[branch]
    else:
        coll, _, name = branch.partition("_")
        if coll not in fields or not name or name not in events[coll].fields:
            raise InputFileError(events.metadata.get("filename", "<events>"),
                                 f"branch {branch!r} has no NanoEvents field ({coll}.{name})")
        arr = events[coll][name]
    arr = ak.without_parameters(arr)
    materialize = getattr(ak, "materialize", None)
    return materialize(arr) if materialize is not None else arr


def chunk_of_work_item(m: Mapping) -> Chunk:
    """The chunk of a coffea work item's metadata: from :func:`coffea_fileset`'s keys (``sample``,
    ``variation``, ``nevts_total``) or ordinary coffea ones (``process``, ``nevts``; the dataset's
    name ``<sample>__<variation>`` when neither names the sample; ``nominal`` by default)."""
    dataset = str(m.get("dataset", ""))
    named = dataset.split(DATASET_SEP, 1) if DATASET_SEP in dataset else [dataset, NOMINAL]
    sample = next((m[k] for k in SAMPLE_KEYS if m.get(k) is not None), named[0] or None)
    variation = m.get("variation") or named[1]
    nevts = next((m[k] for k in ("nevts_total",) + NEVTS_KEYS if m.get(k) is not None), None)
    if sample is None or nevts is None:
        key = "'sample' (or 'process')" if sample is None else "'nevts' (or 'nevts_total')"
        raise InputFileError(m.get("filename", "<events>"), f"coffea dataset {dataset!r}: its metadata has no {key}"
                             " (jacana needs the sample and its generated events: the weight's denominator);"
                             f" metadata keys: {sorted(map(str, m))}")
    return Chunk(str(sample), str(variation), m["filename"], int(m["entrystart"]), int(m["entrystop"]), int(nevts))


def columns_from_events(events, spec: AnalysisSpec) -> Columns:
    """jacana's columns of one coffea work item (metadata: see :func:`chunk_of_work_item`)."""
    chunk = chunk_of_work_item(events.metadata)
    if chunk.sample not in spec.samples:
        raise InputFileError(chunk.path, f"coffea dataset {events.metadata.get('dataset')!r} is sample"
                             f" {chunk.sample!r}, not one of the analysis' samples {sorted(spec.samples)}"
                             " (set metadata 'sample')")
    if len(events) != chunk.n_events:
        raise InputFileError(chunk.path, f"coffea gave {len(events)} events for entries {chunk.entry_start}-{chunk.entry_stop}")
    return columns_from_arrays(chunk, spec, {b: _field(events, b) for b in spec.needed_branches()})


def _numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.array(tree, dtype=np.float64, copy=True)  # writable: coffea accumulates in place


class JacanaProcessor(processor.ProcessorABC):
    """Soft yields and Jacobians (or VJPs) of jacana's analysis on coffea NanoEvents.

    ``spec``: the analysis (an :class:`AnalysisSpec` or its dict); ``params``/``relax``: values by
    name (default: the spec's parameters, relaxation scale 1); ``mode``: ``"jacobian"`` (yields
    and d yields/d params), ``"yields"``, or ``"vjp"`` with ``cotangents`` per (sample, variation).
    Only plain data is held, so coffea can ship the processor to its workers.
    """

    def __init__(self, spec: AnalysisSpec | Mapping, params: Mapping[str, Any] | None = None,
                 relax: Mapping[str, Any] | None = None, mode: str = "jacobian", cotangents: Mapping | None = None,
                 stage_factory=None):
        from jacana.stages.analysis import default_params, default_relax

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "vjp" and cotangents is None:
            raise ValueError("mode='vjp' needs cotangents")
        self.spec_dict = spec.to_dict() if isinstance(spec, AnalysisSpec) else dict(spec)
        s = AnalysisSpec(self.spec_dict)
        self.params = {k: np.asarray(v, np.float64) for k, v in (params if params is not None else default_params(s)).items()}
        self.relax = {k: np.asarray(v, np.float64) for k, v in (relax if relax is not None else default_relax(s)).items()}
        self.mode = mode
        self.cotangents = _numpy(cotangents) if cotangents is not None else None
        self.stage_factory = stage_factory  # None: the soft analysis (SoftYieldsStage); importable where coffea runs

    def process(self, events) -> dict:
        """One work item: the chunk's :class:`~jacana.stages.soft_stage.SoftYieldsStage` answers one
        request (:func:`jacana.protocol.rpc.handle`, the same call a dask shard or a stage server makes)."""
        from jacana.protocol.rpc import MessageStage, handle
        from jacana.stages.batch import regroupable_batches, to_device
        from jacana.stages.soft_stage import SoftYieldsStage, cotangents_from, params_inputs, relax_inputs

        from jacana.facility.executor import rebatch
        from jacana.facility.worker_tasks import spec_and_config

        spec, config = spec_and_config(self.spec_dict)
        columns = columns_from_events(events, spec)
        chunk = columns.chunk
        key = (chunk.sample, chunk.variation)
        batches = regroupable_batches(columns, spec)
        parts = to_device(rebatch(batches.parts)) if batches.parts else []
        stage = (self.stage_factory or SoftYieldsStage)(config, [key], self.params, {key: parts})
        params, inputs = params_inputs(self.params), relax_inputs(self.relax)
        kind = {"yields": "apply", "jacobian": "jacobian", "vjp": "vjp"}[self.mode]
        cts = None
        if self.mode == "vjp":
            from jacana.stages.stats.sensitivity import yields_key

            cts = cotangents_from({yields_key(*key): self.cotangents[yields_key(*key)]})
        local = MessageStage(lambda req: handle(stage, req), stage.describe())
        request = local.request(kind, params, inputs, wrt=tuple(params) if kind != "apply" else (), cotangents=cts)
        reply = local.call(request)
        return {"tensors": {k: np.array(v, dtype=np.float64, copy=True) for k, v in reply.tensors.items()},
                "provenance": [[chunk.path, chunk.entry_start, chunk.entry_stop, chunk.n_events]],
                "nonfinite": dict(columns.nonfinite)}

    def postprocess(self, accumulator):
        return accumulator


def check_provenance(output: Mapping, fileset: Fileset, spec: AnalysisSpec) -> tuple[Provenance, ...]:
    """Every entry of every file the analysis needs was processed exactly once (else ProvenanceError)."""
    records = [Provenance(str(f), int(a), int(b), int(n)) for f, a, b, n in output.get("provenance", [])]
    merged = merge([records])  # no record twice, no overlap
    covered: dict[str, int] = {}
    for p in merged:
        covered[p.file] = covered.get(p.file, 0) + (p.entry_stop - p.entry_start)
    want = {f.path: f.nevts for s in spec.samples for v in spec.file_variations(s) for f in fileset.files(s, v)}
    wrong = {f: (covered.get(f, 0), n) for f, n in want.items() if covered.get(f, 0) != n}
    extra = sorted(set(covered) - set(want))
    if wrong or extra:
        raise ProvenanceError(f"entries processed != entries in the files: {dict(list(wrong.items())[:5])}"
                              f"{'; unexpected files ' + str(extra[:5]) if extra else ''}")
    return merged


def executor_output(output: Mapping, spec: AnalysisSpec, fileset: Fileset | None = None, params: Mapping | None = None):
    """The accumulator as the executors' tree view returns it: ``(yields, jacobians)`` (mode
    ``jacobian``), ``(yields, grad)`` (``vjp``) or ``yields`` (``yields``); provenance checked
    against ``fileset`` when given. ``params``: the processor's parameters (default: the spec's)."""
    from jacana.protocol.rpc import split_tensors
    from jacana.protocol.tree import unflatten
    from jacana.stages.analysis import default_params
    from jacana.stages.soft_stage import jacobian_by_key, params_inputs, yields_by_key

    if fileset is not None:
        check_provenance(output, fileset, spec)
    outputs, derived = split_tensors(output["tensors"])
    ylds = yields_by_key(outputs)
    p = params_inputs(default_params(spec) if params is None else params)
    if derived["jacobian"]:
        return ylds, jacobian_by_key(derived["jacobian"], p, tuple(p))
    if derived["cotangent"]:
        return ylds, unflatten(derived["cotangent"])
    return ylds
