"""``jacana bench``: every performance figure of the pipeline next to its baseline, from one run.

:func:`run_bench` generates synthetic AGC events (:mod:`jacana.samples.synthetic`), measures each
figure and its baseline in the same run (the median of ``repeats`` runs after a warm-up), and
returns one row per figure::

    {"id", "name", "value", "baseline", "ratio", "target", "met", "unit", "note"}

``met`` is True or False, or None where the line was skipped (``note`` says why). The machine
may be noisy: the ratios, not the absolute times, are the verdict. :func:`format_table` prints
the rows. The figures come from the benchmark modules, which can also be run on their own:

1-3. :func:`jacana.bench.passes.run_benchmark`: the gradient step (yields + forward-mode
     Jacobian of every sample and systematic variation, as ``jacana optimize`` calls it each step)
     vs the soft forward pass and vs the conventional awkward + hist analysis of the same
     in-memory events; its throughput in events x variations per second per core (process CPU
     time), next to the AGC reference's 50-72 kHz per core.
4.   :func:`jacana.bench.passes.histogram_benchmark`: relaxed histogram vs
     ``relaxed.ops.hist``, 1 M values, 25 bins, peak (XLA temporary) memory and time.
5.   :func:`streamed_memory`: peak memory of a fresh process streaming an uncached gradient
     step (each chunk read, densified, differentiated and dropped) over 4x vs 1x the events.
6.   :func:`jacana.bench.scaleout.bench_dask` (only with ``workers`` or ``scheduler``).
7.   :func:`jacana.bench.likelihood.bench_likelihood` on the workspace built from the
     benchmark events' own hard histograms.
8.   :func:`first_pass`: the first (reading) pass of the in-process executor (read + densify +
     regroup + move to the device) vs a plain uproot read of the same branches and entries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jacana.stages.errors import ConfigError, JacanaError

from jacana.facility.errors import FacilityError

#: The AGC reference (coffea on a dask facility, no ML step): events per second per core.
AGC_REFERENCE_HZ_PER_CORE = (50e3, 72e3)
#: Targets (issue 8). The dask ones are jacana's own: linear scale-out, a small overhead, one message.
TARGETS = {
    "jacobian_over_forward": 3.0,
    "jacobian_over_reference": 1.0,
    "throughput_cpu_hz_per_core": 1e6,
    "throughput_gpu_hz": 100e6,
    "hist_memory_ratio": 10.0,
    "stream_memory_ratio": 1.2,
    "dask_efficiency": 0.7,
    "dask_scaleout_efficiency": 0.8,  # N workers vs one: speed-up >= 0.8 N (the 1.6 for 2 workers)
    "dask_overhead_fraction": 0.2,
    "dask_bytes_over_message": 1.5,
    "likelihood_over_pyhf": 1.0,
    "first_pass_over_plain_read": 1.5,
}
HIST_EVENTS, HIST_BINS = 1_000_000, 25
STREAM_FACTOR = 4
CHUNK_SIZE = 100_000
FIGURES = 8


def _row(id_: str, name: str, value, baseline, ratio, target: str, met, unit: str, note: str = "") -> dict:
    return {"id": id_, "name": name, "value": value, "baseline": baseline, "ratio": ratio, "target": target,
            "met": None if met is None else bool(met), "unit": unit, "note": note}


def _skipped(id_: str, name: str, target: str, unit: str, why: str) -> dict:
    return _row(id_, name, None, None, None, target, None, unit, f"skipped: {why}")


def _progress(enabled: bool, t0: float, figure: int, what: str) -> None:
    if enabled:
        print(f"jacana bench [{figure}/{FIGURES}] {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_device(device: str) -> str:
    """Make ``device`` ("cpu" or "gpu") JAX's default device; returns its description."""
    import jax

    if device == "cpu":
        dev = jax.devices("cpu")[0]
    elif device == "gpu":
        try:
            devices = jax.devices("gpu")
        except RuntimeError:
            devices = []
        if not devices:
            raise FacilityError("--device gpu: JAX sees no GPU on this machine (backends: "
                                f"{', '.join(sorted({d.platform for d in jax.devices()}))}); install a CUDA build"
                                " of jaxlib (pip install 'jax[cuda12]') or run with --device cpu")
        dev = devices[0]
    else:
        raise ConfigError(f"device must be 'cpu' or 'gpu', got {device!r}")
    jax.config.update("jax_default_device", dev)
    return dev.platform if dev.device_kind == dev.platform else f"{dev.platform} ({dev.device_kind})"


def _configure_jax() -> None:
    """jacana's JAX settings, every compiled program kept in the persistent cache (so that the fresh
    processes of figure 5 load, rather than compile, what this process compiled)."""
    from jacana.facility.jaxsetup import configure_jax

    if "jax_compilation_cache_dir" in configure_jax():
        import jax

        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@contextlib.contextmanager
def _jax_for_bench(device: str):
    """:func:`_configure_jax` and :func:`use_device` for the duration of a run (then restored);
    yields the device's description."""
    import jax

    names = ("jax_persistent_cache_min_compile_time_secs", "jax_default_device")
    before = {n: getattr(jax.config, n) for n in names}
    try:
        _configure_jax()
        yield use_device(device)
    finally:
        for n, v in before.items():
            jax.config.update(n, v)


def variations_per_event(spec, file_variation: str) -> int:
    """Histogram variations computed for each event of a file: every kinematic and weight variation
    on nominal files, the one alternative variation on the others."""
    from jacana.stages.spec import NOMINAL

    if file_variation == NOMINAL:
        return len(spec.kinematic_variations()) + len(spec.weight_variations())
    return 1


# -- 5: a streamed (uncached) pass, in a fresh process -------------------------------------------
def streamed_step(spec, chunks, repeat: int = 1, dtype=np.float64) -> tuple[dict, dict, int]:
    """Yields and Jacobians of one gradient step without caching anything: each chunk is read,
    densified, regrouped, differentiated, added to the totals and dropped (``repeat`` passes over
    ``chunks``). Returns (yields, jacobians, events)."""
    import jax

    from jacana.stages.analysis import add_yields, default_params, default_relax, soft_config
    from jacana.stages.batch import to_device
    from jacana.stages.jacobian import yields_and_jacobian
    from jacana.stages.stats.sensitivity import yields_key

    from jacana.facility.executor import load_batches, rebatch

    config = soft_config(spec)
    params, relax = default_params(spec), default_relax(spec)
    ylds: dict = {}
    jacs: dict = {}
    events = 0
    for _ in range(repeat):
        for chunk in chunks:
            parts = to_device(rebatch(load_batches(chunk, spec, dtype).parts))
            y, j = yields_and_jacobian(params, relax, parts, config)
            key = yields_key(chunk.sample, chunk.variation)
            ylds[key], jacs[key] = add_yields(ylds.get(key), y), add_yields(jacs.get(key), j)
            jax.block_until_ready((ylds[key], jacs[key]))  # one chunk in flight at a time
            events += chunk.n_events
            del parts, y, j
    return ylds, jacs, events


def memory_kb(field: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc (Linux), in kB, or None.
    (``getrusage``'s ``ru_maxrss`` is no use in a child process: it includes the parent's peak.)"""
    try:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith(field + ":")), None)
    except OSError:
        return None


def _stream_probe_main(argv=None) -> None:
    """Subprocess entry of :func:`streamed_memory`: prints one JSON line."""
    import resource

    fileset, repeat, chunk_size, device = (argv or sys.argv[1:])[:4]
    _configure_jax()
    import jax

    use_device(device)
    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    from jacana.facility.hardrun import analysis_chunks

    spec = load_spec()
    chunks = analysis_chunks(spec, load_fileset(fileset), int(chunk_size))
    rss0 = 1024 * (memory_kb("VmRSS") or 0)
    t0 = time.perf_counter()
    ylds, _, events = streamed_step(spec, chunks, int(repeat))
    seconds = time.perf_counter() - t0
    peak = 1024 * (memory_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    stats = (jax.devices("gpu")[0].memory_stats() or {}) if device == "gpu" else {}
    total = float(sum(float(np.sum(np.asarray(a))) for a in jax.tree.leaves(ylds)))
    print(json.dumps({"events": events, "seconds": seconds, "peak_rss_bytes": peak, "rss_before_pass_bytes": rss0,
                      "device_peak_bytes": stats.get("peak_bytes_in_use"), "yield_sum": total}))


def _stream_probe(fileset, repeat: int, chunk_size: int, device: str) -> dict:
    code = "from jacana.bench.suite import _stream_probe_main; _stream_probe_main()"
    res = subprocess.run([sys.executable, "-c", code, str(fileset), str(repeat), str(chunk_size), device],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise FacilityError(f"the streamed-pass probe failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def streamed_memory(fileset, chunk_size: int = CHUNK_SIZE, factor: int = STREAM_FACTOR, device: str = "cpu") -> dict:
    """Peak memory of a fresh process streaming one uncached gradient step over the fileset's events
    once and ``factor`` times (the same chunks again: nothing is kept between chunks, so this is
    ``factor`` x the events for memory). On a GPU the peak device memory is the figure."""
    one = _stream_probe(fileset, 1, chunk_size, device)
    many = _stream_probe(fileset, factor, chunk_size, device)
    key = "device_peak_bytes" if device == "gpu" and one["device_peak_bytes"] else "peak_rss_bytes"
    growth = [r["peak_rss_bytes"] - r["rss_before_pass_bytes"] for r in (one, many)]
    return {"factor": factor, "one": one, "many": many, "memory": key,
            "ratio": many[key] / one[key], "rss_growth_ratio": growth[1] / max(growth[0], 1),
            "yield_sum_consistent": math.isclose(many["yield_sum"], factor * one["yield_sum"], rel_tol=1e-9)}


# -- 8: the first (reading) pass vs a plain uproot read ---------------------------------------------
def first_pass(spec, chunks, repeats: int = 3, dtype=np.float64) -> dict:
    """Median seconds of building the in-process executor (read + densify + regroup + device) and of
    a plain uproot read of the same branches and entries, alternated ``repeats`` times."""
    import jax

    from jacana.bench.scaleout import plain_read_task
    from jacana.facility.executor import InProcessExecutor

    branches = spec.needed_branches()
    plain, first, plain_cpu, first_cpu = [], [], [], []
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.process_time()
        for c in chunks:
            plain_read_task(c.path, spec.tree, branches, c.entry_start, c.entry_stop)
        plain.append(time.perf_counter() - t0)
        plain_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        ex = InProcessExecutor(spec, chunks, dtype=dtype)
        jax.block_until_ready([[p.weight for p in parts] for parts in ex.batches.values()])
        first.append(time.perf_counter() - t0)
        first_cpu.append(time.process_time() - c0)
        ex.close()
    return {"first_pass_s": statistics.median(first), "plain_read_s": statistics.median(plain),
            "first_pass_runs_s": first, "plain_read_runs_s": plain,
            "ratio": statistics.median(first) / statistics.median(plain),
            # the first pass reads ahead on threads while it densifies: its CPU time says what it costs
            "cpu_ratio": statistics.median(first_cpu) / statistics.median(plain_cpu)}


# -- 7: the likelihood ---------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_logger(name: str):
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pyhf_fits(workspace: dict, background_only: bool) -> bool:
    """Whether pyhf's numpy fits can work on ``workspace``: every bin has a positive expected yield
    (from the background samples alone for ``background_only``, as q0's fit at POI = 0 needs).
    A bin expecting nothing where Asimov data has events has no finite likelihood; MINUIT then
    wanders for minutes before it gives up."""
    poi = workspace["measurements"][0]["config"]["poi"]
    for channel in workspace["channels"]:
        total = 0.0
        for sample in channel["samples"]:
            scaled = any(m["type"] == "normfactor" and m["name"] == poi for m in sample["modifiers"])
            if not (background_only and scaled):
                total = total + np.asarray(sample["data"], dtype=np.float64)
        if not np.all(np.asarray(total) > 0):
            return False
    return True


def likelihood_figures(spec, hists: dict, objectives=("sigma_mu", "z0"), repeats: int = 20,
                       pyhf_repeats: int = 3) -> dict:
    """:func:`~jacana.bench.likelihood.bench_likelihood` per objective on the AGC workspace built
    from ``hists`` (the benchmark events' hard histograms) where pyhf's own inference can run on it;
    where it cannot (sparse templates: a bin no (background) sample fills, typical of small samples),
    on :func:`~jacana.bench.likelihood.agc_like_workspace` instead; ``workspace`` says which."""
    import pyhf

    from jacana.bench.likelihood import agc_like_workspace, bench_likelihood
    from jacana.stages.stats.workspace import build_workspace

    events_ws, why = None, "no histograms"
    if hists:
        try:
            events_ws = build_workspace(spec, hists)
        except (JacanaError, ValueError) as exc:
            why = f"building it failed: {exc}"
    out = {}
    for name in objectives:
        res = None
        if events_ws is not None and not _pyhf_fits(events_ws, background_only=name == "z0"):
            reason = f"the events' templates have empty {'background ' if name == 'z0' else ''}bins, pyhf cannot fit"
        elif events_ws is not None:
            try:
                with contextlib.redirect_stdout(sys.stderr), _quiet_logger("pyhf"):  # its failed-fit dump
                    res = bench_likelihood(events_ws, repeats, pyhf_repeats, [name])[name]
                res["workspace"] = "the AGC workspace of the benchmark events"
            except (pyhf.exceptions.FailedMinimization, ValueError, FloatingPointError) as exc:
                reason = f"pyhf failed on the events' workspace: {type(exc).__name__}"
        else:
            reason = why
        if res is None:
            with contextlib.redirect_stdout(sys.stderr):
                res = bench_likelihood(agc_like_workspace(), repeats, pyhf_repeats, [name])[name]
            res["workspace"] = f"agc_like_workspace ({reason})"
        out[name] = res
    return out


# -- the orchestrator ----------------------------------------------------------------------------
def _fileset(events: int, data_dir, stack: contextlib.ExitStack) -> Path:
    from jacana.samples.synthetic import GENERATOR_VERSION, generate

    if data_dir is None:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jacana-bench-")))
    else:
        folder = Path(data_dir) / f"agc_v{GENERATOR_VERSION}_seed1_events{events}"
        if (folder / "fileset.json").is_file():
            return folder / "fileset.json"
    return generate(folder, events=events, seed=1, progress=False)


def _stage_rows(st: dict, spec, chunks, work: int, cores: int, device: str) -> list[dict]:
    """Figures 1-3 from :func:`~jacana.bench.passes.run_benchmark`'s output."""
    n_events = st["events"]
    t_j, t_f, t_r = st["seconds_jacobian"], st["seconds_forward"], st["seconds_reference"]
    cpu_j = st["cpu_seconds_jacobian"]
    rows = [
        _row("1", "gradient step vs soft forward pass", t_j, t_f, t_j / t_f,
             f"<= {TARGETS['jacobian_over_forward']:g}x", t_j / t_f <= TARGETS["jacobian_over_forward"], "s",
             f"yields + d(yields)/d({len(spec.param_values())} params) of every sample and variation,"
             f" {len(chunks)} chunks; CPU time ratio {cpu_j / st['cpu_seconds_forward']:.2f}"),
        _row("2", "gradient step vs awkward + hist hard analysis", t_j, t_r, t_j / t_r,
             f"<= {TARGETS['jacobian_over_reference']:g}x", t_j / t_r <= TARGETS["jacobian_over_reference"], "s",
             f"same in-memory events, no reading; CPU time ratio {cpu_j / st['cpu_seconds_reference']:.2f}"),
    ]
    lo, hi = AGC_REFERENCE_HZ_PER_CORE
    common = (f"baseline: the AGC reference's {lo / 1e3:g}-{hi / 1e3:g} kHz/core (events, reading included);"
              f" {work / n_events:.1f} variations/event; {st['events_selected'] / n_events:.0%} of the events pass"
              f" the prefilter, {st['events_in_calls']:,} event slots with padding")
    if device == "gpu":
        rate = work / t_j
        rows.append(_row("3", "gradient-step throughput (events x variations / s)", rate / 1e6, hi / 1e6, rate / hi,
                         f">= {TARGETS['throughput_gpu_hz'] / 1e6:g} MHz on one GPU",
                         rate >= TARGETS["throughput_gpu_hz"], "MHz",
                         f"{common}; events alone {n_events / t_j / 1e6:.3g} MHz"))
    else:
        rate = work / cpu_j
        rows.append(_row("3", "gradient-step throughput (events x variations / CPU s)", rate / 1e6, hi / 1e6,
                         rate / hi, f">= {TARGETS['throughput_cpu_hz_per_core'] / 1e6:g} MHz/core",
                         rate >= TARGETS["throughput_cpu_hz_per_core"], "MHz/core",
                         f"{common}; events alone {n_events / cpu_j / 1e3:.0f} kHz/core; by wall clock"
                         f" {work / t_j / cores / 1e6:.3g} MHz/core over {cores} cores"))
    return rows


def _histogram_row(h: dict | None, hist_events: int) -> dict:
    name, target = "relaxed histogram vs relaxed.ops.hist: peak memory", f">= {TARGETS['hist_memory_ratio']:g}x less"
    if h is None:
        return _skipped("4", name, target, "MB", "relaxed not installed (pip install -e '.[test]')")
    ratio = h["hist_memory_ratio"]
    return _row("4", name, h["hist_temp_bytes_jacana"] / 1e6, h["hist_temp_bytes_relaxed"] / 1e6, ratio, target,
                ratio >= TARGETS["hist_memory_ratio"], "MB",
                f"{hist_events:,} values, {HIST_BINS} bins, XLA temporary buffers (ratio = baseline/value); time"
                f" {1e3 * h['hist_seconds_jacana']:.1f} vs {1e3 * h['hist_seconds_relaxed']:.1f} ms; peak RSS growth"
                f" {h['hist_rss_growth_jacana'] / 1e6:.0f} vs {h['hist_rss_growth_relaxed'] / 1e6:.0f} MB (CPU)")


def _stream_row(sm: dict) -> dict:
    mem, one, many = sm["memory"], sm["one"], sm["many"]
    return _row("5", f"streamed pass peak memory, {sm['factor']}x vs 1x the events", many[mem] / 1e6,
                one[mem] / 1e6, sm["ratio"], f"<= {TARGETS['stream_memory_ratio']:g}x",
                sm["ratio"] <= TARGETS["stream_memory_ratio"], "MB",
                f"{'device peak' if mem == 'device_peak_bytes' else 'peak RSS'} of a fresh process,"
                f" {one['events']:,} vs {many['events']:,} events in {CHUNK_SIZE:,}-event chunks;"
                f" {one['rss_before_pass_bytes'] / 1e6:.0f} MB before the pass; growth during the pass"
                f" {sm['rss_growth_ratio']:.2f}x; yields"
                f" {'consistent' if sm['yield_sum_consistent'] else 'INCONSISTENT'}")


def _dask_rows(d: dict | None, cores: int, remote: bool) -> list[dict]:
    names = ("dask step, workers vs in-process", "dask per-step overhead", "dask bytes to the driver per step")
    overhead_target = f"<= {TARGETS['dask_overhead_fraction']:g} of the step"
    bytes_target = f"<= {TARGETS['dask_bytes_over_message']:g}x the message"
    if d is None:
        why = "give --workers N (a local dask cluster) or --scheduler ADDRESS to measure it"
        return [_skipped("6a", names[0], f"speed-up >= {TARGETS['dask_efficiency']:g} x cores ratio", "s", why),
                _skipped("6b", names[1], overhead_target, "s", why), _skipped("6c", names[2], bytes_target, "B", why),
                _skipped("6d", "dask scale-out, N workers vs one",
                         f"speed-up >= {TARGETS['dask_scaleout_efficiency']:g} N", "s", why)]
    threads = d.get("worker_threads", d["workers"])
    # linear scale-out: N worker threads do what N of the in-process run's cores do
    expected = (threads if remote else min(threads, cores)) / cores
    t_ratio = d["dask_step_s"] / d["in_process_step_s"]
    bound = 1.0 / (TARGETS["dask_efficiency"] * expected)
    frac = d["step_overhead_s"] / d["dask_step_s"]
    b = d["driver_bytes_per_step"]
    b_ratio = None if b is None else b / d["message_bytes"]
    rows = [
        _row("6a", names[0], d["dask_step_s"], d["in_process_step_s"], t_ratio,
             f"<= {bound:.2f}x (speed-up >= {TARGETS['dask_efficiency']:g} x {expected:.2g})", t_ratio <= bound, "s",
             f"{d['workers']} workers ({threads} threads) vs in-process on {cores} cores; first pass on the workers"
             f" {d['dask_read_pass_s']:.2f} s vs plain read there {d['plain_uproot_read_on_workers_s']:.2f} s"
             + (f" (as fresh workers' first task: {d['plain_uproot_read_on_fresh_workers_s']:.2f} s)"
                if "plain_uproot_read_on_fresh_workers_s" in d else "")),
        _row("6b", names[1], d["step_overhead_s"], d["dask_step_s"], frac, overhead_target,
             frac <= TARGETS["dask_overhead_fraction"], "s",
             f"step wall time minus its slowest shard's; a no-op task's round trip"
             f" {1e3 * d['noop_task_round_trip_s']:.1f} ms"),
        _row("6c", names[2], b, d["message_bytes"], b_ratio, bytes_target,
             None if b_ratio is None else b_ratio <= TARGETS["dask_bytes_over_message"], "B",
             "TCP bytes received by this process per step vs the one response message"
             + (" (not measurable here: needs Linux TCP_INFO)" if b is None else "")),
    ]
    scale_target = TARGETS["dask_scaleout_efficiency"] * d["workers"]
    if "speedup_over_one_worker" in d:
        sp = d["speedup_over_one_worker"]
        rows.append(_row("6d", f"dask scale-out, {d['workers']} workers vs one", d["dask_step_s"], d["one_worker_step_s"],
                         sp, f"speed-up >= {scale_target:.2g}", sp >= scale_target, "s",
                         "ratio = one worker's step time / N workers' (each worker single-threaded and pinned to its own core);"
                         " in-process JAX already uses every core, which is why 6a compares with it differently"))
    else:
        rows.append(_skipped("6d", "dask scale-out, N workers vs one", f"speed-up >= {scale_target:.2g}", "s",
                             "skipped: needs a local cluster of --workers N > 1"))
    return rows


def _likelihood_rows(lk: dict) -> list[dict]:
    rows = []
    for id_, name, label in (("7a", "sigma_mu", "sigma_mu"), ("7b", "z0", "Z0")):
        r = lk[name]
        ratio = r["jacana_vg_ms"] / r["pyhf_numpy_ms"]
        agree = math.isclose(r["value"], r["pyhf_value"], rel_tol=0.02)
        differ = "" if agree else (" (they differ: pyhf's MINUIT HESSE is unreliable on this model, see"
                                   " jacana.stages.stats.inference)" if name == "sigma_mu" else " (they differ)")
        target, met = f"<= {TARGETS['likelihood_over_pyhf']:g}x", ratio <= TARGETS["likelihood_over_pyhf"]
        if r.get("target_ms") is not None:  # the likelihood's own target (stages.bench_likelihood.TARGET_MS)
            target, met = f"{target}, < {r['target_ms']:g} ms", met and r["jacana_vg_ms"] < r["target_ms"]
        rows.append(_row(id_, f"likelihood {label}: jitted value_and_grad vs pyhf numpy", r["jacana_vg_ms"],
                         r["pyhf_numpy_ms"], ratio, target, met and r["grad_finite"], "ms",
                         f"{r['workspace']}; value {r['value']:.5g}, pyhf {r['pyhf_value']:.5g}{differ}; compile"
                         f" {r['compile_s']:.1f} s; pyhf computes the value only"))
    return rows


def _first_pass_row(fp: dict, spec) -> dict:
    return _row("8", "first pass (read + densify) vs plain uproot read", fp["first_pass_s"], fp["plain_read_s"],
                fp["ratio"], f"<= {TARGETS['first_pass_over_plain_read']:g}x",
                fp["ratio"] <= TARGETS["first_pass_over_plain_read"], "s",
                f"in-process executor (read, checks, densify, regroup, to the device; the next chunks read on"
                f" threads meanwhile) vs uproot arrays of the same {len(spec.needed_branches())} branches and entries;"
                f" CPU time ratio {fp.get('cpu_ratio', float('nan')):.3g}")


def run_bench(events: int = 1_000_000, workers: int | None = None, scheduler: str | None = None,
              device: str = "cpu", repeats: int = 3, out: str | Path | None = None, *, data_dir=None,
              progress: bool = True, likelihood_repeats: int = 20, hist_events: int = HIST_EVENTS) -> dict:
    """Run every figure (see the module docstring); returns ``{"rows": [...], "setup": ..., "details": ...}``
    and, with ``out``, writes it there as JSON (atomically). ``data_dir``: generate (or reuse) the
    events there instead of in a temporary folder; ``hist_events``: values of figure 4 (smaller only
    for smoke tests). Progress goes to stderr."""
    if workers is not None and scheduler is not None:
        raise ConfigError("give --workers or --scheduler, not both")
    if events < 10_000:
        raise ConfigError(f"--events must be at least 10,000 (got {events:,}): fewer leave histograms empty")
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1 (got {repeats})")
    import jax

    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    from jacana.bench.passes import histogram_benchmark, run_benchmark
    from jacana.facility.hardrun import analysis_chunks

    t_start = time.perf_counter()
    cores = usable_cores()
    rows: list[dict] = []
    details: dict = {}
    with contextlib.ExitStack() as stack:
        device_name = stack.enter_context(_jax_for_bench(device))
        _progress(progress, t_start, 0, f"generating {events:,} synthetic AGC events")
        fileset = _fileset(events, data_dir, stack)
        spec = load_spec()
        chunks = analysis_chunks(spec, load_fileset(fileset), CHUNK_SIZE)
        work = sum(c.n_events * variations_per_event(spec, c.variation) for c in chunks)

        _progress(progress, t_start, 1, "gradient step, soft forward pass, awkward + hist analysis (figures 1-3)")
        hists: dict = {}
        details["stages"] = run_benchmark(fileset, repeats=repeats, reference_repeats=repeats, histogram=False,
                                          chunk_size=CHUNK_SIZE, stat="median", details=False, interleave=True,
                                          reference_histograms=hists)
        rows += _stage_rows(details["stages"], spec, chunks, work, cores, device)

        _progress(progress, t_start, 4, f"relaxed histogram vs relaxed.ops.hist ({hist_events:,} values)")
        if importlib.util.find_spec("relaxed") is not None:
            details["histogram"] = histogram_benchmark(hist_events, HIST_BINS, repeats=repeats)
        rows.append(_histogram_row(details.get("histogram"), hist_events))

        _progress(progress, t_start, 5, f"streamed (uncached) gradient step, {STREAM_FACTOR}x vs 1x the events")
        details["streamed"] = streamed_memory(fileset, CHUNK_SIZE, STREAM_FACTOR, device)
        rows.append(_stream_row(details["streamed"]))

        _progress(progress, t_start, 6, "dask executor" + ("" if workers or scheduler else ": skipped"))
        if workers is not None or scheduler is not None:
            from jacana.bench.scaleout import bench_dask

            with contextlib.redirect_stdout(sys.stderr):
                details["dask"] = bench_dask(fileset, workers=workers or 2, repeats=repeats, chunk_size=CHUNK_SIZE,
                                             scheduler=scheduler)
        rows += _dask_rows(details.get("dask"), cores, remote=scheduler is not None)

        _progress(progress, t_start, 7, "likelihood: jitted value_and_grad vs pyhf numpy")
        details["likelihood"] = likelihood_figures(spec, hists, repeats=likelihood_repeats, pyhf_repeats=repeats)
        rows += _likelihood_rows(details["likelihood"])

        _progress(progress, t_start, 8, "first pass (read + densify) vs plain uproot read")
        details["first_pass"] = first_pass(spec, chunks, repeats)
        rows.append(_first_pass_row(details["first_pass"], spec))

    result = {
        "rows": rows,
        "setup": {"events": details["stages"]["events"], "events_x_variations": work, "chunks": len(chunks),
                  "chunk_size": CHUNK_SIZE, "device": device_name, "cores": cores, "repeats": repeats,
                  "statistic": "median", "workers": workers, "scheduler": scheduler, "jax": jax.__version__,
                  "python": sys.version.split()[0], "seconds": time.perf_counter() - t_start},
        "details": details,
    }
    if out is not None:
        from jacana.facility.atomic import write_json

        write_json(out, result)
    return result


def _fmt(x, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "B":
        return f"{x:,.0f} B"
    return f"{x:.4g} {unit}"


def format_table(result: dict) -> str:
    """The rows as a text table, each figure's notes below it."""
    s = result["setup"]
    head = (f"jacana bench: {s['events']:,} synthetic AGC events ({s['events_x_variations']:,} events x variations),"
            f" {s['device']}, {s['cores']} cores, median of {s['repeats']} runs, {s['seconds']:.0f} s")
    cols = ("#", "figure", "value", "baseline", "ratio", "target", "verdict")
    body = []
    for r in result["rows"]:
        verdict = "skipped" if r["met"] is None and r["note"].startswith("skipped") else (
            "n/a" if r["met"] is None else ("met" if r["met"] else "NOT MET"))
        body.append((r["id"], r["name"], _fmt(r["value"], r["unit"]), _fmt(r["baseline"], r["unit"]),
                     "-" if r["ratio"] is None else f"{r['ratio']:.3g}x", r["target"], verdict))
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), "  ".join("-" * w for w in widths)]
    for r, b in zip(result["rows"], body, strict=True):
        lines.append("  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)).rstrip())
        if r["note"]:
            lines.append(" " * (widths[0] + 2) + r["note"])
    met = sum(r["met"] is True for r in result["rows"])
    judged = sum(r["met"] is not None for r in result["rows"])
    lines.append(f"{met} of {judged} targets met; ratios are the verdict (absolute times depend on the machine's load)")
    return "\n".join(lines)
