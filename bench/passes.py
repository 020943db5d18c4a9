"""Benchmark of the differentiable stages, as ratios measured in one run.

On >= 1 M events (a synthetic AGC dataset, every sample and file variation), loaded the way the
optimiser loads them (:class:`jacana.facility.executor.InProcessExecutor`: prefiltered, regrouped
into fixed-shape calls per jet bucket, sized for the device), so the real call pattern is
measured:

* ``seconds_forward``: the soft yields of every (sample, file variation);
* ``seconds_jacobian``: yields + forward-mode Jacobian (4 cut parameters; what ``jacana optimize``
  calls each step); ``jacobian_over_forward`` (target <= 3);
* ``seconds_vjp``: one reverse-mode pass (yields + VJP of one cotangent); ``vjp_over_forward``,
  ``vjp_over_jacobian`` (above 1: forward mode is the cheaper way to all the cut parameters' gradients);
* ``seconds_reference``: the conventional awkward + hist hard analysis
  (``reference.fill_histograms``) on the same in-memory columns; ``jacobian_over_reference``
  (target <= 1); skipped with ``reference=False``;
* the call pattern: ``calls_per_step`` (compiled-program calls of one gradient step: one per
  fixed-shape part), ``events_per_call`` (event slots, padding included) and
  ``selected_events_per_call``, ``call_shapes``, ``call_sizes``, ``block_sizes``; the warm-up
  (compile or cache load) time of each mode; on an accelerator its peak memory;
* compile times: per distinct call shape (jet bucket x file kind) and mode, the first call minus
  a second one (``compile_seconds_{forward,jacobian,vjp}``: sum and max over shapes);
* ``per_bucket``: forward / Jacobian seconds per jet bucket (where the time goes);
* with ``compare_float32``: the same step in the other precision (float32 batches when ``dtype`` is
  float64, a float64 reference when it is float32: mixed precision, float32 event arithmetic with
  float64 histogram sums) and float32's deviations from float64 (:func:`yields_deviation`,
  :func:`jacobian_deviation`; issue 25's targets: 1e-5 and 1e-3);
* ``hist_memory_ratio``: peak memory of ``relaxed.ops.hist`` / this package's relaxed histogram at
  1 M events and 25 bins, from XLA's compiled temporary-buffer size and from the RSS growth of a
  fresh subprocess (target >= 10).

Run ``python -m jacana.bench.passes [fileset.json]``; :func:`run_benchmark` returns the dict.
Timings are the minimum (or, with ``stat="median"``, the median) over ``repeats`` runs after a
warm-up run; ``cpu_seconds_*`` are the process CPU times of the same runs (less sensitive to other
load on a shared machine). ``jacana bench`` (:mod:`jacana.bench.suite`) builds its table from
these figures.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_HIST_SNIPPET = r"""
import os, resource, sys, time, json
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
which, n, bins, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = jnp.asarray(np.random.default_rng(0).normal(300.0, 120.0, n))
edges = jnp.linspace(50.0, 550.0, bins + 1)
if which == "relaxed":
    import relaxed
    f = jax.jit(lambda x: relaxed.hist(x, edges, 10.0))
else:
    from jacana.stages.histograms.relaxed import soft_histogram
    f = jax.jit(lambda x: soft_histogram(x, edges, 10.0)[0])
compiled = f.lower(x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
jax.block_until_ready(x)
def peak_kb():  # this process's own high-water mark (ru_maxrss also counts the parent's, from fork)
    try:
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = peak_kb()
out = compiled(x); jax.block_until_ready(out)
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); out = compiled(x); jax.block_until_ready(out); times.append(time.perf_counter() - t0)
after = peak_kb()
dt = sorted(times)[len(times) // 2]
print(json.dumps({"temp_bytes": int(temp), "rss_growth_bytes": int(after - before) * 1024, "seconds": dt,
                  "sum": float(jnp.sum(out))}))
"""


def _hist_probe(which: str, n: int, bins: int, repeats: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _HIST_SNIPPET, which, str(n), str(bins), str(repeats)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def histogram_benchmark(n: int = 1_000_000, bins: int = 25, repeats: int = 1) -> dict:
    """Peak memory and time (median of ``repeats`` calls) of relaxed.ops.hist vs :func:`soft_histogram`
    (each in a fresh subprocess, on CPU)."""
    ours, theirs = _hist_probe("jacana", n, bins, repeats), _hist_probe("relaxed", n, bins, repeats)
    assert abs(ours["sum"] - theirs["sum"]) <= 1e-6 * abs(theirs["sum"]), (ours, theirs)
    return {
        "hist_events": n, "hist_bins": bins,
        "hist_temp_bytes_jacana": ours["temp_bytes"], "hist_temp_bytes_relaxed": theirs["temp_bytes"],
        "hist_memory_ratio": theirs["temp_bytes"] / max(ours["temp_bytes"], 1),
        "hist_rss_growth_jacana": ours["rss_growth_bytes"], "hist_rss_growth_relaxed": theirs["rss_growth_bytes"],
        "hist_rss_ratio": theirs["rss_growth_bytes"] / max(ours["rss_growth_bytes"], 1),
        "hist_seconds_jacana": ours["seconds"], "hist_seconds_relaxed": theirs["seconds"],
    }


def _timed(fn, repeats: int, stat: str = "min") -> tuple[float, float]:
    """(wall seconds, process CPU seconds) over ``repeats`` runs: the best (``stat="min"``) or the median."""
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if stat == "median":
        return statistics.median(walls), statistics.median(cpus)
    if stat != "min":
        raise ValueError(f"stat must be 'min' or 'median', got {stat!r}")
    return min(walls), min(cpus)


def _compile_times(executor, params, relax) -> dict:
    """First call minus second call of each distinct call shape, per mode (run before anything else)."""
    import jax

    from jacana.stages.analysis import soft_yields
    from jacana.stages.jacobian import yields_and_jacobian_call, yields_vjp_call

    config = executor.config
    seen, out = set(), {"forward": [], "jacobian": [], "vjp": []}

    def twice(fn):
        t0 = time.perf_counter()
        res = jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return res, max(first - (time.perf_counter() - t0), 0.0)

    for part in executor.calls():
        shape = call_shape(part)
        if shape in seen:
            continue
        seen.add(shape)
        y, t = twice(lambda part=part: soft_yields(params, relax, part, config))
        out["forward"].append(t)
        out["jacobian"].append(twice(lambda part=part: yields_and_jacobian_call(params, relax, part, config))[1])
        cot = jax.tree.map(lambda a: a * 0 + 1.0, y)
        out["vjp"].append(twice(lambda part=part, cot=cot: yields_vjp_call(params, relax, part, config, cot))[1])
    res = {"call_shapes": len(seen)}
    for mode, times in out.items():
        res[f"compile_seconds_{mode}"] = float(sum(times))
        res[f"compile_seconds_{mode}_max"] = float(max(times, default=0.0))
    return res


def _rows(a) -> np.ndarray:
    """A yields ``[V, bins]`` or Jacobian ``[V, bins, *param_shape]`` array as ``[V, bins, columns]``."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], a.shape[1], -1)


def _paired_leaves(low: dict, ref: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The arrays of two trees of the same structure (``{key: {region: {kind: ...}}}``), in pairs."""
    import jax

    a, ta = jax.tree_util.tree_flatten(low)
    b, tb = jax.tree_util.tree_flatten(ref)
    if ta != tb:
        raise ValueError(f"the trees differ in structure: {ta} vs {tb}")
    return [(_rows(x), _rows(y)) for x, y in zip(a, b)]


def _row_deviation(pairs) -> float:
    """max over rows (one histogram's bins: axis 1) of max |low - ref| / max |ref| (a row of float64
    zeros counts against the largest entry of its array, and absolutely if that is zero too)."""
    worst = 0.0
    for low, ref in pairs:
        diff = np.max(np.abs(low - ref), axis=1)  # [V, columns]
        scale = np.max(np.abs(ref), axis=1)
        fallback = float(np.max(np.abs(ref))) or 1.0
        worst = max(worst, float(np.max(diff / np.where(scale > 0, scale, fallback), initial=0.0)))
    return worst


def yields_deviation(ylds32: dict, ylds64: dict) -> float:
    """Largest deviation of float32 yields from float64 ones, relative to the largest float64 bin of
    the same histogram (sample/variation, region, sumw|sumw2, variation). Target (issue 25): 1e-5."""
    return _row_deviation(_paired_leaves(ylds32, ylds64))


def jacobian_deviation(jac32: dict, jac64: dict) -> float:
    """Largest deviation of float32 Jacobian entries from float64 ones, relative to the largest float64
    entry of their row: d(one histogram's bins)/d(one parameter component), for every sample/variation,
    region, sumw|sumw2, variation and parameter. Target (issue 25): 1e-3."""
    return _row_deviation(_paired_leaves(jac32, jac64))


def _jacobian_deviation(jac32: dict, jac64: dict) -> float:
    """max over (key, region, kind, param) of max|J32 - J64| / max|J64|."""
    worst = 0.0
    for key, by_region in jac64.items():
        for region, by_kind in by_region.items():
            for kind, by_param in by_kind.items():
                for name, j64 in by_param.items():
                    a = np.asarray(j64, dtype=np.float64)
                    b = np.asarray(jac32[key][region][kind][name], dtype=np.float64)
                    scale = float(np.max(np.abs(a)))
                    if scale > 0:
                        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


def call_shape(call) -> tuple:
    """What one compiled program is specialised on: jets, events, lepton slots, file kind, block size,
    dtype and (a :class:`~jacana.stages.keyed.KeyedBatch`'s) number of keys."""
    from jacana.stages.keyed import KeyedBatch

    inner = call.batch if isinstance(call, KeyedBatch) else call
    return (inner.n_jets, inner.n_padded, inner.lepton_pt.shape[1], inner.kinematic, inner.weight_variations,
            inner.block_size, str(inner.dtype), len(call.keys) if isinstance(call, KeyedBatch) else 1)


def _call_pattern(parts) -> dict:
    """How a gradient step is cut into compiled calls: one call per fixed-shape part (a part of several
    keys' events on accelerators: ``keyed_calls``)."""
    from jacana.stages.keyed import KeyedBatch

    calls = len(parts)
    slots = sum(p.n_padded for p in parts)
    selected = int(sum(int(np.sum(np.asarray(p.event_mask))) for p in parts))
    shapes = {call_shape(p) for p in parts}
    return {"calls_per_step": calls, "keyed_calls": sum(isinstance(p, KeyedBatch) for p in parts),
            "events_in_calls": slots, "events_selected": selected,
            "events_per_call": slots / max(calls, 1), "selected_events_per_call": selected / max(calls, 1),
            "call_shapes": len(shapes), "call_sizes": sorted({p.n_padded for p in parts}),
            "block_sizes": sorted({p.block_size for p in parts}), "call_events": max((p.n_padded for p in parts),
                                                                                     default=0)}


def warm_up_parallel(parts, params, relax, config, threads: int, forward: bool = True) -> int:
    """Compile the Jacobian program (and the forward one) of each distinct call shape in ``parts``
    side by side in ``threads`` threads (XLA compiles with the GIL released: on a many-core host the
    compilations overlap), by calling them once on one part of that shape; the later warm-up and the
    timed runs then find them compiled. Returns the number of shapes (0 with ``threads <= 1``: nothing
    done). Calls what the executor's step calls (:func:`~jacana.stages.jacobian.yields_and_jacobian`,
    :func:`~jacana.stages.analysis.chunk_yields`)."""
    if threads <= 1:
        return 0
    from concurrent.futures import ThreadPoolExecutor

    import jax

    from jacana.stages.analysis import chunk_yields
    from jacana.stages.jacobian import yields_and_jacobian

    distinct: dict = {}
    for p in parts:
        distinct.setdefault(call_shape(p), p)
    calls = [(yields_and_jacobian, p) for p in distinct.values()]
    calls += [(chunk_yields, p) for p in distinct.values()] if forward else []
    with ThreadPoolExecutor(min(threads, len(calls))) as pool:
        list(pool.map(lambda c: jax.block_until_ready(c[0](params, relax, [c[1]], config)), calls))
    return len(distinct)


def _device_peak_bytes() -> int | None:
    """Peak memory in use on the default device (accelerators; None on the CPU or where unknown)."""
    from jacana.facility.devices import is_accelerator, platform_of_default_device

    import jax

    platform = platform_of_default_device()
    if not is_accelerator(platform):
        return None
    dev = jax.config.jax_default_device
    dev = dev if dev is not None and not isinstance(dev, str) else jax.devices(platform)[0]
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_benchmark(fileset: str | Path | None = None, events: int = 1_000_000, repeats: int = 2,
                  dtype: str = "float64", reference_repeats: int = 1, histogram: bool = True,
                  compare_float32: bool = False, chunk_size: int = 200_000, *, stat: str = "min",
                  details: bool = True, interleave: bool = False, reference_histograms: dict | None = None,
                  reference: bool = True, forward: bool = True, warm_threads: int = 1) -> dict:
    """Measure the stages on a synthetic dataset of ``events`` events (generated if ``fileset`` is None).

    ``stat`` picks the minimum or the median of the repeated runs; ``details=False`` skips the
    compile times, the VJP and the per-bucket split (``jacana bench`` needs none of them).
    ``interleave=True`` times the reference, the forward pass and the Jacobian in turn within each
    of ``repeats`` rounds (so that a figure and its baselines see the same load on a shared
    machine; the awkward columns then stay in memory beside the dense batches). If
    ``reference_histograms`` is a dict, it receives the conventional analysis' hard histograms
    (``{region: {sample: {variation: ...}}}``, as :func:`~jacana.facility.hardrun.hard_histograms`).
    ``reference=False`` does not time the conventional analysis (it runs once only to fill
    ``reference_histograms``, if given); its figures are then absent, as are the forward pass's
    with ``forward=False``. ``warm_threads > 1`` compiles the programs of the distinct call shapes
    in that many threads before the warm-up (:func:`warm_up_parallel`; timings unchanged).
    """
    if not forward and details:
        raise ValueError("details=True needs the forward pass (forward=True)")
    import jax

    from jacana.facility.devices import platform_of_default_device
    from jacana.facility.executor import InProcessExecutor
    from jacana.facility.hardrun import ColumnStore, hard_histograms

    from jacana.stages.analysis import default_params, default_relax
    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    if fileset is None:
        from jacana.samples.datasets import default_fileset

        fileset = default_fileset("optimize", events=events, progress=False)
    spec = load_spec()
    fs = load_fileset(fileset)
    chunks = [c for s in spec.samples for v in spec.file_variations(s) if fs.has(s, v)
              for c in fs.chunks(s, v, chunk_size=chunk_size)]

    last: list = []
    t_read = None
    if reference or reference_histograms is not None:
        store = ColumnStore(spec)  # the conventional analysis' own reader, every chunk read once here
        t0 = time.perf_counter()
        n_events = sum(len(store.get(c)) for c in chunks)
        t_read = time.perf_counter() - t0
    else:
        store = None
        n_events = sum(c.n_events for c in chunks)

    def reference():  # awkward + hist over the in-memory columns (no reading)
        last[:] = [hard_histograms(spec, chunks, store)]

    if not reference:
        if reference_histograms is not None:
            reference()  # once, for the histograms only
        store = None
    elif not interleave:
        t_reference, c_reference = _timed(reference, reference_repeats, stat)
        store = None  # free the awkward columns before the dense batches are built
    else:
        reference()  # warm-up
    if reference_histograms is not None:
        reference_histograms.update(last[0])

    t0 = time.perf_counter()
    executor = InProcessExecutor(spec, chunks, dtype=np.dtype(dtype))
    parts = executor.calls()
    jax.block_until_ready([p.weight for p in parts])
    t_load = time.perf_counter() - t0
    params, relax = default_params(spec), default_relax(spec)
    from jacana.stages.analysis import soft_yields

    def forward_pass():  # the soft forward program alone, every (sample, file variation)
        return executor.yields(params, relax)

    def jacobian():
        out = executor.yields_and_jacobian(params, relax)
        jax.block_until_ready(out)
        return out

    compile_info = _compile_times(executor, params, relax) if details else {}
    t0 = time.perf_counter()
    shapes_warmed = warm_up_parallel(parts, params, relax, executor.config, warm_threads, forward)
    t_warm_parallel = time.perf_counter() - t0
    # warm-up (compiles, or loads from the persistent cache, every call shape)
    t_warm_forward = None
    if forward:
        t0 = time.perf_counter()
        ylds = forward_pass()
        t_warm_forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    jacobian()
    t_warm_jacobian = time.perf_counter() - t0
    timed = (("reference", reference),) if reference and interleave else ()
    timed += (("forward", forward_pass),) if forward else ()
    timed += (("jacobian", jacobian),)
    if interleave:
        runs: dict = {name: [] for name, _ in timed}
        for _ in range(max(1, repeats)):
            for name, fn in timed:
                runs[name].append(_timed(fn, 1))
        pick = statistics.median if stat == "median" else min
        picked = {k: (pick(w for w, _ in v), pick(c for _, c in v)) for k, v in runs.items()}
        if reference:
            t_reference, c_reference = picked["reference"]
        store = None
    else:
        picked = {name: _timed(fn, repeats, stat) for name, fn in timed}
    t_forward, c_forward = picked.get("forward", (None, None))
    t_jacobian, c_jacobian = picked["jacobian"]

    per_bucket: dict = {}
    vjp_figures: dict = {}
    if details:
        from jacana.stages.soft_stage import cotangents_from, params_inputs, relax_inputs

        cotangents = cotangents_from({k: jax.tree.map(lambda a: a * 0 + 1.0, y) for k, y in ylds.items()})
        stage, p_in, r_in = executor.stage(params), params_inputs(params), relax_inputs(relax)

        def vjp():  # the reverse-mode pass alone (ExecutorBase.yields_vjp also runs the yields first)
            stage.vjp(p_in, r_in, cotangents, tuple(p_in))

        t_vjp, c_vjp = _timed(vjp, repeats, stat)
        vjp_figures = {"seconds_vjp": t_vjp, "cpu_seconds_vjp": c_vjp, "vjp_over_forward": t_vjp / t_forward,
                       "vjp_over_jacobian": t_vjp / t_jacobian}
        from jacana.stages.jacobian import yields_and_jacobian_call

        by_bucket: dict = {}
        for p in parts:
            by_bucket.setdefault(p.bucket_width, []).append(p)
        for k, ps in sorted(by_bucket.items()):
            tf, _ = _timed(lambda ps=ps: jax.block_until_ready([soft_yields(params, relax, p, executor.config)
                                                                for p in ps]), 1)
            tj, _ = _timed(lambda ps=ps: jax.block_until_ready([yields_and_jacobian_call(params, relax, p,
                                                                                         executor.config)
                                                                for p in ps]), 1)
            per_bucket[str(k)] = {"calls": len(ps), "forward": tf, "jacobian": tj}

    pattern = _call_pattern(parts)
    out = {
        "events": n_events, **pattern,
        "calls": pattern["calls_per_step"], "chunks": len(chunks), "dtype": dtype,
        "device": platform_of_default_device(), "cpu_count": os.cpu_count(),
        "seconds_read": t_read, "seconds_load_executor": t_load,
        "seconds_warmup_forward": t_warm_forward, "seconds_warmup_jacobian": t_warm_jacobian,
        **({"seconds_warmup_parallel": t_warm_parallel, "warm_threads": warm_threads,
            "shapes_warmed_in_parallel": shapes_warmed} if shapes_warmed else {}),
        "seconds_jacobian": t_jacobian, "cpu_seconds_jacobian": c_jacobian,
        **vjp_figures,
        "khz_jacobian": n_events / t_jacobian / 1e3,
        **compile_info,
        **({"per_bucket": per_bucket} if details else {}),
    }
    if forward:
        out.update({"seconds_forward": t_forward, "cpu_seconds_forward": c_forward,
                    "jacobian_over_forward": t_jacobian / t_forward, "khz_forward": n_events / t_forward / 1e3})
    if reference:
        out.update({"seconds_reference": t_reference, "cpu_seconds_reference": c_reference,
                    "jacobian_over_reference": t_jacobian / t_reference,
                    "khz_reference": n_events / t_reference / 1e3})
        if forward:
            out["forward_over_reference"] = t_forward / t_reference
    if compare_float32:
        other = "float32" if dtype == "float64" else "float64"
        ylds_main, jac_main = jacobian()
        ex_other = InProcessExecutor(spec, chunks, dtype=np.dtype(other))
        warm_up_parallel(ex_other.calls(), params, relax, ex_other.config,
                         warm_threads, forward=False)
        t0 = time.perf_counter()
        ylds_other, jac_other = jax.block_until_ready(ex_other.yields_and_jacobian(params, relax))
        t_warm_other = time.perf_counter() - t0
        t_o, c_o = _timed(lambda: jax.block_until_ready(ex_other.yields_and_jacobian(params, relax)), repeats, stat)
        (y32, j32), (y64, j64) = (((ylds_other, jac_other), (ylds_main, jac_main)) if other == "float32"
                                  else ((ylds_main, jac_main), (ylds_other, jac_other)))
        out.update({f"seconds_jacobian_{other}": t_o, f"cpu_seconds_jacobian_{other}": c_o,
                    f"seconds_warmup_jacobian_{other}": t_warm_other,
                    "float32_yields_max_deviation": yields_deviation(y32, y64),
                    "float32_jacobian_max_row_deviation": jacobian_deviation(j32, j64),
                    "float32_jacobian_max_relative_deviation": _jacobian_deviation(j32, j64)})
        ex_other.close()
    out["device_peak_bytes"] = _device_peak_bytes()
    if histogram:
        out.update(histogram_benchmark())
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fileset", nargs="?", default=None)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--compare-float32", action="store_true",
                    help="also run the step in the other precision and report float32's deviation from float64")
    ap.add_argument("--no-histogram", action="store_true")
    a = ap.parse_args(argv)
    res = run_benchmark(a.fileset, events=a.events, repeats=a.repeats, dtype=a.dtype,
                        histogram=not a.no_histogram, compare_float32=a.compare_float32)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
