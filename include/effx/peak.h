// effx: the fp32 FMA rate of this CPU, the compute roof of the CPU benchmark reports. A BLAS
// matmul is no roof where the BLAS does not reach the FMA units' rate (MKL on AMD reaches about
// half), so that kernels would show above 100% of it.
#pragma once

namespace effx {
namespace cpu {

// FLOP/s of independent fp32 FMA chains in the widest vector ISA the kernels use
// (block_gemm::best_isa), on `num_threads` threads at once, the best of a few short runs.
double fma_peak_flops(int num_threads);

}  // namespace cpu
}  // namespace effx
