#!/usr/bin/env bash
# The GPU check that fits a short loan (< 8 minutes in all): install, the GPU-only tests, then
# benchmarks/kernels_gpu.py part by part, printing each phase's elapsed time. Each phase has a
# time limit; the limits add up to 480 s.
#
#   bash benchmarks/gpu_check.sh              # on a CUDA GPU machine (H100 / H200 / RTX 5090)
#   bash benchmarks/gpu_check.sh --rehearse   # on CPU: same phases, the GPU parts skipped
#
# Install: wheels in .whl/ (a machine with no network: carry them) go to /tmp/site with
# --no-index; else, where jax sees no GPU and pip reaches an index, jax's CUDA 13 plugin at
# the pinned version is installed; else the Python that is there is used as it is (the
# versions are printed). PYTHON picks the interpreter (default: python3). A lent machine with
# no network whose image has jax with CUDA needs nothing carried (its jax version is printed);
# to run the pinned jax there, carry its cp312 wheels (jax, jaxlib, jax-cuda13-plugin,
# jax-cuda13-pjrt) in .whl/.
# Writes under benchmarks/results/: gpu_check.log (gpu_check_rehearsal.log with --rehearse),
# gpu_tests.log, kernels_gpu_{norm,matmul,blocks}.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
RES=benchmarks/results
mkdir -p "$RES"
LOG=$RES/gpu_check.log
[ $REHEARSE = 1 ] && LOG=$RES/gpu_check_rehearsal.log
exec > >(tee "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$(date +%s)
FAILED=0
# phase NAME LIMIT_S CMD...: run CMD under a time limit, print its elapsed time and status
phase() {
  local name=$1 limit=$2 t rc
  shift 2
  t=$(date +%s)
  echo "=== phase $name (limit ${limit}s): $*"
  timeout "$limit" "$@"
  rc=$?
  [ $rc -ne 0 ] && FAILED=1
  echo "=== phase $name: rc=$rc, $(( $(date +%s) - t )) s (total $(( $(date +%s) - T0 )) s)"
}
skip() { echo "=== phase $1: skipped ($2)"; }

install() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
      || return 1
  elif ! "$PY" -c "import jax, sys; sys.exit(not jax.devices('gpu'))" 2> /dev/null \
      && [ $REHEARSE = 0 ]; then
    "$PY" -m pip install -q -c constraints.txt "jax[cuda13]==$(sed -n 's/^jax==//p' constraints.txt)" \
      || echo "pip could not install jax's CUDA plugin: using what is there"
  fi
  "$PY" - << 'EOF'
import importlib.metadata as md
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "numpy", "ml_dtypes",
          "pytest", "triton"):
    try:
        print(f"{p}=={md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p}: not installed")
EOF
}
export -f install
export PY REHEARSE
compgen -G ".whl/*.whl" > /dev/null && export PYTHONPATH="/tmp/site:$PYTHONPATH"

echo "gpu_check: $(date -u +%FT%TZ) $(uname -m) rehearse=$REHEARSE"
phase install 90 bash -c install
if [ $REHEARSE = 0 ]; then
  phase devices 30 "$PY" -c "import jax; d = jax.devices(); print(d, d[0].device_kind); \
    assert d[0].platform == 'gpu', 'no GPU seen by jax'"
else
  skip devices "rehearsal: no GPU"
fi
# The compiled-Triton half of the kernel tests (id 'triton'); on CPU they skip "no CUDA GPU".
phase gpu_tests 120 "$PY" -m pytest -q -p no:xdist -p no:cacheprovider -rs \
  tests/pallas_kernels/test_permuted_norm.py tests/pallas_kernels/test_fp4_matmul.py \
  tests/backends/test_dispatch.py -k triton
for part in norm matmul blocks; do
  if [ $REHEARSE = 1 ]; then
    # without a GPU kernels_gpu.py says so and exits 0: this checks that path and the CLI
    phase "bench_$part" 60 "$PY" benchmarks/kernels_gpu.py --parts "$part"
  else
    limit=90
    [ "$part" = norm ] && limit=60
    phase "bench_$part" $limit "$PY" benchmarks/kernels_gpu.py --parts "$part" --repeats 3 \
      && for ext in json md; do
        [ -f "$RES/kernels_gpu.$ext" ] && mv "$RES/kernels_gpu.$ext" "$RES/kernels_gpu_$part.$ext"
      done
  fi
done
echo "gpu_check: done in $(( $(date +%s) - T0 )) s, failed=$FAILED"
exit $FAILED
