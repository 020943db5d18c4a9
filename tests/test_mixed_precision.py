"""Mixed precision (issue 25): float32 event arithmetic, float64 accumulation of the histograms.

* the yields (and so the Jacobians) come back in float64 whatever the batch dtype;
* at the default relaxation, float32 batches give yields within 1e-5 of their histogram's largest
  bin and Jacobian entries within 1e-3 of the largest entry of their row (d(one histogram)/d(one
  parameter)) compared with float64 batches of the same events.
"""

from __future__ import annotations

import numpy as np
import pytest

from jacana.bench.passes import jacobian_deviation, yields_deviation
from jacana.stages.analysis import default_params, default_relax, soft_config, soft_yields
from jacana.stages.batch import make_batches
from jacana.stages.columns import read_chunk
from jacana.stages.fileset import load_fileset
from jacana.stages.jacobian import yields_and_jacobian
from jacana.stages.spec import load_spec

YIELDS_TOLERANCE, JACOBIAN_TOLERANCE = 1e-5, 1e-3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(float32 part, float64 part) of the same events: the largest jet bucket of a nominal and of an
    alternative file (one shape each: few compilations)."""
    from jacana.samples.synthetic import generate

    path = generate(tmp_path_factory.mktemp("mixed"), events=1500, seed=22, files_per_sample=1, progress=False)
    spec = load_spec()
    fileset = load_fileset(path)
    out = {}
    for sample, variation in (("ttbar", "nominal"), ("ttbar", "PS_var")):
        cols = read_chunk(fileset.chunks(sample, variation, chunk_size=100_000)[0], spec)
        by_dtype = [make_batches(cols, spec, dtype=dt, prefilter=True).parts for dt in (np.float32, np.float64)]
        i = max(range(len(by_dtype[1])), key=lambda j: int(np.sum(by_dtype[1][j].event_mask)))
        out[f"{sample}/{variation}"] = (by_dtype[0][i], by_dtype[1][i])
    return spec, soft_config(spec), out


def test_float32_batches_accumulate_in_float64(pairs):
    spec, config, parts = pairs
    p32, p64 = parts["ttbar/nominal"]
    assert p32.dtype == np.float32 and p64.dtype == np.float64
    for part in (p32, p64):
        ylds = soft_yields(default_params(spec), default_relax(spec), part, config)
        assert all(np.asarray(h).dtype == np.float64 for by_kind in ylds.values() for h in by_kind.values())


def test_float32_yields_and_jacobians_agree_with_float64(pairs):
    spec, config, parts = pairs
    params, relax = default_params(spec), default_relax(spec)
    y32, j32, y64, j64 = {}, {}, {}, {}
    for key, (p32, p64) in parts.items():
        y32[key], j32[key] = yields_and_jacobian(params, relax, p32, config)
        y64[key], j64[key] = yields_and_jacobian(params, relax, p64, config)
        assert float(np.sum(np.asarray(y64[key]["4j2b"]["sumw"]))) > 0
    for key in parts:
        for region in y32[key]:
            for kind, by_param in j32[key][region].items():
                assert np.asarray(y32[key][region][kind]).dtype == np.float64
                assert all(np.asarray(j).dtype == np.float64 for j in by_param.values())
    y_dev, j_dev = yields_deviation(y32, y64), jacobian_deviation(j32, j64)
    assert y_dev <= YIELDS_TOLERANCE, y_dev
    assert j_dev <= JACOBIAN_TOLERANCE, j_dev
    assert y_dev > 0 and j_dev > 0  # float32 did run: not the float64 program twice


def test_deviation_metrics():
    ref = {"k": {"r": {"sumw": np.array([[100.0, 1.0, 0.0]]), "sumw2": np.zeros((1, 3))}}}
    low = {"k": {"r": {"sumw": np.array([[100.0, 1.001, 0.0]]), "sumw2": np.zeros((1, 3))}}}
    assert yields_deviation(low, ref) == pytest.approx(1e-5)  # 0.001 against the histogram's largest bin, 100
    jac = {"k": {"r": {"sumw": {"a": np.array([[2.0, 0.0]]), "e": np.array([[[1.0, 0.0], [0.0, 0.0]]])}}}}
    bad = {"k": {"r": {"sumw": {"a": np.array([[2.0, 0.0]]), "e": np.array([[[1.0, 0.0], [0.5, 0.0]]])}}}}
    assert jacobian_deviation(jac, jac) == 0.0
    # parameter "e", component 0: its row (the bins) has largest entry 1.0 and deviation 0.5
    assert jacobian_deviation(bad, jac) == pytest.approx(0.5)
