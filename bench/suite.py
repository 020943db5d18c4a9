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
9.   (``dtype="float32"``, or asked for in ``rows``) mixed precision: the gradient step on float32
     batches (float32 event arithmetic, float64 histogram sums) vs float64: 9a the yields' largest
     deviation (relative to their histogram's largest bin, target 1e-5), 9b the Jacobian's (relative
     to the largest entry of its row, target 1e-3): :func:`jacana.bench.passes.yields_deviation`,
     :func:`~jacana.bench.passes.jacobian_deviation`.

``rows`` picks figures (e.g. ``{"1", "3", "5", "7", "9"}``, what a GPU needs); ``dtype`` the batches'
precision of figures 1-3, 5 and 8. Rows 1 and 3 report the call pattern: compiled-program calls
per gradient step and events per call.
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
from jacana.stages.shapes import BATCH_DTYPES

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
#: Figures ``rows`` may name: 6 is rows 6a-6d, 7 is 7a/7b, 9 (mixed precision) is 9a/9b.
ALL_FIGURES = ("1", "2", "3", "4", "5", "6", "7", "8", "9")
#: Figures of a run without ``rows`` (today's table); ``dtype="float32"`` adds figure 9.
DEFAULT_FIGURES = ALL_FIGURES[:FIGURES]
#: Mixed-precision targets (issue 25): float32 yields and Jacobians vs float64.
FLOAT32_YIELDS_TOLERANCE = 1e-5
FLOAT32_JACOBIAN_TOLERANCE = 1e-3


def _row(id_: str, name: str, value, baseline, ratio, target: str, met, unit: str, note: str = "") -> dict:
    return {"id": id_, "name": name, "value": value, "baseline": baseline, "ratio": ratio, "target": target,
            "met": None if met is None else bool(met), "unit": unit, "note": note}


def _skipped(id_: str, name: str, target: str, unit: str, why: str) -> dict:
    return _row(id_, name, None, None, None, target, None, unit, f"skipped: {why}")


def _progress(enabled: bool, t0: float, figure: int, what: str, total: int = FIGURES) -> None:
    if enabled:
        print(f"jacana bench [{figure}/{total}] {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)


def parse_rows(rows) -> tuple[str, ...]:
    """Figures named by ``rows`` (``"1,3,5,7"``, or an iterable of ids; ``7a``/``7b`` name figure 7),
    in table order. Raises ConfigError on an unknown figure."""
    items = rows.split(",") if isinstance(rows, str) else list(rows)
    picked = set()
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        figure = name.rstrip("abcd") if len(name) > 1 else name
        if figure not in ALL_FIGURES:
            raise ConfigError(f"--rows: no figure {item!r} (figures: {', '.join(ALL_FIGURES)}; 6a-6d, 7a/7b and"
                              " 9a/9b are rows of figures 6, 7 and 9)")
        picked.add(figure)
    if not picked:
        raise ConfigError("--rows: name at least one figure, e.g. --rows 1,3,5,7")
    return tuple(f for f in ALL_FIGURES if f in picked)


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

    args = (argv or sys.argv[1:])
    fileset, repeat, chunk_size, device = args[:4]
    dtype = np.dtype(args[4] if len(args) > 4 else "float64")
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
    ylds, _, events = streamed_step(spec, chunks, int(repeat), dtype=dtype)
    seconds = time.perf_counter() - t0
    peak = 1024 * (memory_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    stats = (jax.devices("gpu")[0].memory_stats() or {}) if device == "gpu" else {}
    total = float(sum(float(np.sum(np.asarray(a))) for a in jax.tree.leaves(ylds)))
    print(json.dumps({"events": events, "seconds": seconds, "peak_rss_bytes": peak, "rss_before_pass_bytes": rss0,
                      "device_peak_bytes": stats.get("peak_bytes_in_use"), "yield_sum": total}))


def _stream_probe(fileset, repeat: int, chunk_size: int, device: str, dtype: str = "float64") -> dict:
    code = "from jacana.bench.suite import _stream_probe_main; _stream_probe_main()"
    res = subprocess.run([sys.executable, "-c", code, str(fileset), str(repeat), str(chunk_size), device,
                          np.dtype(dtype).name], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise FacilityError(f"the streamed-pass probe failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def streamed_memory(fileset, chunk_size: int = CHUNK_SIZE, factor: int = STREAM_FACTOR, device: str = "cpu",
                    dtype: str = "float64") -> dict:
    """Peak memory of a fresh process streaming one uncached gradient step over the fileset's events
    once and ``factor`` times (the same chunks again: nothing is kept between chunks, so this is
    ``factor`` x the events for memory). On a GPU the peak device memory is the figure."""
    one = _stream_probe(fileset, 1, chunk_size, device, dtype)
    many = _stream_probe(fileset, factor, chunk_size, device, dtype)
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
        jax.block_until_ready([p.weight for p in ex.calls()])
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
def bench_fileset(events: int, data_dir) -> Path:
    """The fileset of ``jacana bench --events N --data-dir D``: generated there (seed 1) unless it
    already is; so a script can generate the events ahead, or beside other work."""
    from jacana.samples.synthetic import GENERATOR_VERSION, generate

    folder = Path(data_dir) / f"agc_v{GENERATOR_VERSION}_seed1_events{events}"
    if (folder / "fileset.json").is_file():
        return folder / "fileset.json"
    return generate(folder, events=events, seed=1, progress=False)


def _fileset(events: int, data_dir, stack: contextlib.ExitStack) -> Path:
    if data_dir is None:
        from jacana.samples.synthetic import generate

        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jacana-bench-")))
        return generate(folder, events=events, seed=1, progress=False)
    return bench_fileset(events, data_dir)


def _call_note(st: dict) -> str:
    """The call pattern of a gradient step (absent from canned or older measurements: empty)."""
    if "calls_per_step" not in st:
        return ""
    keyed = f" ({st['keyed_calls']} over several samples/files)" if st.get("keyed_calls") else ""
    note = (f"; {st['calls_per_step']} calls per step{keyed}, {st['events_per_call']:,.0f} events per call"
            f" ({st['selected_events_per_call']:,.0f} selected), {st['call_shapes']} call shapes")
    if st.get("seconds_warmup_jacobian") is not None:
        note += "; warm-up (compile or cache load)"
        if st.get("seconds_warmup_parallel") is not None:
            note += f" {st['seconds_warmup_parallel']:.1f} s in {st['warm_threads']} threads, then"
        if st.get("seconds_warmup_forward") is not None:
            note += f" forward {st['seconds_warmup_forward']:.1f} s,"
        note += f" Jacobian {st['seconds_warmup_jacobian']:.1f} s"
    if st.get("device_peak_bytes"):
        note += f"; device peak {st['device_peak_bytes'] / 1e9:.2f} GB"
    return note


def _stage_rows(st: dict, spec, chunks, work: int, cores: int, device: str,
                figures=("1", "2", "3")) -> list[dict]:
    """Figures 1-3 (those in ``figures``) from :func:`~jacana.bench.passes.run_benchmark`'s output."""
    n_events = st["events"]
    t_j, t_f = st["seconds_jacobian"], st.get("seconds_forward")
    cpu_j = st["cpu_seconds_jacobian"]
    dtype = st.get("dtype", "float64")
    precision = "" if dtype == "float64" else f"; {dtype} batches (float64 histogram sums)"
    rows = []
    if "1" in figures:
        rows.append(_row("1", "gradient step vs soft forward pass", t_j, t_f, t_j / t_f,
                         f"<= {TARGETS['jacobian_over_forward']:g}x", t_j / t_f <= TARGETS["jacobian_over_forward"],
                         "s", f"yields + d(yields)/d({len(spec.param_values())} params) of every sample and variation,"
                         f" {len(chunks)} chunks; CPU time ratio {cpu_j / st['cpu_seconds_forward']:.2f}"
                         f"{_call_note(st)}{precision}"))
    if "2" in figures:
        t_r = st["seconds_reference"]
        rows.append(_row("2", "gradient step vs awkward + hist hard analysis", t_j, t_r, t_j / t_r,
                         f"<= {TARGETS['jacobian_over_reference']:g}x", t_j / t_r <= TARGETS["jacobian_over_reference"],
                         "s", f"same in-memory events, no reading; CPU time ratio"
                         f" {cpu_j / st['cpu_seconds_reference']:.2f}{precision}"))
    if "3" not in figures:
        return rows
    lo, hi = AGC_REFERENCE_HZ_PER_CORE
    common = (f"baseline: the AGC reference's {lo / 1e3:g}-{hi / 1e3:g} kHz/core (events, reading included);"
              f" {work / n_events:.1f} variations/event; {st['events_selected'] / n_events:.0%} of the events pass"
              f" the prefilter, {st['events_in_calls']:,} event slots with padding{_call_note(st)}{precision}")
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


def _precision_rows(st: dict) -> list[dict]:
    """Figure 9: float32 (mixed precision) vs float64, from run_benchmark(compare_float32=True)."""
    names = ("mixed precision (float32 events, float64 sums): yields vs float64",
             "mixed precision (float32 events, float64 sums): Jacobian vs float64")
    targets = (f"<= {FLOAT32_YIELDS_TOLERANCE:g} of the histogram's largest bin",
               f"<= {FLOAT32_JACOBIAN_TOLERANCE:g} of the largest entry of its row")
    if "float32_yields_max_deviation" not in st:
        why = "the float32 comparison did not run"
        return [_skipped("9a", names[0], targets[0], "rel", why), _skipped("9b", names[1], targets[1], "rel", why)]
    t32 = st["seconds_jacobian"] if st.get("dtype") == "float32" else st["seconds_jacobian_float32"]
    t64 = st["seconds_jacobian"] if st.get("dtype", "float64") == "float64" else st["seconds_jacobian_float64"]
    speed = f"gradient step float32 {t32:.3g} s vs float64 {t64:.3g} s ({t64 / t32:.2f}x faster)"
    y, j = st["float32_yields_max_deviation"], st["float32_jacobian_max_row_deviation"]
    return [
        _row("9a", names[0], y, FLOAT32_YIELDS_TOLERANCE, y / FLOAT32_YIELDS_TOLERANCE, targets[0],
             y <= FLOAT32_YIELDS_TOLERANCE, "rel",
             f"max over every sample/variation, region, sumw|sumw2 and variation histogram; {speed}"),
        _row("9b", names[1], j, FLOAT32_JACOBIAN_TOLERANCE, j / FLOAT32_JACOBIAN_TOLERANCE, targets[1],
             j <= FLOAT32_JACOBIAN_TOLERANCE, "rel",
             "row: d(one histogram's bins)/d(one parameter); relative to the largest float64 entry of the whole"
             f" (sample/variation, region, parameter) block: {st['float32_jacobian_max_relative_deviation']:.3g}"),
    ]


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
    """Rows 7a/7b: the time against pyhf's own computation of the same value (for sigma_mu the checked
    reference of ``bench.likelihood.pyhf_sigma_mu_reference``: MINUIT only where its covariance flags
    are fine, else pyhf's profile scan), and the two values compared in plain words."""
    from jacana.bench.likelihood import comparison

    rows = []
    for id_, name, label in (("7a", "sigma_mu", "sigma_mu"), ("7b", "z0", "Z0")):
        r = lk[name]
        # with the events on an accelerator the objective stage runs on the host CPU
        # (facility.devices.likelihood_device): that is the time a step pays
        ms = r["jacana_vg_ms"] if r.get("jacana_vg_cpu_ms") is None else r["jacana_vg_cpu_ms"]
        where = "" if r.get("jacana_vg_cpu_ms") is None else (
            f"; on the host CPU, where the objective runs (on the accelerator {r['jacana_vg_ms']:.3g} ms from"
            f" device yields, {r['jacana_vg_host_input_ms']:.3g} ms from host yields)")
        ratio = ms / r["pyhf_numpy_ms"]
        target, met = f"<= {TARGETS['likelihood_over_pyhf']:g}x", ratio <= TARGETS["likelihood_over_pyhf"]
        if r.get("target_ms") is not None:  # the likelihood's own target (stages.bench_likelihood.TARGET_MS)
            target, met = f"{target}, < {r['target_ms']:g} ms", met and ms < r["target_ms"]
        rows.append(_row(id_, f"likelihood {label}: jitted value_and_grad vs pyhf numpy", ms,
                         r["pyhf_numpy_ms"], ratio, target, met and r["grad_finite"], "ms",
                         f"{r['workspace']}; {comparison(r)}; compile {r['compile_s']:.1f} s; timed against"
                         f" {r.get('pyhf_method', 'pyhf numpy')} (the value only){where}"))
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
              progress: bool = True, likelihood_repeats: int = 20, hist_events: int = HIST_EVENTS,
              dtype: str = "float64", rows=None, warm_threads: int = 1) -> dict:
    """Run every figure (see the module docstring); returns ``{"rows": [...], "setup": ..., "details": ...}``
    and, with ``out``, writes it there as JSON (atomically). ``data_dir``: generate (or reuse) the
    events there instead of in a temporary folder; ``hist_events``: values of figure 4 (smaller only
    for smoke tests); ``dtype``: the batches' precision ("float32": mixed precision, adds figure 9);
    ``rows``: only these figures (:func:`parse_rows`; default figures 1-8); ``warm_threads``: compile
    the step's programs in that many threads before figures 1-3 and 9 warm up (timings unchanged;
    for many-core hosts of an accelerator). Progress goes to stderr."""
    if workers is not None and scheduler is not None:
        raise ConfigError("give --workers or --scheduler, not both")
    if events < 10_000:
        raise ConfigError(f"--events must be at least 10,000 (got {events:,}): fewer leave histograms empty")
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1 (got {repeats})")
    if warm_threads < 1:
        raise ConfigError(f"--warm-threads must be at least 1 (got {warm_threads})")
    if dtype not in BATCH_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(BATCH_DTYPES)}, got {dtype!r}")
    figures = parse_rows(rows) if rows is not None else DEFAULT_FIGURES + (("9",) if dtype == "float32" else ())
    total = int(figures[-1])
    import jax

    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    from jacana.bench.passes import histogram_benchmark, run_benchmark
    from jacana.facility.hardrun import analysis_chunks

    t_start = time.perf_counter()
    cores = usable_cores()
    table: list[dict] = []
    details: dict = {}
    with contextlib.ExitStack() as stack:
        device_name = stack.enter_context(_jax_for_bench(device))
        _progress(progress, t_start, 0, f"generating {events:,} synthetic AGC events", total)
        fileset = _fileset(events, data_dir, stack)
        spec = load_spec()
        chunks = analysis_chunks(spec, load_fileset(fileset), CHUNK_SIZE)
        work = sum(c.n_events * variations_per_event(spec, c.variation) for c in chunks)

        hists: dict = {}
        stage_figures = [f for f in ("1", "2", "3") if f in figures]
        if stage_figures or "9" in figures:
            what = ", ".join(filter(None, ("gradient step" if {"1", "3"} & set(figures) else "",
                                           "soft forward pass" if "1" in figures else "",
                                           "awkward + hist analysis" if "2" in figures else "",
                                           "float32 vs float64" if "9" in figures else "")))
            _progress(progress, t_start, int((stage_figures or ["9"])[0]), f"{what} (figures"
                      f" {', '.join(stage_figures + (['9'] if '9' in figures else []))})", total)
            details["stages"] = run_benchmark(fileset, repeats=repeats, reference_repeats=repeats, histogram=False,
                                              chunk_size=CHUNK_SIZE, stat="median", details=False, interleave=True,
                                              reference_histograms=hists if "7" in figures else None,
                                              dtype=dtype, reference="2" in figures, forward="1" in figures,
                                              compare_float32="9" in figures, warm_threads=warm_threads)
            table += _stage_rows(details["stages"], spec, chunks, work, cores, device, stage_figures)

        if "4" in figures:
            _progress(progress, t_start, 4, f"relaxed histogram vs relaxed.ops.hist ({hist_events:,} values)", total)
            if importlib.util.find_spec("relaxed") is not None:
                details["histogram"] = histogram_benchmark(hist_events, HIST_BINS, repeats=repeats)
            table.append(_histogram_row(details.get("histogram"), hist_events))

        if "5" in figures:
            _progress(progress, t_start, 5, f"streamed (uncached) gradient step, {STREAM_FACTOR}x vs 1x the events",
                      total)
            details["streamed"] = streamed_memory(fileset, CHUNK_SIZE, STREAM_FACTOR, device, dtype)
            table.append(_stream_row(details["streamed"]))

        if "6" in figures:
            _progress(progress, t_start, 6, "dask executor" + ("" if workers or scheduler else ": skipped"), total)
            if workers is not None or scheduler is not None:
                from jacana.bench.scaleout import bench_dask

                with contextlib.redirect_stdout(sys.stderr):
                    details["dask"] = bench_dask(fileset, workers=workers or 2, repeats=repeats,
                                                 chunk_size=CHUNK_SIZE, scheduler=scheduler)
            table += _dask_rows(details.get("dask"), cores, remote=scheduler is not None)

        if "7" in figures:
            _progress(progress, t_start, 7, "likelihood: jitted value_and_grad vs pyhf numpy", total)
            if not hists and "stages" not in details:  # the events' hard histograms, for their workspace
                from jacana.facility.hardrun import ColumnStore, hard_histograms

                hists = hard_histograms(spec, chunks, ColumnStore(spec))
            details["likelihood"] = likelihood_figures(spec, hists, repeats=likelihood_repeats, pyhf_repeats=repeats)
            table += _likelihood_rows(details["likelihood"])

        if "8" in figures:
            _progress(progress, t_start, 8, "first pass (read + densify) vs plain uproot read", total)
            details["first_pass"] = first_pass(spec, chunks, repeats, np.dtype(dtype))
            table.append(_first_pass_row(details["first_pass"], spec))

        if "9" in figures:
            table += _precision_rows(details["stages"])

    n_events = details["stages"]["events"] if "stages" in details else sum(c.n_events for c in chunks)
    setup = {"events": n_events, "events_x_variations": work, "chunks": len(chunks),
             "chunk_size": CHUNK_SIZE, "device": device_name, "cores": cores, "repeats": repeats,
             "statistic": "median", "workers": workers, "scheduler": scheduler, "jax": jax.__version__,
             "python": sys.version.split()[0], "seconds": time.perf_counter() - t_start}
    if dtype != "float64" or rows is not None:
        setup.update({"dtype": dtype, "figures": list(figures)})
    st = details.get("stages", {})
    if "calls_per_step" in st:
        setup.update({k: st[k] for k in ("calls_per_step", "keyed_calls", "events_per_call", "selected_events_per_call",
                                         "call_shapes") if k in st})
    result = {"rows": table, "setup": setup, "details": details}
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
            f" {s['device']}, {s['cores']} cores, median of {s['repeats']} runs, {s['seconds']:.0f} s"
            + (f", {s['dtype']} batches" if s.get("dtype", "float64") != "float64" else ""))
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
