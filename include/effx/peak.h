// effx: the fp32 FMA rate of this CPU, the compute roof of the CPU benchmark reports. A BLAS
// matmul is no roof where the BLAS does not reach the FMA units' rate (MKL on AMD reaches about
// half), so that kernels would show above 100% of it.
#pragma once

namespace effx {
namespace cpu {

struct FmaPeak {
  double flops;     // fp32 FLOP/s over all threads (an FMA counts 2)
  const char* isa;  // the vector instruction set it ran in
};

// Independent fp32 FMA chains in registers, in the widest vector ISA the kernels use
// (block_gemm::best_isa, so EFFX_CPU_ISA caps it too), on `num_threads` threads at once: the
// fastest of a few short runs, since a roof is what the machine can reach and on a shared
// machine a run only ever loses time to other tenants.
FmaPeak fma_peak(int num_threads);

// The same for AVX512_BF16's bf16 dot products (4 FLOPs per lane), the roof of bf16 work that
// runs on them (csrc/kernels/cpu/bf16_gemm.h); 0 where the CPU lacks them or EFFX_CPU_ISA caps them.
double bf16_dot_peak_flops(int num_threads);

// The same for AMX tile products of bf16 (csrc/kernels/cpu/bf16_gemm.h), the roof of bf16 work
// on CPUs that have them; 0 where the CPU lacks them, the OS refuses the tiles or EFFX_CPU_ISA caps them.
double amx_peak_flops(int num_threads);

}  // namespace cpu
}  // namespace effx
