"""jacana on coffea: a processor for coffea's Runner, and an executor that optimises through it.

:class:`JacanaProcessor` is a :class:`coffea.processor.ProcessorABC`. ``process(events)`` takes the
NanoEvents of one coffea work item with ordinary coffea metadata (the ``dataset``; the sample
from ``process`` or ``sample``, else the dataset's name ``<sample>__<variation>``; the variation
from ``variation``, default ``nominal``; the generated events from ``nevts``), builds jacana's
columns from them (``Jet_pt`` -> ``events.Jet.pt`` or the flat field of ``BaseSchema``) and
densifies them exactly as jacana's reader does. Then the chunk's
:class:`~jacana.stages.soft_stage.SoftYieldsStage` answers one protocol request
(:func:`jacana.protocol.rpc.handle`, the call a dask shard or a stage server makes): the soft
yields and their Jacobians (or the VJP). The accumulator coffea adds up::

    {"tensors":    {"yields.ttbar.nominal.4j1b.sumw": [V, bins], "jacobian:yields....": [V, bins, N], ...},
     "provenance": [[file, entry_start, entry_stop, n_events], ...],
     "nonfinite":  {file: {branch: values masked}},
     "histograms": {region: hist.Hist}}       # hard cuts at the processor's parameters

Each ``hist.Hist`` has the category axes ``process`` and ``variation`` (every sample and
histogram variation of the analysis, so the work items' histograms add) and the region's
observable, named and labelled, with Weight storage: what ``jacana.evaluate(...).histograms``
holds. :func:`soft_histograms` gives the soft yields the same shape.

:class:`CoffeaExecutor` is the executor interface (what :class:`~jacana.facility.executor.InProcessExecutor`
answers) on top of a Runner with coffea's ``IterativeExecutor``, ``FuturesExecutor`` (one process
pool kept for every step) or ``DaskExecutor``: every step is one Runner pass over the fileset
carrying the request message, so :class:`~jacana.analysis.optimize.Optimizer` runs an optimisation
through coffea. Unlike jacana's own executors it reads the events again every step (coffea keeps
nothing between passes).

Example (see ``docs/facility.md``)::

    from coffea import processor
    run = processor.Runner(executor=processor.IterativeExecutor(), schema=SlimNanoAODSchema, chunksize=100_000)
    out = run(coffea_fileset(fileset, spec), JacanaProcessor(spec, params, relax), treename="Events")
    ylds, jacs = executor_output(out, spec, fileset)
    out["histograms"]["4j2b"]                                   # hist.Hist: process x variation x m_bjj
"""

from __future__ import annotations

from typing import Any, Mapping

import awkward as ak
import numpy as np
from coffea import processor
from coffea.nanoevents import NanoAODSchema

from jacana.protocol.errors import ProvenanceError
from jacana.protocol.message import Message, decode, encode
from jacana.protocol.provenance import Provenance, merge
from jacana.stages.columns import Columns, columns_from_arrays
from jacana.stages.errors import InputFileError
from jacana.stages.fileset import NEVTS_KEYS, NOMINAL_VARIATION as NOMINAL, SAMPLE_KEYS, Chunk, Fileset
from jacana.stages.spec import AnalysisSpec

from jacana.facility.errors import FacilityError
from jacana.facility.executor import RequestExecutor

DATASET_SEP = "__"
MODES = ("jacobian", "yields", "vjp")
COFFEA_EXECUTORS = ("iterative", "futures", "dask")
#: The category axes of the histograms: ``process`` (hist reserves ``sample``, a keyword of ``fill``), ``variation``.
PROCESS_AXIS, VARIATION_AXIS = "process", "variation"


class SlimNanoAODSchema(NanoAODSchema):
    """NanoAODSchema for NanoAOD without the cross-reference index branches (skims, jacana's synthetic
    files): the same collections, without one ``Missing cross-reference index`` warning per absent
    ``*Idx`` branch (about 80 per work item on the synthetic files). jacana reads no cross-reference,
    so the warning says nothing about its results; on full NanoAOD the index branches are there and
    both schemas build the same events."""

    warn_missing_crossrefs = False


def coffea_fileset(fileset: Fileset, spec: AnalysisSpec) -> dict:
    """jacana's fileset as coffea's, in the AGC's coffea form:
    ``{"<sample>__<variation>": {"files": {path: tree}, "metadata": {"process", "variation", "nevts"}}}``
    (plus ``xsec`` where the fileset has it). Only the (sample, file variation) pairs the analysis needs;
    ``nevts`` is the weight's denominator (the generated events)."""
    out = {}
    for sample in spec.samples:
        for variation in spec.file_variations(sample):
            files = fileset.files(sample, variation)
            meta = {"process": sample, "variation": variation, "nevts": int(fileset.nevts_total(sample, variation))}
            xsec = fileset.metadata.get(sample, {}).get(variation, {}).get("xsec")
            if xsec is not None:
                meta["xsec"] = xsec
            out[f"{sample}{DATASET_SEP}{variation}"] = {"files": {f.path: spec.tree for f in files}, "metadata": meta}
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


def histogram_variations(spec: AnalysisSpec) -> list[str]:
    """The ``variation`` categories: every histogram variation of any sample, in the config's order."""
    return list(dict.fromkeys(v for s in spec.samples for v in spec.histogram_variations(s)))


def empty_histograms(spec: AnalysisSpec) -> dict:
    """``{region: hist.Hist}`` of zeros: axes ``process`` (the samples), ``variation``
    (:func:`histogram_variations`) and the region's observable (named, labelled, no flow bins), Weight
    storage. Fixed categories, so the histograms of any two work items add."""
    import hist

    samples, variations, observables = list(spec.samples), histogram_variations(spec), spec.observable_axes()
    out = {}
    for region, reg in spec.regions.items():
        name, label = observables[region]
        out[region] = hist.Hist(hist.axis.StrCategory(samples, name=PROCESS_AXIS, label="sample", overflow=False),
                                hist.axis.StrCategory(variations, name=VARIATION_AXIS, label="variation", overflow=False),
                                hist.axis.Variable(np.asarray(reg.edges, np.float64), name=name, label=label,
                                                   underflow=False, overflow=False),
                                storage=hist.storage.Weight(), name=region)
    return out


def _fill(hists: dict, region: str, sample: str, variation: str, sumw, sumw2) -> None:
    """Add one (sample, variation)'s sumw and sumw2 into the region's histogram (in place)."""
    h = hists[region]
    i, j = h.axes[PROCESS_AXIS].index(sample), h.axes[VARIATION_AXIS].index(variation)
    view = h.view()
    view.value[i, j] += np.asarray(sumw, np.float64)
    view.variance[i, j] += np.asarray(sumw2, np.float64)


def hard_histograms_of(columns: Columns, spec: AnalysisSpec) -> dict:
    """The hard-cut histograms of one chunk's columns as :func:`empty_histograms`' ``hist.Hist`` per region
    (the same fill as ``jacana evaluate``: :func:`~jacana.stages.reference.fill_histograms`, or
    :func:`~jacana.stages.analysis.hard_mode_histograms` for a general config)."""
    from jacana.stages.analysis import hard_mode_histograms
    from jacana.stages.reference import fill_histograms, to_arrays

    hists = empty_histograms(spec)
    fill = hard_mode_histograms if spec.is_general else fill_histograms
    for region, by_var in fill(columns, spec).items():
        for variation, h in by_var.items():
            arrays = to_arrays(h)
            _fill(hists, region, columns.chunk.sample, variation, arrays["sumw"], arrays["sumw2"])
    return hists


def soft_histograms(output: Mapping, spec: AnalysisSpec) -> dict:
    """The soft (relaxed) yields of an accumulator (or of its ``tensors``) as :func:`empty_histograms`'
    ``hist.Hist`` per region: the optimisation's histograms with named axes. An alternative-sample
    file's yields are filed under its variation (``ME_var``), as the hard histograms are."""
    from jacana.protocol.rpc import split_tensors
    from jacana.stages.analysis import soft_config
    from jacana.stages.soft_stage import yields_tree

    tensors = output.get("tensors", output)
    config, hists = soft_config(spec), empty_histograms(spec)
    for (sample, file_var), by_region in yields_tree(split_tensors(tensors)[0]).items():
        names = config.variations(file_var == NOMINAL)
        names = names if file_var == NOMINAL else (file_var,)
        for region, kinds in by_region.items():
            for k, variation in enumerate(names):
                _fill(hists, region, sample, variation, kinds["sumw"][k], kinds["sumw2"][k])
    return hists


def _plain(tree):
    """A parameter tree as plain numbers and lists (for :meth:`AnalysisSpec.with_params`)."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    arr = np.asarray(tree, np.float64)
    return float(arr) if arr.ndim == 0 else arr


_CONFIGURED: list[bool] = []


def _configure_process() -> None:
    """jacana's JAX settings (64-bit floats, compilation cache) once per process: a coffea worker
    (futures, dask) is a fresh process that never ran the CLI's or the notebook's set-up."""
    if not _CONFIGURED:
        from jacana.facility.jaxsetup import configure_jax

        configure_jax()
        _CONFIGURED.append(True)


def _request(spec_dict: Mapping, config, params: Mapping, relax: Mapping, mode: str, cotangents, stage_factory):
    """The protocol request of a processor built from values (``mode``: jacobian, yields, vjp)."""
    from jacana.protocol.rpc import MessageStage
    from jacana.stages.soft_stage import SoftYieldsStage, cotangents_from, params_inputs, relax_inputs
    from jacana.stages.stats.stage import analysis_keys

    spec = AnalysisSpec(dict(spec_dict))
    declared = (stage_factory or SoftYieldsStage)(config, analysis_keys(spec), params).describe()
    p, kind = params_inputs(params), {"yields": "apply", "jacobian": "jacobian", "vjp": "vjp"}[mode]
    local = MessageStage(None, declared)
    return local.request(kind, p, relax_inputs(relax), wrt=tuple(p) if kind != "apply" else (),
                         cotangents=cotangents_from(cotangents) if mode == "vjp" else None)


class JacanaProcessor(processor.ProcessorABC):
    """Soft yields and Jacobians (or VJPs) of jacana's analysis on coffea NanoEvents, and its
    hard-cut histograms as ``hist.Hist`` (see the module docstring).

    ``spec``: the analysis (an :class:`AnalysisSpec` or its dict); ``params``/``relax``: values by
    name (default: the spec's parameters, relaxation scale 1); ``mode``: ``"jacobian"`` (yields
    and d yields/d params), ``"yields"``, or ``"vjp"`` with ``cotangents`` per (sample, variation);
    or ``request``: an encoded protocol request to answer instead (what :class:`CoffeaExecutor`
    sends). ``histograms``: also fill the hard-cut histograms at ``params`` (default: yes, unless a
    request is given). Only plain data is held, so coffea can ship the processor to its workers.
    """

    def __init__(self, spec: AnalysisSpec | Mapping, params: Mapping[str, Any] | None = None,
                 relax: Mapping[str, Any] | None = None, mode: str = "jacobian", cotangents: Mapping | None = None,
                 stage_factory=None, *, request: bytes | None = None, histograms: bool | None = None):
        from jacana.stages.analysis import default_params, default_relax, soft_config

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "vjp" and cotangents is None and request is None:
            raise ValueError("mode='vjp' needs cotangents")
        self.spec_dict = spec.to_dict() if isinstance(spec, AnalysisSpec) else dict(spec)
        self.stage_factory = stage_factory  # None: the soft analysis (SoftYieldsStage); importable where coffea runs
        self.histograms = request is None if histograms is None else bool(histograms)
        if request is None:
            s = AnalysisSpec(self.spec_dict)
            params = default_params(s) if params is None else params
            relax = default_relax(s) if relax is None else relax
            request = encode(_request(self.spec_dict, soft_config(s), params, relax, mode, cotangents, stage_factory))
        self.request = bytes(request)

    def process(self, events) -> dict:
        """One work item: the chunk's stage answers the request (:func:`jacana.protocol.rpc.handle`,
        the same call a dask shard or a stage server makes); an error answer is raised here."""
        from jacana.protocol.rpc import handle, raise_if_error, split_request
        from jacana.protocol.tree import unflatten
        from jacana.stages.batch import regroupable_batches, to_device
        from jacana.stages.soft_stage import SoftYieldsStage
        from jacana.stages.stats.stage import analysis_keys

        from jacana.facility.executor import rebatch
        from jacana.facility.worker_tasks import spec_and_config

        _configure_process()
        spec, config = spec_and_config(self.spec_dict)
        columns = columns_from_events(events, spec)
        chunk = columns.chunk
        request = decode(self.request)
        params = unflatten(split_request(request)[0])
        program = request.meta.get("apply_program", "auto") if isinstance(request.meta, Mapping) else "auto"
        batches = regroupable_batches(columns, spec)
        parts = to_device(rebatch(batches.parts)) if batches.parts else []
        # every key of the analysis, this chunk's batches under its own: the others answer zeros of the
        # same shapes, so every work item's answer has the same tensors and coffea's sum is the sum over chunks
        stage = (self.stage_factory or SoftYieldsStage)(config, analysis_keys(spec), params,
                                                        {(chunk.sample, chunk.variation): parts},
                                                        **({} if program == "auto" else {"apply_program": program}))
        reply = raise_if_error(handle(stage, request))
        out = {"tensors": {k: np.array(v, dtype=np.float64, copy=True) for k, v in reply.tensors.items()},
               "provenance": [[chunk.path, chunk.entry_start, chunk.entry_stop, chunk.n_events]],
               "nonfinite": {chunk.path: dict(columns.nonfinite)} if columns.nonfinite else {}}
        if self.histograms:
            out["histograms"] = hard_histograms_of(columns, spec.with_params(_plain(params)))
        return out

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


def coffea_executor(kind: str = "iterative", *, workers: int = 2, client=None, progress: bool = False):
    """``(coffea executor, [what to close])`` for ``kind`` (``iterative``, ``futures``, ``dask``).

    ``futures`` gets one process pool for every Runner pass (coffea would otherwise start a pool, whose
    workers import JAX and load the compiled programs, on every step). ``dask`` uses ``client``, else a
    local cluster of ``workers`` processes (:func:`jacana.facility.profiles.connect`, dashboard link
    printed with ``progress``). Close the returned objects when done (``close()``/``shutdown()``).
    """
    if kind == "iterative":
        return processor.IterativeExecutor(status=progress), []
    if kind == "futures":
        from loky import ProcessPoolExecutor

        # coffea's own default pool (spawned workers: a fork would copy JAX's threads; unlike the standard
        # library's spawn, a script needs no __main__ guard), without its restart of a worker whose memory grew
        # by 300 MB: a worker holding the compiled programs does, and would reload them mid-optimisation
        pool = ProcessPoolExecutor(max_workers=int(workers), env={"LOKY_MAX_MEMORY_LEAK_SIZE": str(2**62)})
        return processor.FuturesExecutor(pool=pool, workers=int(workers), status=progress), [pool]
    if kind == "dask":
        from jacana.facility.profiles import announce_dashboard, connect

        owned = []
        if client is None:
            client, cluster = connect("local", workers=int(workers))
            owned = [client, cluster]
        if progress:
            announce_dashboard(client)
        return processor.DaskExecutor(client=client, status=progress), owned
    raise FacilityError(f"coffea executor must be one of {COFFEA_EXECUTORS} (or a coffea executor), got {kind!r}")


class CoffeaExecutor(RequestExecutor):
    """The executor interface on coffea's Runner: every stage call is one Runner pass over the fileset
    whose work items answer the same request message (:class:`JacanaProcessor` with ``request``),
    summed by coffea and checked here (every entry of every file exactly once).

    ``fileset``: a :class:`Fileset` or anything :func:`jacana.stages.fileset.load_fileset` reads
    (coffea's forms too). ``executor``: ``"iterative"``, ``"futures"`` (``workers`` processes),
    ``"dask"`` (on ``client``, else a local cluster of ``workers``), or a coffea executor; or give a whole ``runner``
    (``processor.Runner``). ``schema``: default :class:`SlimNanoAODSchema`. The events are read again
    every pass; use a large ``chunksize`` (each work item pads its own fixed-shape calls).

    >>> ex = CoffeaExecutor(spec, fileset, "futures", workers=2)  # doctest: +SKIP
    >>> Optimizer(spec, ex, OptimizeSettings(steps=5), "out").run(initial_params(spec, settings))  # doctest: +SKIP
    """

    def __init__(self, spec: AnalysisSpec, fileset, executor="iterative", *, workers: int = 2, client=None,
                 chunksize: int = 100_000, schema=None, runner=None, report=None, stage_factory=None,
                 progress: bool = False):
        from jacana.stages.analysis import soft_config
        from jacana.stages.fileset import load_fileset
        from jacana.stages.soft_stage import SoftYieldsStage
        from jacana.stages.stats.stage import analysis_keys

        from jacana.facility.hardrun import InputReport

        self.spec = spec
        self.fileset = fileset if isinstance(fileset, Fileset) else load_fileset(fileset)
        self.datasets = coffea_fileset(self.fileset, spec)  # refuses a fileset without a needed (sample, variation)
        self.config = soft_config(spec)
        self.keys = analysis_keys(spec)
        self.report = report or InputReport()
        self.stage_factory = stage_factory or SoftYieldsStage
        self._factory = stage_factory  # what the processor ships (None: the soft analysis)
        self.n_events = sum(f.nevts for s, v in self.keys for f in self.fileset.files(s, v))
        self.owned: list = []  # a process pool or a dask client and cluster started here
        if runner is None:
            coffea_ex = executor
            if isinstance(executor, str):
                coffea_ex, self.owned = coffea_executor(executor, workers=workers, client=client, progress=progress)
            runner = processor.Runner(executor=coffea_ex, schema=schema or SlimNanoAODSchema, chunksize=int(chunksize))
        self.runner = runner
        self.passes = 0
        self.last_output: dict = {}

    def run(self, request: Message) -> Message:
        """One request over the fileset through the Runner: the summed response, provenance checked."""
        if self.runner is None:
            raise FacilityError("this executor is closed")
        proc = JacanaProcessor(self.spec, stage_factory=self._factory, request=encode(request), histograms=False)
        out = self.runner(self.datasets, proc, treename=self.spec.tree)
        self.passes += 1
        merged = check_provenance(out, self.fileset, self.spec)
        if self.passes == 1:  # the same values every pass: reported once, per file
            whole = {f.path: Chunk(s, v, f.path, 0, f.nevts, self.fileset.nevts_total(s, v))
                     for s, v in self.keys for f in self.fileset.files(s, v)}
            for path, counts in out.get("nonfinite", {}).items():
                self.report.nonfinite_read(whole[path], counts)
        self.last_output = out
        return request.reply(tensors=dict(out["tensors"]), wrt=tuple(request.wrt), provenance=merged)

    def close(self) -> None:
        """Shut down a process pool or dask cluster started here (a client given stays open)."""
        while self.owned:
            thing = self.owned.pop(0)
            (thing.shutdown if hasattr(thing, "shutdown") and not hasattr(thing, "close") else thing.close)()
        self.runner = None

    def __enter__(self) -> "CoffeaExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
