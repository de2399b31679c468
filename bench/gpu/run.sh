#!/usr/bin/env bash
# effx on a lent GPU machine, in one prepared call: build the CUDA extension for this GPU, run
# the CUDA tests (pytest cases on the cuda device, and ctest), then the benchmark suites, each
# under its own time limit so that a slow or failing step leaves the others' results.
# Everything goes to $OUT (the device tool's output folder; ./gpu-out elsewhere).
#
#   bench/gpu/run.sh [all|build|test|bench]   (default all)
#
# Limits (seconds) come from the environment: BUILD_S (300), TEST_S (150), BENCH_S (per suite,
# 90); SUITES lists the suites (default: every one); QUICK=1 runs them with --quick.
# Nothing is downloaded: the GPU image's python3 holds torch, pytest, transformers, scipy and
# matplotlib, so the build uses --no-build-isolation --no-deps.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
what=${1:-all}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # this GPU's arch only: half the build
step() { echo "=== $* ($(date +%T))"; }

if [[ $what == all || $what == build ]]; then
  step "build (sm $TORCH_CUDA_ARCH_LIST)"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  if ! EFFX_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout "${BUILD_S:-300}" python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "build failed"
    exit 1
  fi
  (cd /tmp && python3 -m effx info) | tee "$OUT/info.txt"
fi

if [[ $what == all || $what == test ]]; then
  step "pytest: cases on the cuda device"
  timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/python -k cuda -n 8 \
    --junitxml="$OUT/pytest-cuda.xml" > "$OUT/pytest-cuda.log" 2>&1
  echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest-cuda.log" | head -40
  tail -3 "$OUT/pytest-cuda.log"
  step "ctest (C++ tests, the CUDA ones on the GPU; the emulated copies are left to CI)"
  {
    cmake -S . -B build/gpu-cpp -G Ninja -DEFFX_BUILD_TESTS=ON -DEFFX_CUDA=ON &&
      cmake --build build/gpu-cpp -j "$(nproc)" &&
      timeout 120 ctest --test-dir build/gpu-cpp --output-on-failure -LE bench -E 'simt'
  } > "$OUT/ctest.log" 2>&1
  echo "ctest rc=$?"
  tail -15 "$OUT/ctest.log"
  # The same attention cases through the fp32 engine alone: the reference of the fast paths.
  EFFX_CUDA_ATTENTION=engine timeout 60 build/gpu-cpp/tests/cpp/test_attention_cuda > "$OUT/attention-engine.log" 2>&1
  echo "attention through the engine alone rc=$?"
fi

if [[ $what == all || $what == bench ]]; then
  suites=${SUITES:-$(python3 -c "from effx.bench import SUITES; print(' '.join(SUITES))")}
  for s in $suites; do
    step "bench $s"
    timeout "${BENCH_S:-90}" python3 -m effx bench "$s" --device cuda ${QUICK:+--quick} --json "$OUT/$s.json" \
      > "$OUT/bench-$s.log" 2>&1
    echo "bench $s rc=$?"
    tail -25 "$OUT/bench-$s.log"
  done
fi
step done
