"""The coffea processor adapter gives the yields and Jacobians of jacana's own executor."""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import pytest

processor = pytest.importorskip("coffea.processor")

from jacana.facility.coffea_adapter import (JacanaProcessor, check_provenance, coffea_fileset, columns_from_events,
                                            executor_output)
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


def _run(setup, executor, chunksize=100_000):
    from coffea.nanoevents import NanoAODSchema

    s = setup
    runner = processor.Runner(executor=executor, schema=NanoAODSchema, chunksize=chunksize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NanoAODSchema: cross-references absent from the files
        return runner(coffea_fileset(s["fileset"], s["spec"]), JacanaProcessor(s["spec"], s["params"], s["relax"]),
                      treename=s["spec"].tree)


def test_fileset_conversion(setup):
    cf = coffea_fileset(setup["fileset"], setup["spec"])
    assert "ttbar__nominal" in cf and "ttbar__ME_var" in cf
    entry = cf["ttbar__nominal"]
    assert entry["metadata"] == {"sample": "ttbar", "variation": "nominal",
                                 "nevts_total": setup["fileset"].nevts_total("ttbar", "nominal")}
    assert all(tree == "Events" for tree in entry["files"].values())


def test_iterative_runner_matches_executor(setup):
    out = _run(setup, processor.IterativeExecutor(), chunksize=2000)  # several coffea chunks per file
    ylds, jacs = executor_output(out, setup["spec"], setup["fileset"])
    assert_trees_close(ylds, setup["y0"])
    assert_trees_close(jacs, setup["j0"])
    # provenance: a chunk counted twice, or one missing, is refused
    doubled = dict(out, provenance=out["provenance"] + out["provenance"][:1])
    with pytest.raises(ProvenanceError):
        check_provenance(doubled, setup["fileset"], setup["spec"])
    with pytest.raises(ProvenanceError):
        check_provenance(dict(out, provenance=out["provenance"][1:]), setup["fileset"], setup["spec"])


def test_columns_from_nanoevents_equal_the_reader(setup):
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    from jacana.stages.columns import read_chunk

    spec, fileset = setup["spec"], setup["fileset"]
    chunk = analysis_chunks(spec, fileset, chunk_size=700)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        events = NanoEventsFactory.from_root(
            {chunk.path: spec.tree}, schemaclass=NanoAODSchema, mode="virtual", entry_start=chunk.entry_start,
            entry_stop=chunk.entry_stop, metadata={"sample": chunk.sample, "variation": chunk.variation,
                                                    "filename": chunk.path, "entrystart": chunk.entry_start,
                                                    "entrystop": chunk.entry_stop, "nevts_total": chunk.nevts_total}).events()
        cols = columns_from_events(events, spec)
    ref = read_chunk(chunk, spec)
    assert set(cols.arrays) == set(ref.arrays)
    for name in ref.arrays:
        assert cols[name].tolist() == ref[name].tolist(), name
    assert cols.jer_factors().tolist() == ref.jer_factors().tolist()


@pytest.mark.slow
def test_futures_runner_matches_executor(setup):
    out = _run(setup, processor.FuturesExecutor(workers=2))
    ylds, jacs = executor_output(out, setup["spec"], setup["fileset"])
    assert_trees_close(ylds, setup["y0"])
    assert_trees_close(jacs, setup["j0"])


@pytest.mark.slow  # starts a dask cluster whose worker compiles the soft analysis
def test_coffea_dask_executor_matches_executor(setup):
    """coffea's own dask path (Runner + DaskExecutor on distributed futures) with the pinned versions."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        out = _run(setup, processor.DaskExecutor(client=client, status=False))
    ylds, jacs = executor_output(out, setup["spec"], setup["fileset"])
    assert_trees_close(ylds, setup["y0"])
    assert_trees_close(jacs, setup["j0"])
    check_provenance(out, setup["fileset"], setup["spec"])
