#!/usr/bin/env bash
# effx on a lent GPU machine, in one prepared call: build the CUDA extension for this GPU (the
# C++ tests in the same CMake build, so the kernels compile once), run the CUDA tests (pytest
# cases on the cuda device, and ctest), then the benchmark suites, each under its own time
# limit so that a slow or failing step leaves the others' results, most wanted first, until
# the call's time is spent. Everything goes to $OUT (the device tool's output folder;
# ./gpu-out elsewhere).
#
#   bench/gpu/run.sh [all|build|test|bench]   (default all)
#
# Limits (seconds) come from the environment: BUILD_S (300), TEST_S (150), BENCH_S (per suite,
# 90), TOTAL_S (540: no suite starts that could end past it, so one device call of 10 minutes
# holds everything); SUITES lists the suites (default: every one, the H200 targets' first);
# QUICK=1 runs them with --quick.
# Nothing is downloaded: the GPU image's python3 holds torch, pytest, transformers, scipy and
# matplotlib, so the build uses --no-build-isolation --no-deps.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
what=${1:-all}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # this GPU's arch only: half the build
started=$(date +%s)
step() { echo "=== $* ($(date +%T), $(( $(date +%s) - started )) s in)"; }

if [[ $what == all || $what == build ]]; then
  step "build (sm $TORCH_CUDA_ARCH_LIST)"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  if ! EFFX_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout "${BUILD_S:-300}" python3 -m pip install -q \
      --no-build-isolation --no-deps -C build-dir=build/gpu -C cmake.define.EFFX_BUILD_TESTS=ON . \
      > "$OUT/build.log" 2>&1; then
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
  timeout 120 ctest --test-dir build/gpu --output-on-failure -LE bench -E 'simt' > "$OUT/ctest.log" 2>&1
  echo "ctest rc=$?"
  tail -15 "$OUT/ctest.log"
  # The same attention cases through the fp32 engine alone: the reference of the fast paths.
  EFFX_CUDA_ATTENTION=engine timeout 60 build/gpu/tests/cpp/test_attention_cuda > "$OUT/attention-engine.log" 2>&1
  echo "attention through the engine alone rc=$?"
fi

if [[ $what == all || $what == bench ]]; then
  suites=${SUITES:-kivi h2o monarch tree sparse offload quant e2e}
  for s in $suites; do
    if (( $(date +%s) - started + ${BENCH_S:-90} > ${TOTAL_S:-540} )); then
      echo "bench $s skipped: it could end past TOTAL_S=${TOTAL_S:-540} s"
      continue
    fi
    step "bench $s"
    timeout "${BENCH_S:-90}" python3 -m effx bench "$s" --device cuda ${QUICK:+--quick} --json "$OUT/$s.json" \
      > "$OUT/bench-$s.log" 2>&1
    echo "bench $s rc=$?"
    tail -25 "$OUT/bench-$s.log"
  done
fi
step done
