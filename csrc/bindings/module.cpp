// effx._C: the Python extension module. Importing it registers every torch.ops.effx operator
// (static initializers in csrc/ops); the pybind11 functions here describe the build and probe
// the CPU's compute roof.
#include <Python.h>
#include <pybind11/pybind11.h>

#include "effx/peak.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// The offload runtime's classes (csrc/bindings/offload.cpp).
void register_offload(py::module_& m);

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = EFFX_VERSION;
  info["torch_version"] = EFFX_TORCH_VERSION;
#ifdef EFFX_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = EFFX_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "effx compiled extension: torch.ops.effx operators and build information";
  m.def("build_info", &build_info, "What this build of effx was compiled with.");
  m.def(
      "cpu_fma_peak_flops", [](int num_threads) { return effx::cpu::fma_peak(num_threads).flops; },
      py::arg("num_threads"),
        "FLOP/s of independent fp32 FMA chains on num_threads threads in the widest vector ISA the CPU kernels "
        "use: the compute roof of CPU benchmark reports.");
  m.def("cpu_bf16_dot_peak_flops", &effx::cpu::bf16_dot_peak_flops, py::arg("num_threads"),
        "The same for AVX512_BF16 dot products (the roof of bf16 work on them); 0 where the CPU has none.");
  m.def("cpu_amx_peak_flops", &effx::cpu::amx_peak_flops, py::arg("num_threads"),
        "The same for AMX bf16 tile products (the roof of bf16 GEMMs on them); 0 where the CPU has none.");
  register_offload(m);
}
