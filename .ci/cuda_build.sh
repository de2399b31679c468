#!/usr/bin/env bash
# Compile and link effx's CUDA build (sm_80 + sm_90) on a machine with no GPU, from pip's
# CUDA packages (DESIGN.md section 3), then import it and run its CPU paths.
# Usage: .ci/cuda_build.sh VENV_DIR   (created if missing; reused when already set up)
set -euo pipefail
venv=$(realpath -m "${1:?usage: .ci/cuda_build.sh VENV_DIR}")
root=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q torch==2.15.0 "nvidia-cuda-nvcc==13.2.*" "nvidia-cuda-crt==13.2.*" \
  "nvidia-nvvm==13.2.*" "nvidia-cuda-cuobjdump==13.2.*" scikit-build-core ninja cmake numpy

site=$("$py" -c "import site; print(site.getsitepackages()[0])")
export CUDA_HOME="$site/nvidia/cu13"
# CMake's CUDA toolkit search wants unversioned library names next to the versioned ones.
for lib in "$CUDA_HOME"/lib/lib*.so.*; do
  base=$(basename "$lib"); unversioned="$CUDA_HOME/lib/${base%%.so.*}.so"
  [ -e "$unversioned" ] || ln -s "$base" "$unversioned"
done
export CUDACXX="$CUDA_HOME/bin/nvcc"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="8.0;9.0"
export EFFX_CUDA=ON

cd "$root"
"$py" -m pip install -v --no-build-isolation --no-deps \
  -C build-dir=build/ci-cuda \
  -C cmake.define.CUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  -C cmake.define.CUDAToolkit_ROOT="$CUDA_HOME" . 2>&1 | tee build/ci-cuda.log | grep -E "effx:|error|Successfully" || true
grep -q "Successfully installed effx" build/ci-cuda.log

# The C++ tests of the CUDA kernels build only where there is a GPU (they run on the SIMT
# emulator in ctest here): check that they compile against the real toolkit headers.
for test in tests/cpp/test_*_cuda.cpp; do
  g++ -std=c++20 -fsyntax-only -Iinclude -Itests/cpp -I"$CUDA_HOME/include" "$test"
done
echo "effx CUDA build: the CUDA C++ tests compile against the toolkit headers"

# The kernels must be in the binary for both archs.
so=$(find build/ci-cuda -name '_C*.so' | head -n 1)
elves=$("$CUDA_HOME/bin/cuobjdump" --list-elf "$so")
for arch in sm_80 sm_90; do
  grep -q "$arch" <<<"$elves" || { echo "effx CUDA build: no $arch code in $so" >&2; exit 1; }
done
echo "effx CUDA build: device code in $so:"; echo "$elves"

cd /tmp
"$py" - <<'PY'
import torch, effx
info = effx.build_info()
assert info["cuda"], info
print("effx CUDA build:", info)
x = torch.randn(4, 64)
codes, scale, zero = effx.ops.quantize(x, 2, 32)
y = effx.ops.dequantize(codes, scale, zero, 2, 32)
assert (y - x).abs().max() <= scale.max() / 2 + 1e-6
print("effx CUDA build: imports and runs its CPU path on a machine without a GPU")
PY
