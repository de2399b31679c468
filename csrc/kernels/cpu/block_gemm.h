// effx: CPU block-GEMM support shared by the structured-matrix families (Monarch, Pixelfly):
// strided operand views, the per-thread packing workspace, dtype widening/narrowing, and the
// instruction-set dispatch. The GEMM itself is in block_gemm.inc; block_gemm_variants.inc
// compiles it once per instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "effx/dtype.h"
#include "half_bits.h"
#include "line_aligned.h"

namespace effx {
namespace cpu {
namespace block_gemm {

// A(m, k) = p[m * sm + k * sk]; B(k, n) = p[k * sk + n * sn]; C(m, n) = p[m * sm + n * sn].
template <typename T> struct MatA { const T* p; int64_t sm, sk; };
template <typename T> struct MatB { const T* p; int64_t sk, sn; };
template <typename T> struct MatC { T* p; int64_t sm, sn; };

// Packed panels of one thread; grown once, reused by every block it computes. On cache lines:
// the micro-kernel loads them a vector at a time.
template <typename Acc> struct Workspace { LineVector<Acc> a, b; };

// Accumulation type of a storage type: fp32, except fp64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(Half v) { return to_float(v); }
inline float widen(BFloat16 v) { return to_float(v); }

// Through double: exact for float and double accumulators alike.
template <typename T> inline T narrow(double v) { return static_cast<T>(v); }
template <> inline Half narrow<Half>(double v) { return from_float<Half>(static_cast<float>(v)); }
template <> inline BFloat16 narrow<BFloat16>(double v) {
  return from_float<BFloat16>(static_cast<float>(v));
}

// The row range [begin, end) of chunk `c` out of `chunks` over `n` rows.
inline int64_t chunk_begin(int64_t n, int64_t chunks, int64_t c) { return n * c / chunks; }

// Chunks per block so that `blocks * chunks` work items keep `threads` threads busy without
// cutting a block into slivers thinner than 8 rows.
inline int64_t chunks_per_block(int64_t blocks, int64_t rows, int threads) {
  const int64_t want = (threads + blocks - 1) / blocks;
  return std::max<int64_t>(1, std::min<int64_t>(want, rows / 8));
}

enum class Isa { Avx512, Avx2, Baseline };

// How far EFFX_CPU_ISA caps the instruction sets, narrowest first; unset or empty: no cap
// (Amx). An unknown value throws rather than silently falling back to the slowest path (a
// typo of "avx2" would otherwise run everything on the baseline).
enum class IsaCap { Baseline, Avx2, Avx512, Avx512Bf16, Amx };

inline IsaCap isa_cap() {
  const char* cap = std::getenv("EFFX_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return IsaCap::Amx;
  constexpr std::pair<const char*, IsaCap> kNames[] = {{"amx", IsaCap::Amx}, {"avx512bf16", IsaCap::Avx512Bf16},
                                                       {"avx512", IsaCap::Avx512}, {"avx2", IsaCap::Avx2},
                                                       {"baseline", IsaCap::Baseline}};
  for (const auto& [name, level] : kNames) {
    if (std::strcmp(cap, name) == 0) return level;
  }
  throw std::invalid_argument(std::string("effx: EFFX_CPU_ISA='") + cap +
                              "' is not a known instruction set: expected amx, avx512bf16, avx512, avx2 or "
                              "baseline, or unset for the widest this CPU runs");
}

// The widest instruction set this CPU runs; EFFX_CPU_ISA=avx2 or =baseline caps it (tests
// use that to cover every variant on one machine; =avx512 also leaves out AVX512_BF16 and
// =avx512bf16 leaves out AMX, see bf16_gemm.h, and =amx is the default made explicit).
inline Isa best_isa() {
  const IsaCap cap = isa_cap();
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (cap >= IsaCap::Avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    return Isa::Avx512;
  if (cap >= IsaCap::Avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::Avx2;
#else
  (void)cap;
#endif
  return Isa::Baseline;
}

}  // namespace block_gemm
}  // namespace cpu
}  // namespace effx
