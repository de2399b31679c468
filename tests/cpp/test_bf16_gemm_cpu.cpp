// effx C++ test: the bf16 GEMM of csrc/kernels/cpu/bf16_gemm.h against float64 sums of the same
// bf16 operands, on AVX512_BF16 vectors and (where the CPU has them) on AMX tiles: row tiles of
// 1 to 6 rows and row blocks of 16 to 32 (full, partial, and a zero-padded edge), partial
// panels, reductions of fewer pairs than a tile, not a multiple of a tile's 16 pairs (the rest
// on vectors) and odd (a zero missing row), a scale on the product, accumulation, operands
// packed from key-like rows and value-like rows, sums of 0, 1 and 3 products (gemm_sum), the
// bf16 transpose and the pairs of columns (exact), and the rounding of probabilities to bf16
// (nearest even). Skips (exit 77) on a CPU without AVX512_BF16.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "bf16_gemm.h"
#include "check.h"

namespace {

namespace bf = effx::cpu::bf16;
using effx::BFloat16;

std::vector<BFloat16> random_bf16(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<BFloat16> v(n);
  for (auto& x : v) x = effx::from_float<BFloat16>(nd(rng));
  return v;
}

// C = A B with A [M][K] and B given either as K-major rows [K][N] (values) or as the rows of
// B^T [N][K] (keys); K even for the keys, any K for the values.
void check(int64_t M, int64_t N, int64_t K, bool keys, bool accumulate, std::mt19937& rng) {
  const int64_t KP = (K + 1) / 2;
  std::vector<BFloat16> a = random_bf16(M * 2 * KP, rng);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = K; k < 2 * KP; ++k) a[m * 2 * KP + k].bits = 0;  // the pad pair half
  const int64_t ld = keys ? K + 3 : N + 5;  // row strides wider than the rows
  std::vector<BFloat16> b = random_bf16(keys ? N * ld : K * ld, rng);
  std::vector<uint32_t> packed(bf::packed_words(N, KP));
  if (keys) bf::pack_columns(N, KP, b.data(), ld, packed.data());
  else bf::pack_rows(K, N, b.data(), ld, packed.data());
  std::vector<uint32_t> words(M * KP);
  std::memcpy(words.data(), a.data(), words.size() * 4);
  const int64_t ldc = N + 2;
  std::vector<float> c(M * ldc, 0.5f);
  const float alpha = keys ? 0.125f : 1.0f;  // the scores' softmax scale; values unscaled
  bf::gemm(M, N, KP, words.data(), KP, packed.data(), alpha, c.data(), ldc, accumulate);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < N; ++j) {
      double dot = 0.0, mag = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double bk = effx::to_float(keys ? b[j * ld + k] : b[k * ld + j]);
        dot += effx::to_float(a[m * 2 * KP + k]) * bk;
        mag += std::fabs(effx::to_float(a[m * 2 * KP + k]) * bk);
      }
      const double want = (accumulate ? 0.5 : 0.0) + alpha * dot;
      const double got = c[m * ldc + j];
      EFFX_EXPECT(std::fabs(got - want) <= 1e-6 * (mag + 1.0), "M=%lld N=%lld K=%lld keys=%d (%lld, %lld): got %g, want %g",
                  (long long)M, (long long)N, (long long)K, keys, (long long)m, (long long)j, got, want);
    }
    EFFX_EXPECT(c[m * ldc + N] == 0.5f && c[m * ldc + N + 1] == 0.5f, "row %lld: wrote past column N", (long long)m);
  }
}

// gemm_sum: `terms` products with A_t at its own column offset of one row-major matrix and B_t
// packed from its own key-like rows, against a float64 sum (0 terms: zeros, or c unchanged).
void check_sum(int64_t M, int64_t N, int64_t K, int64_t terms, bool accumulate, std::mt19937& rng) {
  const int64_t KP = K / 2, width = (terms + 1) * K;  // A_t: columns [t K, (t + 1) K) of a wider A
  std::vector<BFloat16> a = random_bf16(M * width, rng);
  std::vector<BFloat16> b = random_bf16(std::max<int64_t>(terms, 1) * N * K, rng);
  std::vector<uint32_t> packed(std::max<int64_t>(terms, 1) * bf::packed_words(N, KP)), words(M * width / 2);
  std::vector<const uint32_t*> a_t, b_t;
  std::memcpy(words.data(), a.data(), words.size() * 4);
  for (int64_t t = 0; t < terms; ++t) {
    uint32_t* bp = packed.data() + t * bf::packed_words(N, KP);
    bf::pack_columns(N, KP, b.data() + t * N * K, K, bp);
    a_t.push_back(words.data() + t * KP);
    b_t.push_back(bp);
  }
  const int64_t ldc = N + 1;
  std::vector<float> c(M * ldc, 0.25f);
  bf::gemm_sum(M, N, KP, terms, a_t.data(), width / 2, b_t.data(), 1.0f, c.data(), ldc, accumulate);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < N; ++j) {
      double dot = accumulate ? 0.25 : 0.0, mag = 1.0;
      for (int64_t t = 0; t < terms; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const double p = effx::to_float(a[m * width + t * K + k]) * effx::to_float(b[(t * N + j) * K + k]);
          dot += p;
          mag += std::fabs(p);
        }
      }
      EFFX_EXPECT(std::fabs(c[m * ldc + j] - dot) <= 1e-6 * mag, "gemm_sum M=%lld N=%lld K=%lld terms=%lld (%lld, %lld): got %g, want %g",
                  (long long)M, (long long)N, (long long)K, (long long)terms, (long long)m, (long long)j, c[m * ldc + j], dot);
    }
  }
}

// transpose and pair_columns move bf16 bits: exact, also at sizes that are not multiples of 16.
void check_moves(int64_t rows, int64_t cols, std::mt19937& rng) {
  const std::vector<BFloat16> src = random_bf16(rows * cols, rng);
  std::vector<BFloat16> t(rows * cols);
  bf::transpose(cols, rows, src.data(), t.data());  // [rows][cols] -> [cols][rows]
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      EFFX_EXPECT(t[c * rows + r].bits == src[r * cols + c].bits, "transpose %lldx%lld (%lld, %lld)", (long long)rows,
                  (long long)cols, (long long)r, (long long)c);
  // Columns [1, cols) of src as gemm rows, at a row stride past the pairs (untouched words stay).
  const int64_t n = cols - 1, KP = (rows + 1) / 2, ld_out = KP + 3;
  std::vector<uint32_t> a(std::max<int64_t>(n, 0) * ld_out, 0xdeadbeefu);
  bf::pair_columns(rows, n, src.data() + 1, cols, a.data(), ld_out);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t p = 0; p < ld_out; ++p) {
      uint32_t want = 0xdeadbeefu;
      if (p < KP) {
        const uint32_t hi = 2 * p + 1 < rows ? src[(2 * p + 1) * cols + 1 + j].bits : 0;
        want = src[2 * p * cols + 1 + j].bits | hi << 16;
      }
      EFFX_EXPECT(a[j * ld_out + p] == want, "pair_columns K=%lld N=%lld column %lld pair %lld: got 0x%08x, want 0x%08x",
                  (long long)rows, (long long)n, (long long)j, (long long)p, a[j * ld_out + p], want);
    }
  }
}

}  // namespace

int main() {
  if (!bf::available()) {
    std::printf("bf16_gemm_cpu: skipped, no AVX512_BF16 on this CPU (or EFFX_CPU_ISA caps it)\n");
    return 77;
  }
  std::mt19937 rng(5);
  const bool amx = bf::amx_available();
  for (const char* isa : {"amx", "avx512bf16"}) {
    if (std::strcmp(isa, "amx") == 0 && !amx) {
      std::printf("bf16_gemm_cpu: AMX part skipped, no AMX-BF16 on this CPU (or the OS refused the tiles)\n");
      continue;
    }
    setenv("EFFX_CPU_ISA", isa, 1);
    for (int64_t M : {1, 5, 6, 13, 16, 29, 32, 70}) {
      for (int64_t N : {3, 32, 45, 128}) {
        for (int64_t K : {2, 64, 128, 80}) check(M, N, K, true, M % 2 == 1, rng);
        for (int64_t K : {1, 3, 22, 128, 75}) check(M, N, K, false, M % 2 == 0, rng);
      }
      for (int64_t terms : {0, 1, 3}) {
        for (int64_t K : {16, 32, 40}) check_sum(M, 32, K, terms, terms == 1, rng);
      }
    }
  }
  unsetenv("EFFX_CPU_ISA");
  for (int64_t rows : {1, 2, 15, 16, 33, 64})
    for (int64_t cols : {1, 4, 17, 32, 50}) check_moves(rows, cols, rng);
  const float src[5] = {1.0f, 1.00390625f, 1.01171875f, -3.0e-3f, 65504.0f};  // ties to even at 2^-8 steps
  BFloat16 dst[8];
  bf::round_to_bf16(src, 5, 8, dst);
  for (int i = 0; i < 8; ++i) {
    const uint16_t want = i < 5 ? effx::from_float<BFloat16>(src[i]).bits : uint16_t{0};
    EFFX_EXPECT(dst[i].bits == want, "round_to_bf16 [%d]: got 0x%04x, want 0x%04x", i, dst[i].bits, want);
  }
  std::printf("bf16_gemm_cpu: all shapes ok (%s)\n", amx ? "AMX tiles and AVX512_BF16 vectors" : "AVX512_BF16 vectors");
  return 0;
}
