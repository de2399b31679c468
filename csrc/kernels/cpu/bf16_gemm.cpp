// effx: the GEMM of bf16_gemm.h, on AMX tiles or on AVX512_BF16 vectors. Every function that
// uses an instruction set carries its target attribute, and none runs unless amx_available() or
// available() said so.
#include "bf16_gemm.h"

#include "block_gemm.h"
#include "avx512_math.h"
#include "line_aligned.h"

#include <algorithm>
#include <type_traits>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace effx {
namespace cpu {
namespace bf16 {

#if defined(__x86_64__) && defined(__GNUC__)
#define EFFX_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define EFFX_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

bool available() {
  return block_gemm::isa_cap() >= block_gemm::IsaCap::Avx512Bf16 && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
}

bool amx_available() {
  static const bool granted = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
#if defined(__linux__)
    // Linux gives a process the 8 KB of tile registers only once it asks for them
    // (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a tile instruction before that faults.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
#else
    return false;
#endif
  }();
  return granted && block_gemm::isa_cap() == block_gemm::IsaCap::Amx && available();
}

namespace {

// GCC 12 takes the undefined pass-through operand inside its own unpack and shuffle
// intrinsics for an uninitialized variable.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// r[i] = word i of every input vector: a 16 x 16 transpose of 32-bit words, in three rounds
// (pairs of words, pairs of pairs, then 128-bit quarters).
EFFX_BF16_TARGET inline void transpose_words(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // Quarter c of r[4i + k] now holds word 4c + k of inputs 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  __m512i o[16];
  for (int k = 0; k < 4; ++k) {
    const __m512i e0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44), e1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE);
    const __m512i e2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
    const __m512i e3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
    o[k] = _mm512_shuffle_i32x4(e0, e2, 0x88);
    o[4 + k] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
    o[8 + k] = _mm512_shuffle_i32x4(e1, e3, 0x88);
    o[12 + k] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = o[i];
}

#pragma GCC diagnostic pop

}  // namespace

// pack_columns over rows found by row(j).
template <class Row>
EFFX_BF16_TARGET void pack_columns_of(int64_t N, int64_t KP, Row row, uint32_t* out) {
  // 16 rows x 16 pairs at a time: loaded as rows, stored as the panel's columns.
  for (int64_t q0 = 0; q0 < N; q0 += kPanel) {
    uint32_t* panel = out + q0 * KP;
    for (int64_t h = 0; h < kPanel; h += 16) {
      const int64_t nr = std::max<int64_t>(0, std::min<int64_t>(16, N - q0 - h));
      for (int64_t p0 = 0; p0 < KP; p0 += 16) {
        const int64_t np = std::min<int64_t>(16, KP - p0);
        const __mmask16 m = static_cast<__mmask16>((uint32_t{1} << np) - 1);
        __m512i r[16];
        for (int64_t j = 0; j < 16; ++j) {
          r[j] = j < nr ? _mm512_maskz_loadu_epi32(m, row(q0 + h + j) + 2 * p0) : _mm512_setzero_si512();
        }
        transpose_words(r);
        for (int64_t i = 0; i < np; ++i) _mm512_storeu_si512(panel + (p0 + i) * kPanel + h, r[i]);
      }
    }
  }
}

void pack_columns(int64_t N, int64_t KP, const BFloat16* rows, int64_t ld, uint32_t* out) {
  pack_columns_of(N, KP, [=](int64_t j) { return rows + j * ld; }, out);
}

void pack_columns(int64_t N, int64_t KP, const BFloat16* const* rows, uint32_t* out) {
  pack_columns_of(N, KP, [=](int64_t j) { return rows[j]; }, out);
}

// pack_rows over rows found by row(k).
template <class Row>
EFFX_BF16_TARGET void pack_rows_of(int64_t K, int64_t N, Row row, uint32_t* out) {
  // Interleaving two rows of 16 columns into 16 pairs: lanes 0-15 of the 32 16-bit lanes are row 2p's,
  // 16-31 row 2p+1's; the result takes column j of each in turn.
  __m512i idx;
  alignas(64) uint16_t order[32];
  for (int j = 0; j < 16; ++j) {
    order[2 * j] = static_cast<uint16_t>(j);
    order[2 * j + 1] = static_cast<uint16_t>(32 + j);
  }
  std::memcpy(&idx, order, sizeof idx);
  const int64_t KP = (K + 1) / 2;
  for (int64_t p = 0; p < KP; ++p) {
    const BFloat16* r0 = row(2 * p);
    const BFloat16* r1 = 2 * p + 1 < K ? row(2 * p + 1) : nullptr;
    for (int64_t q0 = 0; q0 < N; q0 += kPanel) {
      uint32_t* dst = out + q0 * KP + p * kPanel;
      const int64_t nq = std::min(kPanel, N - q0);
      for (int64_t h = 0; h < kPanel; h += 16) {
        const int64_t w = std::max<int64_t>(0, std::min<int64_t>(16, nq - h));
        const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << w) - 1);
        const __m512i a = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, r0 + q0 + h));
        const __m512i b = r1 ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, r1 + q0 + h)) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + h, _mm512_permutex2var_epi16(a, idx, b));
      }
    }
  }
}

void pack_rows(int64_t K, int64_t N, const BFloat16* rows, int64_t ld, uint32_t* out) {
  pack_rows_of(K, N, [=](int64_t k) { return rows + k * ld; }, out);
}

void pack_rows(int64_t K, int64_t N, const BFloat16* const* rows, uint32_t* out) {
  pack_rows_of(K, N, [=](int64_t k) { return rows[k]; }, out);
}

// The widening, narrowing and shift intrinsics have the same pass-through operand as above.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// dst[a * B + b] = src[b * A + a] as bf16, in 16 x 16 blocks through transpose_words: fp32
// sources are rounded to bf16 (nearest even) on the store, bf16 ones widened to 32-bit words
// on the load and narrowed back.
template <typename S>
EFFX_BF16_TARGET inline void transpose_blocks(int64_t A, int64_t B, const S* src, BFloat16* dst) {
  for (int64_t b0 = 0; b0 < B; b0 += 16) {
    const int64_t nb = std::min<int64_t>(16, B - b0);
    const __mmask16 out_mask = static_cast<__mmask16>((uint32_t{1} << nb) - 1);
    for (int64_t a0 = 0; a0 < A; a0 += 16) {
      const int64_t na = std::min<int64_t>(16, A - a0);
      const __mmask16 in_mask = static_cast<__mmask16>((uint32_t{1} << na) - 1);
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const S* row = src + (b0 + i) * A + a0;
        if (i >= nb) r[i] = _mm512_setzero_si512();
        else if constexpr (std::is_same_v<S, float>) r[i] = _mm512_maskz_loadu_epi32(in_mask, row);
        else r[i] = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in_mask, row));
      }
      transpose_words(r);
      for (int64_t i = 0; i < na; ++i) {
        __m256i h;
        if constexpr (std::is_same_v<S, float>) h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[i])));
        else h = _mm512_cvtepi32_epi16(r[i]);
        _mm256_mask_storeu_epi16(dst + (a0 + i) * B + b0, out_mask, h);
      }
    }
  }
}

EFFX_BF16_TARGET void transpose_to_bf16(int64_t A, int64_t B, const float* src, BFloat16* dst) {
  transpose_blocks(A, B, src, dst);
}

EFFX_BF16_TARGET void transpose(int64_t A, int64_t B, const BFloat16* src, BFloat16* dst) {
  transpose_blocks(A, B, src, dst);
}

EFFX_BF16_TARGET void pair_columns(int64_t K, int64_t N, const BFloat16* src, int64_t ld, uint32_t* out,
                                   int64_t ld_out) {
  // 16 pairs x 16 columns at a time: word j of r[i] is pair p0 + i of column n0 + j, so the
  // transpose leaves column n0 + j's pairs in r[j].
  const int64_t KP = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t nn = std::min<int64_t>(16, N - n0);
    const __mmask16 col_mask = static_cast<__mmask16>((uint32_t{1} << nn) - 1);
    for (int64_t p0 = 0; p0 < KP; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, KP - p0);
      const __mmask16 pair_mask = static_cast<__mmask16>((uint32_t{1} << np) - 1);
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t k = 2 * (p0 + i);
        const __m512i lo = k < K ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(col_mask, src + k * ld + n0))
                                 : _mm512_setzero_si512();
        const __m512i hi = k + 1 < K
                               ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(col_mask, src + (k + 1) * ld + n0))
                               : _mm512_setzero_si512();
        r[i] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
      transpose_words(r);
      for (int64_t j = 0; j < nn; ++j) _mm512_mask_storeu_epi32(out + (n0 + j) * ld_out + p0, pair_mask, r[j]);
    }
  }
}

#pragma GCC diagnostic pop

EFFX_BF16_TARGET float exp2_shifted_sum(const float* s, int64_t n, float mx, BFloat16* p, int64_t n_padded) {
  // Two vectors a step, unmasked, into two sums and one 32-wide conversion, then a shuffled
  // sum of the lanes (avx512_math.h): 256 rows of 128 scores on one Xeon core, 4.25 -> 3.1 ns a vector (masked
  // steps of one vector and a lane-at-a-time sum before).
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(mx);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp2_512_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    const __m512 e1 = exp2_512_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), m));
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
    _mm512_storeu_si512(p + j, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
  }
  for (; j < n; j += 16) {
    const __mmask16 k = static_cast<__mmask16>((uint32_t{1} << std::min<int64_t>(16, n - j)) - 1);
    // missing lanes: -inf, 2^-inf = 0
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), k, s + j);
    const __m512 e = exp2_512_nonpositive(_mm512_sub_ps(x, m));
    acc0 = _mm512_add_ps(acc0, e);
    _mm256_mask_storeu_epi16(p + j, k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
  }
  for (int64_t t = n; t < n_padded; ++t) p[t].bits = 0;
  return lanes_sum512(_mm512_add_ps(acc0, acc1));
}

EFFX_BF16_TARGET void round_to_bf16(const float* src, int64_t n, int64_t n_padded, BFloat16* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &h, sizeof h);
  }
  for (; i < n; ++i) dst[i] = from_float<BFloat16>(src[i]);
  for (; i < n_padded; ++i) dst[i].bits = 0;
}

namespace {

constexpr int kRows = 6;  // rows per tile: 12 accumulators, two B vectors and a broadcast in 32 zmm

// Rows m0 .. m0 + MR and the panel at column q0 of the sum over `terms` products, pairs
// [p_begin, p_end) of each (KP: the pairs of the packed layout), all in the accumulators: the
// terms of a block-sparse row load and store C once, not once per term.
template <int MR>
EFFX_BF16_TARGET void tile(int64_t terms, int64_t p_begin, int64_t p_end, int64_t KP, const uint32_t* const* a,
                           int64_t lda, const uint32_t* const* packed, int64_t m0, int64_t q0, float alpha, float* c,
                           int64_t ldc, int64_t nr, bool accumulate) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < terms; ++t) {
    const uint32_t* am = a[t] + m0 * lda;
    const uint32_t* bp = packed[t] + q0 * KP;
    for (int64_t p = p_begin; p < p_end; ++p) {
      const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp + p * kPanel));
      const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp + p * kPanel + 16));
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(am[r * lda + p])));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      }
    }
  }
  const __mmask16 m0_mask = static_cast<__mmask16>((uint32_t{1} << std::min<int64_t>(16, nr)) - 1);
  const __mmask16 m1_mask = static_cast<__mmask16>((uint32_t{1} << std::max<int64_t>(0, nr - 16)) - 1);
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    float* cr = c + (m0 + r) * ldc + q0;
    __m512 v0 = _mm512_mul_ps(acc[r][0], scale), v1 = _mm512_mul_ps(acc[r][1], scale);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0_mask, cr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1_mask, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0_mask, v0);
    _mm512_mask_storeu_ps(cr + 16, m1_mask, v1);
  }
}

// Pairs [p_begin, p_end) of the sum of products, on vectors.
void vector_gemm(int64_t M, int64_t N, int64_t p_begin, int64_t p_end, int64_t KP, int64_t terms,
                 const uint32_t* const* a, int64_t lda, const uint32_t* const* packed, float alpha, float* c,
                 int64_t ldc, bool accumulate) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t mr = std::min<int64_t>(kRows, M - m0);
    for (int64_t q0 = 0; q0 < N; q0 += kPanel) {
      const int64_t nr = std::min(kPanel, N - q0);
      switch (mr) {
        case 6: tile<6>(terms, p_begin, p_end, KP, a, lda, packed, m0, q0, alpha, c, ldc, nr, accumulate); break;
        case 5: tile<5>(terms, p_begin, p_end, KP, a, lda, packed, m0, q0, alpha, c, ldc, nr, accumulate); break;
        case 4: tile<4>(terms, p_begin, p_end, KP, a, lda, packed, m0, q0, alpha, c, ldc, nr, accumulate); break;
        case 3: tile<3>(terms, p_begin, p_end, KP, a, lda, packed, m0, q0, alpha, c, ldc, nr, accumulate); break;
        case 2: tile<2>(terms, p_begin, p_end, KP, a, lda, packed, m0, q0, alpha, c, ldc, nr, accumulate); break;
        default: tile<1>(terms, p_begin, p_end, KP, a, lda, packed, m0, q0, alpha, c, ldc, nr, accumulate); break;
      }
    }
  }
}

// AMX: a tile is 16 rows of 64 bytes, so 16 rows x 16 pairs of A, 16 pairs x 16 columns of B
// (a half panel: the packed layout's rows of 32 words are B tiles at a 128-byte stride), and
// 16 x 16 fp32 of C. Each step of 16 pairs multiplies 32 rows (A tiles 4, 5) by a whole
// panel (B tiles 6, 7) into four C tiles (0-3). Edge blocks of fewer than 32 rows run on a
// zero-padded copy of their rows (as do rows off cache lines); the pairs past the last multiple
// of 16 go to the vectors.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTile = 16;  // rows of every tile, and pairs (or fp32 columns) in its 64 bytes

// The sum over `terms` products A_t B_t, all of KP pairs (one product: terms 1).
EFFX_AMX_TARGET void amx_gemm(int64_t M, int64_t N, int64_t KP, int64_t terms, const uint32_t* const* a,
                              int64_t lda, const uint32_t* const* packed, float alpha, float* c, int64_t ldc,
                              bool accumulate) {
  const int64_t kp = KP / kTile * kTile;
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTile;
  }
  // Configured on every call: other code on this thread (oneDNN inside torch) may have loaded
  // its own tile shapes since the last one.
  _tile_loadconfig(&config);
  thread_local LineVector<uint32_t> edge;
  alignas(64) float out[2 * kTile][kPanel];
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int64_t m0 = 0; m0 < M; m0 += 2 * kTile) {
    const int64_t mr = std::min(2 * kTile, M - m0);
    int64_t la = lda;
    auto rows_of = [&](int64_t t) { return a[t] + m0 * lda; };
    // Edge blocks, and rows that do not start on cache lines, run on an aligned copy: a tile
    // load whose 16 rows each straddle two lines ran the whole product at under half its rate
    // (64 x 256 x 128 pairs on one Xeon core, 16 bytes past a line: 0.87 TF/s, aligned 1.96).
    bool staged = mr < 2 * kTile || lda % kTile != 0;
    for (int64_t t = 0; t < terms && !staged; ++t) staged = reinterpret_cast<uintptr_t>(rows_of(t)) % 64 != 0;
    if (staged) {
      edge.resize(terms * 2 * kTile * kp);
      for (int64_t t = 0; t < terms; ++t) {
        uint32_t* block = edge.data() + t * 2 * kTile * kp;
        for (int64_t r = 0; r < mr; ++r) std::memcpy(block + r * kp, rows_of(t) + r * lda, kp * 4);
        std::fill(block + mr * kp, block + 2 * kTile * kp, 0u);  // the rows past an edge block's last
      }
      la = kp;
    }
    const bool two = mr > kTile;
    for (int64_t q0 = 0; q0 < N; q0 += kPanel) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t t = 0; t < terms; ++t) {
        const uint32_t* am = staged ? edge.data() + t * 2 * kTile * kp : rows_of(t);
        const uint32_t* bp = packed[t] + q0 * KP;
        for (int64_t p0 = 0; p0 < kp; p0 += kTile) {
          _tile_loadd(4, am + p0, la * 4);
          _tile_loadd(6, bp + p0 * kPanel, kPanel * 4);
          _tile_loadd(7, bp + p0 * kPanel + kTile, kPanel * 4);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, am + kTile * la + p0, la * 4);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      _tile_stored(0, &out[0][0], kPanel * 4);
      _tile_stored(1, &out[0][kTile], kPanel * 4);
      if (two) {
        _tile_stored(2, &out[kTile][0], kPanel * 4);
        _tile_stored(3, &out[kTile][kTile], kPanel * 4);
      }
      const int64_t nr = std::min(kPanel, N - q0);
      const __mmask16 k0 = static_cast<__mmask16>((uint32_t{1} << std::min<int64_t>(16, nr)) - 1);
      const __mmask16 k1 = static_cast<__mmask16>((uint32_t{1} << std::max<int64_t>(0, nr - 16)) - 1);
      for (int64_t r = 0; r < mr; ++r) {
        float* cr = c + (m0 + r) * ldc + q0;
        __m512 v0 = _mm512_mul_ps(_mm512_load_ps(&out[r][0]), scale);
        __m512 v1 = _mm512_mul_ps(_mm512_load_ps(&out[r][kTile]), scale);
        if (accumulate) {
          v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, cr));
          v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, cr + 16));
        }
        _mm512_mask_storeu_ps(cr, k0, v0);
        _mm512_mask_storeu_ps(cr + 16, k1, v1);
      }
    }
  }
  _tile_release();  // back to the init state: context switches need not save 8 KB of tiles
  if (kp < KP) {
    vector_gemm(M, N, kp, KP, KP, terms, a, lda, packed, alpha, c, ldc, true);
  }
}

}  // namespace

EFFX_AMX_TARGET float amx_chains(int64_t iters) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTile;
  }
  _tile_loadconfig(&config);
  alignas(64) uint32_t zeros[kTile * kTile] = {};
  alignas(64) float out[kTile * kTile];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return out[0];
}

void gemm(int64_t M, int64_t N, int64_t KP, const uint32_t* a, int64_t lda, const uint32_t* packed, float alpha,
          float* c, int64_t ldc, bool accumulate) {
  gemm_sum(M, N, KP, 1, &a, lda, &packed, alpha, c, ldc, accumulate);
}

void gemm_sum(int64_t M, int64_t N, int64_t KP, int64_t terms, const uint32_t* const* a, int64_t lda,
              const uint32_t* const* packed, float alpha, float* c, int64_t ldc, bool accumulate) {
  if (terms == 0) {  // an empty sum
    for (int64_t m = 0; m < M && !accumulate; ++m) std::fill(c + m * ldc, c + m * ldc + N, 0.0f);
    return;
  }
  if (M >= kTile && KP >= kTile && amx_available()) {
    return amx_gemm(M, N, KP, terms, a, lda, packed, alpha, c, ldc, accumulate);
  }
  vector_gemm(M, N, 0, KP, KP, terms, a, lda, packed, alpha, c, ldc, accumulate);
}

#else  // no AVX512_BF16 on this architecture: available() is false and nothing else is called

bool available() { return false; }
bool amx_available() { return false; }
float amx_chains(int64_t) { std::abort(); }
void pack_columns(int64_t, int64_t, const BFloat16*, int64_t, uint32_t*) { std::abort(); }
void pack_columns(int64_t, int64_t, const BFloat16* const*, uint32_t*) { std::abort(); }
void pack_rows(int64_t, int64_t, const BFloat16*, int64_t, uint32_t*) { std::abort(); }
void pack_rows(int64_t, int64_t, const BFloat16* const*, uint32_t*) { std::abort(); }
void transpose_to_bf16(int64_t, int64_t, const float*, BFloat16*) { std::abort(); }
void transpose(int64_t, int64_t, const BFloat16*, BFloat16*) { std::abort(); }
void pair_columns(int64_t, int64_t, const BFloat16*, int64_t, uint32_t*, int64_t) { std::abort(); }
float exp2_shifted_sum(const float*, int64_t, float, BFloat16*, int64_t) { std::abort(); }
void round_to_bf16(const float*, int64_t, int64_t, BFloat16*) { std::abort(); }
void gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, float, float*, int64_t, bool) {
  std::abort();
}
void gemm_sum(int64_t, int64_t, int64_t, int64_t, const uint32_t* const*, int64_t, const uint32_t* const*, float,
              float*, int64_t, bool) {
  std::abort();
}

#endif

void gemm_tokens(int64_t K, int64_t M, int64_t N, const BFloat16* u, int64_t ldu, const BFloat16* v, int64_t ldv,
                 uint32_t* at, uint32_t* bt, float* c, int64_t ldc, bool accumulate) {
  const int64_t kp = (K + 1) / 2;
  pair_columns(K, M, u, ldu, at, kp);
  pack_rows(K, N, v, ldv, bt);
  gemm(M, N, kp, at, kp, bt, 1.0f, c, ldc, accumulate);
}

}  // namespace bf16
}  // namespace cpu
}  // namespace effx
