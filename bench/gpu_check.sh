#!/usr/bin/env bash
# Issue 25's GPU check: ONE run on the device machine (an H200), from the repository root, e.g.
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=480)
#
# .whl/ (git-ignored, see .git/info/exclude) holds cp312 manylinux x86_64 wheels of what the
# device's image lacks (awkward, uproot, hist, pyhf, iminuit, jsonschema, vector, dask, ...) and a
# wheel of jacana. The script installs them into $SITE (pip --target, no index), installs jacana
# built from THIS tree (the carried jacana wheel only if that build fails), then runs `jacana bench`
# on the GPU, each step under `timeout`, within BUDGET_S seconds in all (default 400: < 7 min), most
# important first (a step that times out loses only its own JSON):
#   a1. 1M events, float64, rows 1, 3 (gradient step vs forward pass, throughput; calls per step)
#   b.  1M events, float32 (mixed precision), rows 1, 3, 9 (9: its deviation from float64)
#   a3. 1M events' workspace, row 7 (likelihood value_and_grad on the GPU)
#   a2. 1M events, float64, row 5 (streamed pass, device peak memory), if time allows
#   c.  4M events, float64, row 3 (how the throughput scales), if time allows
# The events are generated on the device (1M and 4M side by side, in the background) under $DATA.
# Everything (this log, one JSON per step) goes to $OUT. Rehearse on a CPU with e.g.
#   OUT=/tmp/gpu_rehearsal DEVICE=cpu EVENTS=20000 BIG_EVENTS=40000 PY=/path/to/python3.12 \
#     SITE=/tmp/site-rehearsal bash bench/gpu_check.sh
set -u -o pipefail

START=$(date +%s)
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PY:-python3}
DEVICE=${DEVICE:-gpu}
EVENTS=${EVENTS:-1000000}
BIG_EVENTS=${BIG_EVENTS:-4000000}
BUDGET_S=${BUDGET_S:-400}
REPEATS=${REPEATS:-3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
DATA=${DATA:-/tmp/jacana-data}
WARM_THREADS=${WARM_THREADS:-$(nproc)}
export JACANA_CACHE=${JACANA_CACHE:-/tmp/jacana-cache}
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}; fi

mkdir -p "$OUT" "$DATA" "$JACANA_CACHE"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( START + BUDGET_S - $(date +%s) )); }
say() { echo "== [$(elapsed) s] $*"; }

say "gpu_check: device=$DEVICE events=$EVENTS big=$BIG_EVENTS budget=${BUDGET_S}s repeats=$REPEATS" \
    "warm_threads=$WARM_THREADS host=$(hostname) cores=$(nproc)"
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
print("jax.devices():", jax.devices())
print("jacana from", jacana.bench.suite.__file__)
for name in ("awkward", "uproot", "hist", "pyhf", "iminuit", "jsonschema", "scipy", "equinox", "optax"):
    importlib.import_module(name)
    print(f"  {name} {importlib.metadata.version(name)}")
EOF

# -- the events: 1M now, 4M in the background -----------------------------------------------------
gen() { "$PY" -c "import sys; from jacana.bench.suite import bench_fileset; print(bench_fileset(int(sys.argv[1]), sys.argv[2]))" "$1" "$DATA"; }
gen "$EVENTS" & gen1=$!
gen "$BIG_EVENTS" & gen4=$!
wait "$gen1" || { say "generating $EVENTS events failed"; exit 3; }
say "generated $EVENTS events"

# -- the bench steps ------------------------------------------------------------------------------
# step NAME MAX_S MIN_S ARGS...: jacana bench ARGS under timeout min(MAX_S, time left); skipped with
# less than MIN_S left.
step() {
    local name=$1 max=$2 min=$3
    shift 3
    local l t t0 rc
    l=$(left)
    if (( l < min )); then say "$name: skipped (${l} s left, it needs ${min} s)"; return 0; fi
    t=$(( l < max ? l : max ))
    say "$name: jacana bench $* (timeout ${t} s)"
    t0=$(date +%s)
    timeout -k 10 "$t" "$PY" -m jacana.cli.main bench --device "$DEVICE" --repeats "$REPEATS" \
        --warm-threads "$WARM_THREADS" --data-dir "$DATA" "$@"
    rc=$?
    say "$name: exit $rc after $(( $(date +%s) - t0 )) s$( (( rc == 124 || rc == 137 )) && echo ' (TIMED OUT)')"
    return 0
}

# the longest each step may take, as a share of the budget (400 s: 160, 140, 100, 100 s; c: what is left)
pct() { echo $(( BUDGET_S * $1 / 100 )); }
step a1 "$(pct 40)" 60 --events "$EVENTS" --rows 1,3 --out "$OUT/a1_rows13_float64.json"
step b "$(pct 35)" 60 --events "$EVENTS" --rows 1,3,9 --dtype float32 --out "$OUT/b_rows139_float32.json"
step a3 "$(pct 25)" 45 --events "$EVENTS" --rows 7 --out "$OUT/a3_row7.json"
step a2 "$(pct 25)" 60 --events "$EVENTS" --rows 5 --out "$OUT/a2_row5_float64.json"
if kill -0 "$gen4" 2>/dev/null && (( $(left) < 120 )); then
    say "c: skipped ($BIG_EVENTS events still generating, $(left) s left)"
    kill "$gen4" 2>/dev/null
elif wait "$gen4"; then
    step c "$BUDGET_S" 75 --events "$BIG_EVENTS" --rows 3 --out "$OUT/c_row3_float64_big.json"
else
    say "c: skipped (generating $BIG_EVENTS events failed)"
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
say "done; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
sleep 1  # let tee write the last lines
