#!/usr/bin/env bash
# Fill .whl/ with the cp312 manylinux x86_64 wheels that the H200 device image lacks, so that
# bench/gpu_check.sh can run there in one call:
#
#   bash bench/device_wheels.sh            # here, where pip reaches the package registry
#   run(command="BUDGET_S=480 bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The versions are the ones installed here (what the tests ran with), read with importlib.metadata,
# so the device runs what CI tests. The image already has jax 0.11, numpy, scipy, matplotlib, optax,
# equinox, optimistix, pyyaml, tqdm, attrs, click, fsspec, xxhash, toolz, cloudpickle and packaging
# (../.library/device/KINDS.md); jacana's own wheel is built from the tree by gpu_check.sh.
# .whl/ is kept out of git through .git/info/exclude (added here if missing). About 16 MB.
set -eu -o pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-python3}
PACKAGES="awkward awkward-cpp uproot cramjam hist boost-histogram histoprint uhi pyhf iminuit jsonschema
jsonschema-specifications referencing rpds-py jsonpatch jsonpointer vector mplhep mplhep-data cma tabulate
cabinetry"

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
rm -rf .whl && mkdir -p .whl
pins=$("$PY" - $PACKAGES <<'EOF'
import importlib.metadata as md, sys
try:
    print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1:]))
except md.PackageNotFoundError as exc:
    sys.exit(f"device_wheels: {exc} is not installed here: install jacana first (pip install -e '.[test]')")
EOF
)
echo "device_wheels: $pins"
platforms=""
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms="$platforms --platform ${tag}_x86_64"
done
# pure-Python packages come as py3-none-any; compiled ones as cp312 manylinux (pip matches each tag exactly)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .whl $pins
ls .whl
du -sh .whl
