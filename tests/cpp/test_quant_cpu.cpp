// effx C++ test: group-wise quantization CPU kernel (include/effx/quant.h), torch-free.
// Checks the packing layout against hand-built codes, the error bound of round-to-nearest
// (|x - dequant| <= scale / 2), exact constant groups, and fp16/bf16 conversions.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "effx/quant.h"

using effx::DType;
using effx::QuantShape;

namespace {

void test_layout() {
  // One row 0, 1, 2, 3, 0, 1, ... of 2-bit values in one group: min 0, max 3, scale 1, so
  // the codes are the values and word 0 must be 0b11100100 repeated (LSB first).
  const int cols = 40;
  std::vector<float> x(cols);
  for (int j = 0; j < cols; ++j) x[j] = static_cast<float>(j % 4);
  QuantShape s{1, cols, cols, 2, cols};
  std::vector<int32_t> codes(effx::quant_words_per_row(cols, 2));
  float scale = 0, zero = 0;
  effx::cpu::quantize(s, DType::Float32, x.data(), codes.data(), &scale, &zero, 2);
  EFFX_EXPECT(scale == 1.0f && zero == 0.0f, "scale %g zero %g", scale, zero);
  EFFX_EXPECT(codes.size() == 3, "words %zu", codes.size());
  EFFX_EXPECT(static_cast<uint32_t>(codes[0]) == 0xE4E4E4E4u, "word0 %08x", codes[0]);
  EFFX_EXPECT(static_cast<uint32_t>(codes[1]) == 0xE4E4E4E4u, "word1 %08x", codes[1]);
  // 8 values left in the last word, the upper 16 bits are padding.
  EFFX_EXPECT(static_cast<uint32_t>(codes[2]) == 0x0000E4E4u, "word2 %08x", codes[2]);
}

void test_round_trip(int bits, int group_size, int rows, int cols, int threads) {
  std::mt19937 rng(1234 + bits * 7 + group_size);
  std::normal_distribution<float> dist(0.5f, 3.0f);
  const int stride = cols + 3;  // rows are not packed: exercises x_row_stride
  std::vector<float> x(static_cast<size_t>(rows) * stride);
  for (auto& v : x) v = dist(rng);
  // Make one group constant: it must come back exactly.
  for (int j = 0; j < group_size; ++j) x[j] = 1.25f;
  QuantShape s{rows, cols, stride, bits, group_size};
  const int groups = cols / group_size;
  std::vector<int32_t> codes(rows * effx::quant_words_per_row(cols, bits));
  std::vector<float> scale(rows * groups), zero(rows * groups), out(rows * cols);
  effx::cpu::quantize(s, DType::Float32, x.data(), codes.data(), scale.data(), zero.data(),
                      threads);
  effx::cpu::dequantize(s, codes.data(), DType::Float32, scale.data(), zero.data(),
                        DType::Float32, out.data(), threads);
  EFFX_EXPECT(scale[0] == 0.0f && zero[0] == 1.25f, "constant group scale %g zero %g", scale[0],
              zero[0]);
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < cols; ++j) {
      const float xi = x[r * stride + j];
      const float sc = scale[r * groups + j / group_size];
      const float err = std::fabs(out[r * cols + j] - xi);
      EFFX_EXPECT(std::isfinite(out[r * cols + j]), "non-finite at %d,%d", r, j);
      EFFX_EXPECT(err <= 0.5f * sc * (1 + 1e-4f) + 1e-6f, "bits %d G %d at (%d,%d): err %g scale %g",
                  bits, group_size, r, j, err, sc);
    }
  }
}

void test_half_conversions() {
  // Every finite fp16 value converts to fp32 and back unchanged; the same for bf16.
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    if ((bits & 0x7c00u) == 0x7c00u) continue;  // inf / nan
    const float f = effx::to_float(effx::Half{bits});
    EFFX_EXPECT(effx::from_float<effx::Half>(f).bits == bits, "fp16 %04x", bits);
    const float g = effx::to_float(effx::BFloat16{bits});
    if (std::isfinite(g)) EFFX_EXPECT(effx::from_float<effx::BFloat16>(g).bits == bits, "bf16 %04x", bits);
  }
  // Ties round to even: 1 + 2^-11 lies halfway between fp16 1.0 and its successor.
  EFFX_EXPECT(effx::from_float<effx::Half>(1.0f + 0.00048828125f).bits == 0x3c00u, "tie to even");
  EFFX_EXPECT(effx::from_float<effx::Half>(70000.0f).bits == 0x7c00u, "overflow to inf");
}

}  // namespace

int main() {
  test_layout();
  test_half_conversions();
  for (int bits : {2, 4, 8}) {
    for (int g : {8, 32, 48, 128}) {
      test_round_trip(bits, g, 7, g * 5, 1);
      test_round_trip(bits, g, 301, g * 3, 2);  // large enough to run threaded
    }
  }
  std::printf("quant_cpu: ok\n");
  return 0;
}
