"""Benchmark of the differentiable stages, as ratios measured in one run.

On >= 1 M in-memory events (a synthetic AGC dataset, every sample and file variation):

* ``jacobian_over_forward``: yields + forward-mode Jacobian (all samples, regions, variations,
  bins; 4 cut parameters) / the soft forward pass alone (target <= 3);
* ``vjp_over_forward``: yields + VJP / forward;
* ``jacobian_over_reference``: yields + Jacobian / the conventional awkward + hist hard analysis
  (``reference.fill_histograms``) on the same in-memory columns (target <= 1);
* ``hist_memory_ratio``: peak memory of ``relaxed.ops.hist`` / this package's relaxed histogram at
  1 M events and 25 bins, from XLA's compiled temporary-buffer size and from the RSS growth of a
  fresh subprocess (target >= 10).

Run ``python -m jacana.stages.bench_stages [fileset.json]``; :func:`run_benchmark` returns the dict.
Timings are the minimum over ``repeats`` runs after a warm-up run (compilation excluded and
reported separately).
"""

from __future__ import annotations

import json
import os
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
which, n, bins = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = jnp.asarray(np.random.default_rng(0).normal(300.0, 120.0, n))
edges = jnp.linspace(50.0, 550.0, bins + 1)
if which == "relaxed":
    import relaxed
    f = jax.jit(lambda x: relaxed.hist(x, edges, 10.0))
else:
    from jacana.stages.histogram import soft_histogram
    f = jax.jit(lambda x: soft_histogram(x, edges, 10.0)[0])
compiled = f.lower(x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
jax.block_until_ready(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = compiled(x); jax.block_until_ready(out)
t0 = time.perf_counter(); out = compiled(x); jax.block_until_ready(out); dt = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"temp_bytes": int(temp), "rss_growth_bytes": int(after - before) * 1024, "seconds": dt,
                  "sum": float(jnp.sum(out))}))
"""


def _hist_probe(which: str, n: int, bins: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _HIST_SNIPPET, which, str(n), str(bins)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def histogram_benchmark(n: int = 1_000_000, bins: int = 25) -> dict:
    """Peak memory and time of relaxed.ops.hist vs :func:`soft_histogram` (fresh subprocesses)."""
    ours, theirs = _hist_probe("jacana", n, bins), _hist_probe("relaxed", n, bins)
    assert abs(ours["sum"] - theirs["sum"]) <= 1e-6 * abs(theirs["sum"]), (ours, theirs)
    return {
        "hist_events": n, "hist_bins": bins,
        "hist_temp_bytes_jacana": ours["temp_bytes"], "hist_temp_bytes_relaxed": theirs["temp_bytes"],
        "hist_memory_ratio": theirs["temp_bytes"] / max(ours["temp_bytes"], 1),
        "hist_rss_growth_jacana": ours["rss_growth_bytes"], "hist_rss_growth_relaxed": theirs["rss_growth_bytes"],
        "hist_rss_ratio": theirs["rss_growth_bytes"] / max(ours["rss_growth_bytes"], 1),
        "hist_seconds_jacana": ours["seconds"], "hist_seconds_relaxed": theirs["seconds"],
    }


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_benchmark(fileset: str | Path | None = None, events: int = 1_000_000, repeats: int = 2,
                  dtype: str = "float64", prefilter: bool = False, reference_repeats: int = 1,
                  histogram: bool = True) -> dict:
    """Measure the stages on a synthetic dataset of ``events`` events (generated if ``fileset`` is None)."""
    import jax

    from .analysis import chunk_yields, default_params, default_relax, soft_config
    from .batch import make_batches, to_device
    from .columns import read_chunk
    from .fileset import load_fileset
    from .jacobian import yields_and_jacobian, yields_vjp
    from .reference import fill_histograms
    from .spec import load_spec

    if fileset is None:
        from jacana.facility.datasets import default_fileset

        fileset = default_fileset("optimize", events=events, progress=False)
    spec = load_spec()
    fs = load_fileset(fileset)
    chunks = [c for s in spec.samples for v in spec.file_variations(s) if fs.has(s, v)
              for c in fs.chunks(s, v, chunk_size=200_000)]
    t0 = time.perf_counter()
    columns = [read_chunk(c, spec) for c in chunks]
    t_read = time.perf_counter() - t0
    n_events = sum(len(c) for c in columns)

    def reference():
        for col in columns:
            fill_histograms(col, spec)

    t_reference = _timed(reference, reference_repeats)

    t0 = time.perf_counter()
    batches = [to_device(make_batches(col, spec, dtype=np.dtype(dtype), prefilter=prefilter)) for col in columns]
    jax.block_until_ready([b.parts for b in batches])
    t_batch = time.perf_counter() - t0
    n_padded = sum(b.n_padded for b in batches)
    config = soft_config(spec)
    params, relax = default_params(spec), default_relax(spec)

    def forward():
        out = [chunk_yields(params, relax, b, config) for b in batches]
        jax.block_until_ready(out)
        return out

    def jacobian():
        jax.block_until_ready([yields_and_jacobian(params, relax, b, config) for b in batches])

    ylds = forward()
    cotangents = [jax.tree.map(lambda a: a * 0 + 1.0, y) for y in ylds]

    def vjp():
        jax.block_until_ready([yields_vjp(params, relax, b, config, ct) for b, ct in zip(batches, cotangents)])

    t0 = time.perf_counter()
    forward(), jacobian(), vjp()  # warm-up: compiles every shape
    t_compile = time.perf_counter() - t0
    t_forward = _timed(forward, repeats)
    t_jacobian = _timed(jacobian, repeats)
    t_vjp = _timed(vjp, repeats)
    out = {
        "events": n_events, "events_padded": n_padded, "chunks": len(chunks), "dtype": dtype,
        "prefilter": prefilter, "cpu_count": os.cpu_count(),
        "parts": sum(len(b.parts) for b in batches),
        "shapes": len({(p.n_padded, p.lepton_pt.shape[1], p.n_jets, len(p.kinematic)) for b in batches for p in b.parts}),
        "seconds_read": t_read, "seconds_batch": t_batch, "seconds_compile_all": t_compile,
        "seconds_reference": t_reference, "seconds_forward": t_forward,
        "seconds_jacobian": t_jacobian, "seconds_vjp": t_vjp,
        "jacobian_over_forward": t_jacobian / t_forward,
        "vjp_over_forward": t_vjp / t_forward,
        "jacobian_over_reference": t_jacobian / t_reference,
        "forward_over_reference": t_forward / t_reference,
        "khz_forward": n_events / t_forward / 1e3, "khz_jacobian": n_events / t_jacobian / 1e3,
        "khz_reference": n_events / t_reference / 1e3,
    }
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
    ap.add_argument("--prefilter", action="store_true")
    ap.add_argument("--no-histogram", action="store_true")
    a = ap.parse_args(argv)
    res = run_benchmark(a.fileset, events=a.events, repeats=a.repeats, dtype=a.dtype, prefilter=a.prefilter,
                        histogram=not a.no_histogram)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
