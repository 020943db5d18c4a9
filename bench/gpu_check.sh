#!/usr/bin/env bash
# Issue 25's GPU check: ONE run on the device machine (an H200), from the repository root, e.g.
#
#   run(command="BUDGET_S=480 bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# .whl/ (git-ignored, see .git/info/exclude) holds cp312 manylinux x86_64 wheels of what the
# device's image lacks (awkward, uproot, hist, pyhf, iminuit, jsonschema, vector, dask, ...) and a
# wheel of jacana. The script installs them into $SITE (pip --target, no index), installs jacana
# built from THIS tree (the carried jacana wheel only if that build fails), then measures on the GPU,
# each step under `timeout`, within BUDGET_S seconds in all (default 480), most important first (a
# step that times out loses only its own JSON; every file is written to $OUT as soon as it exists):
#   A. `jacana bench --events 1M --rows 1,3` (float64): rows 1, 3 (gradient step vs forward pass,
#      throughput, calls per step) -> a_rows13_float64.json. (Rows 1, 3 and 9 in one run took over
#      210 s on the H200 on 2026-12-04, most of it compiling 93 programs: row 9 is H's job.)
#   H. row 9 and more: the float32 (mixed precision) gradient step's deviation from float64 with
#      jax_default_matmul_precision=$PRECISION (default "highest": no TF32 matrix products), then
#      at JAX's default precision (what `jacana bench --rows 9` reports), in one process, the
#      float64 reference from A's cache; the step times under each -> h_precision.json. Since
#      a494aab the programs ask for Precision.HIGHEST on their matrix products themselves, so the
#      two should now agree (before: 3.4e-4 vs 0.023 of a histogram's largest bin at 1M events).
#   L. `python -m jacana.bench.likelihood` on the AGC-like model: the likelihood's value_and_grad on
#      the GPU and on the host CPU (where the objective stage runs with events on a GPU: issue 25
#      item 4) -> l_likelihood.json
#   5. `jacana bench --events 1M --rows 5`: streamed pass, device peak memory, 4x vs 1x the
#      events (two fresh processes) -> r5_row5_float64.json
#   C. `jacana bench --events 4M --rows 3` (float64): how the throughput scales
#      -> c_row3_float64_big.json, if time allows
# The events are generated on the device (1M, and 4M in the background) under $DATA. After A, two
# background processes at nice 19 compile, into the persistent cache ($JACANA_CACHE/xla), the
# programs that row 5's fresh processes (streamed 100k-event chunks: other call shapes) and the 4M
# run (larger calls) will need, so that those steps load rather than compile them (and row 5's
# two processes see the same allocations). They run beside H, whose timings are therefore only
# indicative (its JSON records the load); A's timings run alone.
# Rehearse on a CPU with e.g.
#   OUT=/tmp/gpu_rehearsal DEVICE=cpu EVENTS=20000 BIG_EVENTS=40000 PY=/path/to/python3.12 \
#     SITE=/tmp/site-rehearsal BUDGET_S=1800 bash bench/gpu_check.sh
set -u -o pipefail

START=$(date +%s)
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PY:-python3}
DEVICE=${DEVICE:-gpu}
EVENTS=${EVENTS:-1000000}
BIG_EVENTS=${BIG_EVENTS:-4000000}
BUDGET_S=${BUDGET_S:-480}
REPEATS=${REPEATS:-3}
PRECISION=${PRECISION:-highest}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
DATA=${DATA:-/tmp/jacana-data}
WARM_THREADS=${WARM_THREADS:-$(nproc)}
WORK=${WORK:-/tmp/gpu_check_work}
export JACANA_CACHE=${JACANA_CACHE:-/tmp/jacana-cache}
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}; fi

mkdir -p "$OUT" "$DATA" "$JACANA_CACHE" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( START + BUDGET_S - $(date +%s) )); }
say() { echo "== [$(elapsed) s] $*"; }

say "gpu_check: device=$DEVICE events=$EVENTS big=$BIG_EVENTS budget=${BUDGET_S}s repeats=$REPEATS" \
    "precision=$PRECISION warm_threads=$WARM_THREADS host=$(hostname) cores=$(nproc) date=$(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv

# -- install: the carried wheels, then jacana from this tree -------------------------------------
rm -rf "$SITE" && mkdir -p "$SITE"
deps=$(ls "$WHEELS"/*.whl 2>/dev/null | grep -v '/jacana-')
[ -n "$deps" ] || { say "no wheels in $WHEELS (carry it: carry=[\".whl\"])"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $deps \
    || { say "installing the wheels failed"; exit 2; }
jw=/tmp/jacana-wheel-$$
if "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$jw" . >"$OUT/jacana_build.txt" 2>&1; then
    jacana_whl=$(ls "$jw"/jacana-*.whl)
    say "jacana built from this tree: $(basename "$jacana_whl")"
    rm -f "$OUT/jacana_build.txt"
else
    jacana_whl=$(ls "$WHEELS"/jacana-*.whl 2>/dev/null | head -1)
    say "WARNING: building jacana from this tree failed (see jacana_build.txt); using the carried $jacana_whl," \
        "which may predate the tree"
    [ -n "$jacana_whl" ] || exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$jacana_whl" \
    || { say "installing jacana failed"; exit 2; }
export PYTHONPATH=$SITE
say "installed into $SITE"

"$PY" - <<'EOF' || { say "the environment is not usable"; exit 2; }
import importlib, importlib.metadata, sys
import jax, numpy
import jacana.bench.suite
print("python", sys.version.split()[0], "| jax", jax.__version__, "| numpy", numpy.__version__)
print("jax.devices():", jax.devices(), "| default matmul precision:", jax.config.jax_default_matmul_precision)
print("jacana from", jacana.bench.suite.__file__)
for name in ("awkward", "uproot", "hist", "pyhf", "iminuit", "jsonschema", "scipy", "equinox", "optax"):
    importlib.import_module(name)
    print(f"  {name} {importlib.metadata.version(name)}")
EOF

# -- the helper: prewarm (compile into the persistent cache) and the precision check -------------
HELPER=$WORK/gpu_check_helper.py
cat >"$HELPER" <<'EOF'
"""gpu_check.sh's helper. Usage:
  helper.py prewarm executor|stream FILESET DEVICE THREADS   compile the float64 Jacobian programs that
      `jacana bench` (in-process executor) or row 5's streamed pass would compile, into the cache
  helper.py precision FILESET DEVICE THREADS REPEATS PRECISION OUT_JSON
      float32 gradient step's deviation from float64 under jax_default_matmul_precision=PRECISION,
      then under the default precision; float32 step times"""
import json, os, statistics, sys, time

import numpy as np


def setup(device):
    from jacana.bench.suite import _configure_jax, use_device

    _configure_jax()  # jacana's settings and the persistent cache, as `jacana bench` and its probes
    return use_device(device)


def load(fileset):
    from jacana.bench.suite import CHUNK_SIZE
    from jacana.facility.hardrun import analysis_chunks
    from jacana.stages.analysis import default_params, default_relax
    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    spec = load_spec()
    return spec, analysis_chunks(spec, load_fileset(fileset), CHUNK_SIZE), default_params(spec), default_relax(spec)


def prewarm(mode, fileset, device, threads):
    from jacana.bench.passes import call_shape, warm_up_parallel
    from jacana.facility.executor import InProcessExecutor, load_batches, rebatch
    from jacana.stages.analysis import soft_config
    from jacana.stages.batch import to_device

    t0 = time.perf_counter()
    setup(device)
    spec, chunks, params, relax = load(fileset)
    if mode == "executor":
        ex = InProcessExecutor(spec, chunks, dtype=np.dtype("float64"))
        parts, config = ex.calls(), ex.config
    else:  # row 5's streamed pass: each chunk regrouped on its own (streamed_step)
        config, seen = soft_config(spec), {}
        for c in chunks:
            for p in to_device(rebatch(load_batches(c, spec, np.dtype("float64")).parts)):
                seen.setdefault(call_shape(p), p)
        parts = list(seen.values())
    t1 = time.perf_counter()
    n = warm_up_parallel(parts, params, relax, config, max(2, threads), forward=False)
    print(json.dumps({"prewarm": mode, "fileset": str(fileset), "shapes": n, "load_s": round(t1 - t0, 1),
                      "compile_s": round(time.perf_counter() - t1, 1)}), flush=True)


def precision(fileset, device, threads, repeats, prec, out):
    import jax

    from jacana.bench import passes
    from jacana.bench.passes import jacobian_deviation, warm_up_parallel, yields_deviation
    from jacana.facility.executor import InProcessExecutor

    t_start = time.perf_counter()
    res = {"device": setup(device), "jax": jax.__version__, "fileset": str(fileset), "repeats": repeats,
           "statistic": "median", "default_matmul_precision_at_start": jax.config.jax_default_matmul_precision}

    def save():
        res["seconds"] = round(time.perf_counter() - t_start, 1)
        tmp = out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(tmp, out)

    spec, chunks, params, relax = load(fileset)

    def step(ex, label):
        parts = ex.calls()
        t0 = time.perf_counter()
        warm_up_parallel(parts, params, relax, ex.config, threads, forward=False)
        y, j = jax.block_until_ready(ex.yields_and_jacobian(params, relax))
        res[f"warmup_s_{label}"] = round(time.perf_counter() - t0, 2)
        return y, j

    def timed(ex, label):
        alive = [p for p in os.environ.get("BG_PIDS", "").split() if p and os.path.exists(f"/proc/{p}")]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(ex.yields_and_jacobian(params, relax))
            times.append(time.perf_counter() - t0)
        res[f"seconds_step_{label}"] = statistics.median(times)
        res[f"timing_conditions_{label}"] = {"loadavg": os.getloadavg(), "background_compiles_running": len(alive)}

    ex64 = InProcessExecutor(spec, chunks, dtype=np.dtype("float64"))
    res["events"] = ex64.n_events
    y64, j64 = step(ex64, "float64_default")  # A compiled these: cache loads
    timed(ex64, "float64_default")
    save()
    ex32 = InProcessExecutor(spec, chunks, dtype=np.dtype("float32"))
    for label, value in ((prec, prec), ("default", None)):
        jax.config.update("jax_default_matmul_precision", value)
        y32, j32 = step(ex32, f"float32_{label}")
        res[f"float32_{label}"] = {
            "yields_max_deviation": yields_deviation(y32, y64),
            "jacobian_max_row_deviation": jacobian_deviation(j32, j64),
            **({"jacobian_max_relative_deviation": passes._jacobian_deviation(j32, j64)}
               if hasattr(passes, "_jacobian_deviation") else {})}
        print(f"float32 at matmul precision {label}: {res[f'float32_{label}']}", flush=True)
        save()
        timed(ex32, f"float32_{label}")
        save()
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "prewarm":
        prewarm(a[1], a[2], a[3], int(a[4]))
    elif a[0] == "precision":
        precision(a[1], a[2], int(a[3]), int(a[4]), a[5], a[6])
    else:
        sys.exit(f"unknown mode {a[0]!r}")
EOF

# -- the events: 1M now, 4M in the background -----------------------------------------------------
gen() { "$PY" -c "import sys; from jacana.bench.suite import bench_fileset; print(bench_fileset(int(sys.argv[1]), sys.argv[2]))" "$1" "$DATA"; }
gen "$EVENTS" >"$WORK/fileset1" & gen1=$!
gen "$BIG_EVENTS" >"$WORK/fileset4" & gen4=$!
wait "$gen1" || { say "generating $EVENTS events failed"; exit 3; }
FS1=$(tail -1 "$WORK/fileset1")
say "generated $EVENTS events: $FS1"

# -- the steps ------------------------------------------------------------------------------------
# run_timed NAME MAX_S MIN_S CMD...: CMD under timeout min(MAX_S, time left); skipped with less
# than MIN_S left.
run_timed() {
    local name=$1 max=$2 min=$3
    shift 3
    local l t t0 rc
    l=$(left)
    if (( l < min )); then say "$name: skipped (${l} s left, it needs ${min} s)"; return 0; fi
    t=$(( l < max ? l : max ))
    say "$name: $* (timeout ${t} s)"
    t0=$(date +%s)
    timeout -k 10 "$t" "$@"
    rc=$?
    say "$name: exit $rc after $(( $(date +%s) - t0 )) s$( (( rc == 124 || rc == 137 )) && echo ' (TIMED OUT)')"
    return 0
}
BENCH=("$PY" -m jacana.cli.main bench --device "$DEVICE" --repeats "$REPEATS" --warm-threads "$WARM_THREADS"
       --data-dir "$DATA")
# wait_bg NAME PID MAX_S: wait for a background job at most MAX_S seconds; print its output
wait_bg() {
    local name=$1 pid=$2 max=$3 waited=0
    while kill -0 "$pid" 2>/dev/null && (( waited < max )); do sleep 1; waited=$(( waited + 1 )); done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name: still running after waiting ${waited} s"
    else
        wait "$pid"
        say "$name: finished (exit $?; waited ${waited} s)"
    fi
    sed "s/^/    [$name] /" "$WORK/$name.log" 2>/dev/null | grep -v 'cuda_timer.cc' | tail -5
}

# A: rows 1, 3 in float64, row 9: float32 vs float64 (default matmul precision)
run_timed A 210 90 "${BENCH[@]}" --events "$EVENTS" --rows 1,3 --out "$OUT/a_rows13_float64.json"

# background compiles (nice 19) for row 5 and for C
nice -n 19 timeout -k 5 "$(( $(left) > 30 ? $(left) - 20 : 10 ))" "$PY" "$HELPER" prewarm stream "$FS1" "$DEVICE" \
    "$WARM_THREADS" >"$WORK/prewarm-stream.log" 2>&1 &
pw_stream=$!
(
    while kill -0 "$gen4" 2>/dev/null; do sleep 2; done
    fs4=$(tail -1 "$WORK/fileset4")
    [ -f "$fs4" ] || { echo "no $BIG_EVENTS-event fileset"; exit 3; }
    l=$(left)
    exec nice -n 19 timeout -k 5 "$(( l > 30 ? l - 20 : 10 ))" "$PY" "$HELPER" prewarm executor "$fs4" "$DEVICE" \
        "$WARM_THREADS"
) >"$WORK/prewarm-big.log" 2>&1 &
pw_big=$!
say "background compiles started: stream (pid $pw_stream), big (pid $pw_big)"

# H: the float32 deviation under jax_default_matmul_precision=$PRECISION, then the default
BG_PIDS="$pw_stream $pw_big" run_timed H 170 60 "$PY" "$HELPER" precision "$FS1" "$DEVICE" "$WARM_THREADS" \
    "$REPEATS" "$PRECISION" "$OUT/h_precision.json"

# L: where the likelihood is fastest: value_and_grad on the GPU and on the host CPU, AGC-like model
run_timed L 90 40 "$PY" -m jacana.bench.likelihood --objectives sigma_mu z0 --repeats 20 --pyhf-repeats 1 \
    --json "$OUT/l_likelihood.json"

# 5: streamed pass, device peak memory, 4x vs 1x
wait_bg prewarm-stream "$pw_stream" $(( $(left) > 110 ? $(left) - 110 : 0 ))
run_timed 5 130 50 "${BENCH[@]}" --events "$EVENTS" --rows 5 --out "$OUT/r5_row5_float64.json"

# C: 4M events, row 3 (float64)
wait_bg prewarm-big "$pw_big" $(( $(left) > 70 ? $(left) - 70 : 0 ))
if kill -0 "$pw_big" 2>/dev/null; then
    kill "$pw_big" 2>/dev/null
    say "C: skipped (its programs were still compiling, $(left) s left)"
elif [ -f "$(tail -1 "$WORK/fileset4" 2>/dev/null)" ]; then
    run_timed C "$BUDGET_S" 45 "${BENCH[@]}" --events "$BIG_EVENTS" --rows 3 --out "$OUT/c_row3_float64_big.json"
else
    say "C: skipped (no $BIG_EVENTS-event fileset)"
fi

for p in $(jobs -p); do kill "$p" 2>/dev/null; done  # this script's own background jobs still running
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
say "persistent cache: $(du -sh "$JACANA_CACHE/xla" 2>/dev/null | cut -f1), $(ls "$JACANA_CACHE/xla" 2>/dev/null | wc -l) entries"
say "done; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
sleep 1  # let tee write the last lines
