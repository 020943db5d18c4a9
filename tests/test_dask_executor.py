"""The dask executor: same numbers as in-process, worker loss recovered, one checked message per step.

Two local worker processes; the JAX persistent compilation cache (``$JACANA_CACHE``, a
temporary folder unless the environment sets one) is shared by the driver and the workers,
so the workers load the programs the in-process reference compiled.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip("distributed")

from jacana.facility.factory import make_executor
from jacana.facility.dask_executor import (DaskExecutor, FacilityError, place_chunks, plan_shards,
                                           step_task, sum_messages_task)
from jacana.facility.executor import InProcessExecutor
from jacana.protocol.errors import ProtocolError, ProvenanceError
from jacana.protocol.message import Message, encode
from jacana.protocol.provenance import Provenance

RTOL = 1e-9


def assert_trees_close(a, b, rtol=RTOL):
    """Every leaf equal to ``rtol`` relative to the largest magnitude of that tensor."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        scale = max(float(np.abs(y).max(initial=0.0)), 1e-300)
        assert float(np.abs(x - y).max(initial=0.0)) <= rtol * scale


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def setup(reference_sample, tmp_path_factory):
    """The session's reference sample (8k events, chunks of 1500) and its in-process yields and Jacobians."""
    from jacana.facility.jaxsetup import configure_jax

    if not os.environ.get("JACANA_CACHE"):
        os.environ["JACANA_CACHE"] = str(tmp_path_factory.mktemp("jacana_cache"))
    configure_jax()
    return {k: reference_sample[k] for k in ("spec", "chunks", "params", "relax", "ref", "y0", "j0")}


@pytest.fixture(scope="module")
def dask_ex(setup):
    ex = DaskExecutor(setup["spec"], setup["chunks"], workers=2)
    yield ex
    ex.close()


def test_two_workers_match_in_process(setup, dask_ex):
    s = setup
    y1, j1 = dask_ex.yields_and_jacobian(s["params"], s["relax"])
    assert_trees_close(y1, s["y0"])
    assert_trees_close(j1, s["j0"])
    assert dask_ex.n_events == s["ref"].n_events == sum(c.n_events for c in s["chunks"])
    assert len(dask_ex.workers) == 2 and len(dask_ex.shards) == 2
    st = dask_ex.last_step
    assert st["tasks"] == 3 and st["tree_depth"] == 1  # 2 shard steps + 1 sum on the cluster
    assert 0 < st["bytes_to_driver"] < 1_000_000
    s["dask_first"] = (y1, j1)
    # one optimisation step through the chain (executor stage -> objective stage): the same on either executor
    from jacana.analysis.chain import analysis_chain

    v1, g1 = analysis_chain(dask_ex, "sigma_mu", s["params"]).value_and_grad(s["params"], s["relax"])
    v0, g0 = analysis_chain(s["ref"], "sigma_mu", s["params"]).value_and_grad(s["params"], s["relax"])
    assert v1 == pytest.approx(v0, rel=1e-9) and np.isfinite(v0)
    assert_trees_close(g1, g0)


def test_worker_killed_mid_step_gives_identical_result(setup, dask_ex):
    from distributed import get_task_stream

    s = setup
    if "dask_first" not in s:
        s["dask_first"] = dask_ex.yields_and_jacobian(s["params"], s["relax"])
    client = dask_ex.client
    pids_before = client.run(os.getpid)
    out: dict = {}

    def step():
        try:
            out["result"] = dask_ex.yields_and_jacobian(s["params"], s["relax"])
        except BaseException as exc:  # pragma: no cover - reported below
            out["error"] = exc

    with get_task_stream(client=client) as ts:
        th = threading.Thread(target=step)
        th.start()
        victim, deadline = None, time.time() + 120
        while victim is None and time.time() < deadline:
            for addr, keys in client.processing().items():
                if any(str(k).startswith("jacana-step") for k in keys):
                    victim = addr
                    break
            time.sleep(0.05)
        assert victim is not None, "no step task started"
        time.sleep(0.3)
        os.kill(pids_before[victim], signal.SIGKILL)  # the worker process dies mid-step
        th.join(timeout=400)
    assert not th.is_alive() and "error" not in out, out.get("error")
    assert victim not in client.run(os.getpid) or client.run(os.getpid).get(victim) != pids_before[victim]
    assert any(str(d["key"]).startswith("jacana-load") for d in ts.data), "lost chunks were not re-read"
    y2, j2 = out["result"]
    assert_trees_equal(y2, s["dask_first"][0])  # identical step result (same shards, same sums)
    assert_trees_equal(j2, s["dask_first"][1])
    assert_trees_close(y2, s["y0"])
    assert_trees_close(j2, s["j0"])


def test_scheduler_unreachable_fails_fast(setup):
    t0 = time.perf_counter()
    with pytest.raises(FacilityError, match="cannot reach the dask scheduler"):
        make_executor(setup["spec"], setup["chunks"], scheduler="tcp://127.0.0.1:1", connect_timeout=2)
    assert time.perf_counter() - t0 < 15


def test_make_executor_defaults_to_in_process(setup):
    ex = make_executor(setup["spec"], setup["chunks"][:1] + setup["chunks"][1:], workers=None)
    assert isinstance(ex, InProcessExecutor)


def _partial(prov, value=1.0):
    return encode(Message("apply", {"y": np.array([value])}, role="response", step=1, provenance=tuple(prov)))


def test_tree_sum_refuses_a_chunk_counted_twice():
    from jacana.protocol.message import decode

    a, b = Provenance("f.root", 0, 10, 10), Provenance("f.root", 10, 20, 10)
    total = decode(sum_messages_task(_partial([a], 1.0), _partial([b], 2.0)))
    assert total.tensors["y"].tolist() == [3.0] and total.provenance == (a, b)
    with pytest.raises(ProvenanceError, match="appears 2 times"):
        sum_messages_task(_partial([a]), _partial([a]))
    with pytest.raises(ProvenanceError, match="overlap"):
        sum_messages_task(_partial([a]), _partial([Provenance("f.root", 5, 15, 10)]))


def test_plan_balances_units_and_keeps_them_whole():
    # chunk summaries: parts [n_jets, events, n_kinematic]
    summaries = [{"index": i, "error": None, "parts": [[4, 3000, 3], [6, 2000, 3], [12, 100, 3]]} for i in range(4)]
    keys = ["a/nominal", "a/nominal", "b/nominal", "b/nominal"]
    where = ["w0", "w1", "w0", "w1"]
    per_shard, owner, load = plan_shards(summaries, keys, where, 2, ["w0", "w1"])
    units = [tuple(u) for shard in per_shard for u in shard]
    assert sorted(units) == sorted({(k, n) for k in set(keys) for n in (4, 6, 12)})  # each unit exactly once
    assert max(load) / min(load) < 1.5
    assert all(0 <= o < 2 for o in owner)


def test_chunks_of_a_key_are_read_on_one_worker_where_the_balance_allows():
    from jacana.stages.fileset import Chunk

    sizes = {"ttbar/nominal": [100] * 6, "wjets/nominal": [100] * 5, "st/nominal": [100, 100], "tt/up": [150, 150]}
    chunks, keys = [], []
    for k, ns in sizes.items():
        for i, n in enumerate(ns):
            chunks.append(Chunk(k.split("/")[0], k.split("/")[1], f"{k}/{i}.root", 0, n, 1000))
            keys.append(k)
    placed = place_chunks(chunks, keys, ["w0", "w1"])
    homes = {k: {w for kk, w in zip(keys, placed) if kk == k} for k in sizes}
    assert all(len(h) == 1 for h in homes.values()), homes  # 1600 events split 800/800 without splitting a key
    load = {w: sum(c.n_events for c, x in zip(chunks, placed) if x == w) for w in ("w0", "w1")}
    assert load["w0"] == load["w1"] == 800
    # a key larger than an even share is split; the balance holds
    placed = place_chunks(chunks[:6], keys[:6], ["w0", "w1", "w2"])
    assert sorted(placed.count(w) for w in ("w0", "w1", "w2")) == [2, 2, 2]


def test_select_parts_keeps_only_the_wanted_units():
    from types import SimpleNamespace

    from jacana.facility.worker_tasks import ChunkLoad, select_parts_task
    from jacana.stages.fileset import Chunk

    parts = tuple(SimpleNamespace(bucket_width=n) for n in (4, 5, 6))
    load = ChunkLoad(3, Chunk("ttbar", "nominal", "x.root", 0, 10, 10), parts, {})
    picked = select_parts_task(load, [["ttbar/nominal", 5], ["ttbar/nominal", 6], ["wjets/nominal", 4]])
    assert [p.bucket_width for p in picked.parts] == [5, 6] and picked.index == 3 and picked.chunk == load.chunk
    assert select_parts_task(load, [["wjets/nominal", 4]]).parts == ()


def test_step_task_refuses_a_tampered_request(setup):
    from jacana.facility.dask_executor import WorkerShard

    from jacana.protocol.message import decode
    from jacana.protocol.rpc import raise_if_error

    shard = WorkerShard(0, 1, None, {}, (), np.zeros(0, np.int64), np.zeros(0, np.int64))
    msg = Message("jacobian", {"x": np.array(1.0)}, role="request", param_names=("x",),
                  params_digest="sha256:" + "0" * 64)
    with pytest.raises(ProtocolError, match="digest"):
        raise_if_error(decode(step_task(shard, encode(msg))))


@pytest.mark.slow
def test_two_workers_vjp_and_yields_match_in_process(setup, dask_ex):
    s = setup
    cot = jax.tree.map(lambda y: np.linspace(0.5, 1.5, np.size(y)).reshape(np.shape(y)), s["y0"])
    yv, gv = dask_ex.yields_vjp(s["params"], s["relax"], cot)
    yr, gr = s["ref"].yields_vjp(s["params"], s["relax"], cot)
    assert_trees_close(yv, yr)
    assert_trees_close(gv, jax.tree.map(np.asarray, gr))
    assert_trees_close(dask_ex.yields(s["params"], s["relax"]), s["ref"].yields(s["params"], s["relax"]))


def test_a_general_analysis_config_runs_on_the_same_workers(setup, dask_ex):
    """The AGC analysis in the general config form (DenseBatch parts, stages/engine.py), served by the
    same cluster's workers: the in-process AGC program's yields and Jacobians (the programs are equal)."""
    from importlib import resources

    from jacana.stages.analysis import default_params, default_relax
    from jacana.stages.spec import load_spec

    spec = load_spec(str(resources.files("jacana.stages").joinpath("configs/agc_ttbar_general.yaml")))
    ex = DaskExecutor(spec, setup["chunks"], client=dask_ex.client)
    try:
        y, j = ex.yields_and_jacobian(default_params(spec), default_relax(spec))
    finally:
        ex.close()
    assert_trees_close(y, setup["y0"], rtol=1e-12)
    assert_trees_close(j, setup["j0"], rtol=1e-12)
