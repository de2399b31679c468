// effx: a GEMM on bf16 pairs with AVX512_BF16's dot-product instruction (vdpbf16ps: 16 lanes,
// each adding two bf16 x bf16 products into an fp32 accumulator), twice the multiply-adds per
// instruction of an fp32 FMA, or with AMX tiles where the CPU has them (Sapphire Rapids and
// later: one tdpbf16ps is 16 x 16 x 32 multiply-adds, 16 times a vdpbf16ps per instruction). The attention engine runs both products of its many-row units
// over bf16 caches through it where the CPU has the instruction: the products of two bf16 are
// exact in fp32 and only the additions round (as in the fp32 path), so scores keep their
// accuracy; the probabilities are rounded to bf16 for P V, as GPU attention kernels do.
// Layouts are in 32-bit words, each a pair of consecutive bf16 along the reduction: a row
// (A, and the keys as B^T) is its pairs in order; packed B holds panels of kPanel columns,
// pair p of column j of panel q at word (q * KP + p) * kPanel + j.
#pragma once

#include <cstdint>

#include "effx/dtype.h"

namespace effx {
namespace cpu {
namespace bf16 {

constexpr int64_t kPanel = 32;  // columns per packed panel: two 16-lane vectors

// True where this CPU has AVX512_BF16 and EFFX_CPU_ISA (unset, "amx" or "avx512bf16") allows
// it; EFFX_CPU_ISA=avx512 keeps the fp32 path of the same instruction set (tests cover both).
bool available();

// Rows from which a family's bf16 pair GEMMs replace its other paths: one AMX tile of rows
// (fewer stay on vector dot products, which on Sapphire Rapids run at half the FMA rate).
constexpr int64_t kMinRows = 16;

// True where `rows` rows of bf16 at stride `ld` (elements) from `p` can be read in place as the
// pairs of gemm's A: the CPU has the dot products, there are kMinRows rows or more, and every
// row starts on a pair.
inline bool rows_as_pairs(const BFloat16* p, int64_t rows, int64_t ld) {
  return rows >= kMinRows && ld % 2 == 0 && reinterpret_cast<uintptr_t>(p) % 4 == 0 && available();
}

// True where gemm runs blocks of at least 16 rows and 16 pairs on AMX tiles: the CPU has
// AMX-BF16, the OS granted this process the tile state, and EFFX_CPU_ISA is unset or "amx"
// (=avx512bf16 keeps the vector GEMM).
bool amx_available();

// Four independent chains of `iters` tile products (16 x 16 x 32 multiply-adds each) on this
// thread, the probe of peak.h; only where amx_available().
float amx_chains(int64_t iters);

// Words of packed B for N columns of KP pairs.
inline int64_t packed_words(int64_t N, int64_t KP) { return (N + kPanel - 1) / kPanel * kPanel * KP; }

// Packed B from N rows of 2 KP contiguous bf16 (row j at rows + j * ld): B[p][j] = pair p of row j
// (the keys of a block, whose rows are the columns of K^T).
void pack_columns(int64_t N, int64_t KP, const BFloat16* rows, int64_t ld, uint32_t* out);
// The same with row j at rows[j] (gathered rows: DejaVu's selected neurons).
void pack_columns(int64_t N, int64_t KP, const BFloat16* const* rows, uint32_t* out);

// Packed B from K rows of N contiguous bf16 (row k at rows + k * ld): pair p of column j is
// (row 2p, row 2p + 1) at j, the missing row of an odd K zero (the values of a block).
void pack_rows(int64_t K, int64_t N, const BFloat16* rows, int64_t ld, uint32_t* out);
// The same with row k at rows[k].
void pack_rows(int64_t K, int64_t N, const BFloat16* const* rows, uint32_t* out);

// dst[a * B + b] = src[b * A + a] rounded to bf16 (nearest even) for a < A, b < B: an fp32
// [B][A] matrix transposed into a bf16 [A][B] one (Monarch's permutations between its stages).
void transpose_to_bf16(int64_t A, int64_t B, const float* src, BFloat16* dst);

// p[j] = 2^(s[j] - mx) rounded to bf16 (nearest even) for j < n (s[j] <= mx, -inf allowed),
// zeros up to n_padded; returns the sum of the unrounded powers. The probabilities of the
// attention engine's bf16 P V product (its scores are in base 2), without a pass over fp32 ones.
float exp2_shifted_sum(const float* s, int64_t n, float mx, BFloat16* p, int64_t n_padded);

// dst[a * B + b] = src[b * A + a] for a < A, b < B: a bf16 [B][A] matrix transposed (Monarch's
// backward undoes the output permutation on the incoming gradient).
void transpose(int64_t A, int64_t B, const BFloat16* src, BFloat16* dst);

// gemm's A from the columns of K rows of N contiguous bf16 (row k at src + k * ld): row n, at
// out + n * ld_out, is column n's (K + 1) / 2 pairs (row 2p, row 2p + 1), the missing row of an
// odd K zero. The A of a weight gradient, whose reduction runs down the rows (the tokens).
void pair_columns(int64_t K, int64_t N, const BFloat16* src, int64_t ld, uint32_t* out, int64_t ld_out);

// c[m * ldc + j] (+)= sum_k u[k * ldu + m] v[k * ldv + j] for m < M, j < N over K rows: U^T V,
// a weight gradient whose reduction runs down the tokens, through pair_columns (into at, M x
// (K + 1) / 2 words) and pack_rows (into bt, packed_words(N, (K + 1) / 2) words).
void gemm_tokens(int64_t K, int64_t M, int64_t N, const BFloat16* u, int64_t ldu, const BFloat16* v, int64_t ldv,
                 uint32_t* at, uint32_t* bt, float* c, int64_t ldc, bool accumulate);

// dst[0, n) = src rounded to bf16 (nearest even), then zeros up to n_padded.
void round_to_bf16(const float* src, int64_t n, int64_t n_padded, BFloat16* dst);

// c[m * ldc + j] (+)= alpha * sum_p a_m[p] . B[p][j] for m < M, j < N: a_m is KP words at
// a + m * lda (alpha: the softmax scale of unscaled queries, applied as the tile is stored).
// Packed B should start on a 64-byte cache line (LineVector, scratch.h): AMX loads it in place,
// at under half the rate when its rows straddle lines; A rows that do not start on lines are
// copied first.
void gemm(int64_t M, int64_t N, int64_t KP, const uint32_t* a, int64_t lda, const uint32_t* packed, float alpha,
          float* c, int64_t ldc, bool accumulate);

// The same for a sum of `terms` products: c (+)= alpha * sum_t A_t B_t, A_t's row m at
// a[t] + m * lda and B_t packed at packed[t], every product over KP pairs (block-sparse rows:
// one term per stored block), accumulated in the tiles before one store.
void gemm_sum(int64_t M, int64_t N, int64_t KP, int64_t terms, const uint32_t* const* a, int64_t lda,
              const uint32_t* const* packed, float alpha, float* c, int64_t ldc, bool accumulate);

}  // namespace bf16
}  // namespace cpu
}  // namespace effx
