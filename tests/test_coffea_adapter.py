"""The coffea path: the processor on standard coffea metadata gives the yields and Jacobians of jacana's own
executor and hard-cut hist.Hist histograms equal to jacana's; CoffeaExecutor optimises through coffea's Runner."""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import pytest

processor = pytest.importorskip("coffea.processor")

from jacana.facility.coffea_adapter import (CoffeaExecutor, JacanaProcessor, SlimNanoAODSchema, check_provenance,
                                            coffea_fileset, columns_from_events, executor_output, soft_histograms)
from jacana.facility.hardrun import analysis_chunks
from jacana.protocol.errors import ProvenanceError

RTOL = 1e-9


def assert_trees_close(a, b, rtol=RTOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        scale = max(float(np.abs(y).max(initial=0.0)), 1e-300)
        assert float(np.abs(x - y).max(initial=0.0)) <= rtol * scale


@pytest.fixture(scope="module")
def setup(reference_sample, tmp_path_factory):
    """The session's reference sample: jacana's own in-process yields and Jacobians to compare with."""
    from jacana.facility.jaxsetup import configure_jax

    if not os.environ.get("JACANA_CACHE"):
        os.environ["JACANA_CACHE"] = str(tmp_path_factory.mktemp("jacana_cache"))
    configure_jax()
    return {k: reference_sample[k] for k in ("spec", "fileset", "params", "relax", "y0", "j0")}


def standard_fileset(setup) -> dict:
    """The reference sample as an ordinary coffea fileset: dataset names that are not jacana's sample names,
    the sample, variation and generated events in the metadata (``process``, ``variation``, ``nevts``)."""
    return {f"/{block['metadata']['process']}_{block['metadata']['variation']}/NANOAODSIM": block
            for block in coffea_fileset(setup["fileset"], setup["spec"]).values()}


def test_fileset_conversion(setup):
    cf = coffea_fileset(setup["fileset"], setup["spec"])
    assert "ttbar__nominal" in cf and "ttbar__ME_var" in cf
    entry = cf["ttbar__nominal"]
    assert entry["metadata"] == {"process": "ttbar", "variation": "nominal",
                                 "nevts": setup["fileset"].nevts_total("ttbar", "nominal")}
    assert all(tree == "Events" for tree in entry["files"].values())


def test_coffea_runner_with_standard_metadata_matches_executor(setup):
    """coffea's Runner (iterative executor, several work items per file) on an ordinary coffea fileset, read
    with SlimNanoAODSchema (no warning), gives the in-process executor's yields and Jacobians to 1e-9."""
    spec = setup["spec"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 'Missing cross-reference index' flood
        ex = CoffeaExecutor(spec, standard_fileset(setup), "iterative", chunksize=500)  # some files in two or more work items
        ylds, jacs = ex.yields_and_jacobian(setup["params"], setup["relax"])
    assert_trees_close(ylds, setup["y0"])
    assert_trees_close(jacs, setup["j0"])
    items, files = ex.last_output["provenance"], sum(len(b["files"]) for b in ex.datasets.values())
    assert ex.n_events == sum(b - a for _, a, b, _ in items) and len(items) > files
    # the soft yields with named axes: process x variation x observable
    h = soft_histograms(ex.last_output, spec)["4j2b"]
    assert [a.name for a in h.axes] == ["process", "variation", "m_bjj"]
    assert np.allclose(h[{"process": "ttbar", "variation": "ME_var"}].values(), ylds["ttbar/ME_var"]["4j2b"]["sumw"][0])
    # provenance: a work item counted twice, or one missing, is refused
    out = ex.last_output
    with pytest.raises(ProvenanceError):
        check_provenance(dict(out, provenance=out["provenance"] + out["provenance"][:1]), ex.fileset, spec)
    with pytest.raises(ProvenanceError):
        check_provenance(dict(out, provenance=out["provenance"][1:]), ex.fileset, spec)
    ex.close()


def test_processor_on_nanoevents_gives_jacanas_columns_and_hist_histograms(setup):
    """One work item with ordinary metadata: the columns equal jacana's reader's, the hard-cut histograms are
    hist.Hist (process, variation, the named and labelled observable; Weight storage) equal to jacana's."""
    import hist
    from coffea.nanoevents import NanoEventsFactory

    from jacana.stages.spec import OBSERVABLE_LABELS as AXIS_LABELS
    from jacana.stages.columns import read_chunk
    from jacana.stages.reference import fill_histograms, to_arrays

    spec, fileset = setup["spec"], setup["fileset"]
    chunk = analysis_chunks(spec, fileset, chunk_size=700)[1]
    meta = {"dataset": "TTToSemiLeptonic", "process": chunk.sample, "filename": chunk.path,
            "entrystart": chunk.entry_start, "entrystop": chunk.entry_stop, "nevts": chunk.nevts_total}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        events = NanoEventsFactory.from_root(
            {chunk.path: spec.tree}, schemaclass=SlimNanoAODSchema, mode="virtual", entry_start=chunk.entry_start,
            entry_stop=chunk.entry_stop, metadata=meta).events()
        cols = columns_from_events(events, spec)
        out = JacanaProcessor(spec, setup["params"], setup["relax"], mode="yields").process(events)
    ref = read_chunk(chunk, spec)
    assert set(cols.arrays) == set(ref.arrays)
    for name in ref.arrays:
        assert cols[name].tolist() == ref[name].tolist(), name
    assert cols.jer_factors().tolist() == ref.jer_factors().tolist()
    want = fill_histograms(ref, spec)
    for region, h in out["histograms"].items():
        assert isinstance(h, hist.Hist) and isinstance(h.storage_type(), hist.storage.Weight)
        obs = spec.regions[region].observable
        assert [a.name for a in h.axes] == ["process", "variation", obs] and h.axes[obs].label == AXIS_LABELS[obs]
        for variation, expected in want[region].items():
            got = h[{"process": chunk.sample, "variation": variation}]
            assert np.array_equal(got.values(), to_arrays(expected)["sumw"])
            assert np.array_equal(got.variances(), to_arrays(expected)["sumw2"])
        others = [s for s in spec.samples if s != chunk.sample]
        assert not h[{"process": others[0]}].values().any()
    assert {k.split(".")[1] for k in out["tensors"]} == set(spec.samples)  # every key answered (zeros elsewhere)


@pytest.mark.slow  # spawns two processes that import JAX and load the compiled programs
def test_futures_runner_optimises_like_the_in_process_executor(setup, tmp_path):
    """Two optimisation steps through coffea's Runner with the futures executor (one process pool for both)
    equal two steps on the in-process executor."""
    from jacana.analysis.optimize import OptimizeSettings, Optimizer, initial_params
    from jacana.facility.executor import InProcessExecutor

    spec, fileset = setup["spec"], setup["fileset"]
    settings = OptimizeSettings(steps=2, hard_every=0)
    histories = []
    for name, ex in (("inprocess", InProcessExecutor(spec, analysis_chunks(spec, fileset, 100_000))),
                     ("futures", CoffeaExecutor(spec, fileset, "futures", workers=2, chunksize=3000))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            outcome = Optimizer(spec, ex, settings, tmp_path / name, progress=False).run(initial_params(spec, settings))
        ex.close()
        histories.append([(h["objective"], h["params"]) for h in outcome["history"]])
    assert_trees_close(histories[1], histories[0])


@pytest.mark.slow  # starts a dask cluster whose worker compiles the soft analysis
def test_coffea_dask_executor_matches_executor(setup):
    """coffea's own dask path (Runner + DaskExecutor on distributed futures) with the pinned versions."""
    from jacana.facility.profiles import connect

    client, cluster = connect({"kind": "local", "workers": 1, "dashboard": False})
    try:
        ex = CoffeaExecutor(setup["spec"], standard_fileset(setup), "dask", client=client)
        ylds, jacs = ex.yields_and_jacobian(setup["params"], setup["relax"])
        ex.close()
    finally:
        client.close()
        cluster.close()
    assert_trees_close(ylds, setup["y0"])
    assert_trees_close(jacs, setup["j0"])


def test_make_executor_chooses_coffeas_runner_and_names_what_is_missing():
    """``jacana optimize --coffea iterative`` goes through make_executor (the CLI's run measured equal to
    in-process to 5e-13 in the objective: docs/facility.md); bad choices fail before any data is read."""
    from jacana.facility.factory import make_executor
    from jacana.stages.spec import load_spec

    with pytest.raises(ValueError, match="coffea must be one of"):
        make_executor(load_spec(), [], coffea="spark")
    with pytest.raises(ValueError, match="needs the fileset"):
        make_executor(load_spec(), [], coffea="iterative")
