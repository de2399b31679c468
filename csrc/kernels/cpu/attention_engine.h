// effx: the CPU engine behind every fused cache attention (include/effx/attention.h). A cache
// policy supplies its cached tokens block by block as fp32 (keys transposed [D][block],
// values [block][D]); the engine appends the step's new tokens, masks, and runs one online
// softmax (running max and sum, rescaled per block) so no [queries, tokens] matrix is ever
// materialized. Work unit: (batch row, kv-head, chunk of query tokens), so the query heads of
// one GQA group share every loaded block. With H2O scoring, a unit takes all query tokens of
// its (row, kv-head) and keeps each block's exponentials with the running max they used, so
// the final probabilities come from one rescale at the end instead of a second pass.
// Units with many query rows (prefill, token trees, wide GQA groups) run both products with
// the query rows as the vector lanes (query_lanes.inc): keys and values are broadcast from
// their rows in place, against the unit's transposed queries and probabilities; a few rows
// (decode) use register tiles that read the block in place in its storage dtype (widened in
// registers). Over bf16 caches on CPUs with AVX512_BF16, the many-row products run on bf16
// pairs instead (AMX tiles where the CPU has them; the query rows unscaled, the scores scaled
// after, the probabilities rounded to bf16). Plain (dense) storage and blocks of the step's
// new tokens are read in place; other policies stage their cached blocks as fp32 (and, for
// bf16 pair products, back to bf16 rows). A sliding window skips the blocks before the window
// of a unit's first query and masks the rest per query.
// The engine body is in attention_engine.inc, compiled once per instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bf16_gemm.h"
#include "block_gemm.h"
#include "effx/attention.h"
#include "avx512_math.h"
#include "line_aligned.h"

namespace effx {
namespace cpu {

// Query rows per unit from which the many-row products (query lanes, bf16 pairs) beat the
// few-row register tiles.
constexpr int64_t kManyRows = 16;

// run_attention (attention_engine.inc) compiled for the widest instruction set of this CPU.
// Cached names its storage type T as Cached::Storage.
namespace {

#define EFFX_ISA_EXTRA "attention_engine.inc"
#include "block_gemm_variants.inc"
#undef EFFX_ISA_EXTRA

template <typename Cached>
void run_attention_on_this_cpu(const AttentionArgs& a, const Cached& cached, int num_threads) {
  using T = typename Cached::Storage;
  switch (block_gemm::best_isa()) {
    case block_gemm::Isa::Avx512: return isa_avx512::run_attention<T>(a, cached, num_threads);
    case block_gemm::Isa::Avx2: return isa_avx2::run_attention<T>(a, cached, num_threads);
    case block_gemm::Isa::Baseline: return isa_baseline::run_attention<T>(a, cached, num_threads);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace effx
