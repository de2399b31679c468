// effx family: group-wise asymmetric quantization, multithreaded CPU kernels (layout in
// include/effx/quant.h). Work is split into units of lcm(group_size, codes per word) values
// so that every unit owns whole groups and whole output words: threads never share a word.
#include "effx/quant.h"

#include <algorithm>
#include <cfloat>
#include <limits>
#include <numeric>
#include <vector>

namespace effx {
namespace cpu {
namespace {

// Below this many values the thread start-up costs more than the work.
constexpr int64_t kSerialWork = 1 << 15;

struct Units {
  int64_t size;      // values per unit
  int64_t per_row;   // units per row
  int64_t total;
};

Units make_units(const QuantShape& s) {
  const int64_t size = std::lcm<int64_t>(s.group_size, quant_codes_per_word(s.bits));
  const int64_t per_row = (s.cols + size - 1) / size;
  return {size, per_row, per_row * s.rows};
}

int threads_for(const QuantShape& s, int num_threads) {
  return s.rows * s.cols < kSerialWork ? 1 : std::max(1, num_threads);
}

// Round to nearest even for 0 <= v < 2^22 without a libm call, so the loop vectorizes with
// plain SSE2: adding 1.5 * 2^23 pushes the fraction out of the mantissa.
inline float round_small_nonnegative(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

template <typename T, int BITS>
void quantize_impl(const QuantShape& s, const T* x, int32_t* codes, T* scale, T* zero,
                   int num_threads) {
  constexpr int kPerWord = 32 / BITS;
  constexpr float kMaxCode = static_cast<float>((1 << BITS) - 1);
  const Units units = make_units(s);
  const int64_t G = s.group_size;
  const int64_t words_per_row = quant_words_per_row(s.cols, BITS);
  const int64_t groups_per_row = s.cols / G;

#pragma omp parallel num_threads(threads_for(s, num_threads))
  {
    std::vector<float> values(units.size);
    std::vector<uint32_t> q(units.size + kPerWord, 0u);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units.total; ++u) {
      const int64_t row = u / units.per_row;
      const int64_t begin = (u % units.per_row) * units.size;
      const int64_t end = std::min(begin + units.size, s.cols);
      const T* xr = x + row * s.x_row_stride;
      for (int64_t g0 = begin; g0 < end; g0 += G) {
        float* v = values.data() + (g0 - begin);
        float mn = std::numeric_limits<float>::infinity();
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < G; ++i) {
          const float xi = to_float(xr[g0 + i]);
          v[i] = xi;
          mn = xi < mn ? xi : mn;
          mx = xi > mx ? xi : mx;
        }
        const T stored = from_float_up<T>((mx - mn) / kMaxCode);
        float sc = to_float(stored);
        const bool usable = sc >= FLT_MIN && sc <= FLT_MAX;
        sc = usable ? sc : 0.0f;
        const float inv = usable ? 1.0f / sc : 0.0f;
        const int64_t gi = row * groups_per_row + g0 / G;
        scale[gi] = from_float<T>(sc);
        zero[gi] = from_float<T>(mn);
        uint32_t* qg = q.data() + (g0 - begin);
        for (int64_t i = 0; i < G; ++i) {
          float c = (v[i] - mn) * inv;
          c = c < 0.0f ? 0.0f : c;
          c = c > kMaxCode ? kMaxCode : c;
          qg[i] = static_cast<uint32_t>(static_cast<int32_t>(round_small_nonnegative(c)));
        }
      }
      // Codes past the end of the row pad the last word with zeros.
      std::fill(q.begin() + (end - begin), q.begin() + (end - begin) + kPerWord, 0u);
      int32_t* out = codes + row * words_per_row + begin / kPerWord;
      const int64_t words = (end - begin + kPerWord - 1) / kPerWord;
      for (int64_t w = 0; w < words; ++w) {
        uint32_t acc = 0;
        for (int j = 0; j < kPerWord; ++j) acc |= q[w * kPerWord + j] << (BITS * j);
        out[w] = static_cast<int32_t>(acc);
      }
    }
  }
}

template <typename P, typename O, int BITS>
void dequantize_impl(const QuantShape& s, const int32_t* codes, const P* scale, const P* zero,
                     O* out, int num_threads) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const Units units = make_units(s);
  const int64_t G = s.group_size;
  const int64_t words_per_row = quant_words_per_row(s.cols, BITS);
  const int64_t groups_per_row = s.cols / G;

#pragma omp parallel for schedule(static) num_threads(threads_for(s, num_threads))
  for (int64_t u = 0; u < units.total; ++u) {
    const int64_t row = u / units.per_row;
    const int64_t begin = (u % units.per_row) * units.size;
    const int64_t end = std::min(begin + units.size, s.cols);
    const int32_t* cr = codes + row * words_per_row;
    O* orow = out + row * s.cols;
    for (int64_t g0 = begin; g0 < end; g0 += G) {
      const int64_t gi = row * groups_per_row + g0 / G;
      const float sc = to_float(scale[gi]);
      const float mn = to_float(zero[gi]);
      for (int64_t j = g0; j < g0 + G; ++j) {
        const uint32_t word = static_cast<uint32_t>(cr[j / kPerWord]);
        const uint32_t c = (word >> (BITS * (j % kPerWord))) & kMask;
        orow[j] = from_float<O>(static_cast<float>(c) * sc + mn);
      }
    }
  }
}

template <typename T>
void quantize_bits(const QuantShape& s, const void* x, int32_t* codes, void* scale, void* zero,
                   int num_threads) {
  const T* xt = static_cast<const T*>(x);
  T* st = static_cast<T*>(scale);
  T* zt = static_cast<T*>(zero);
  switch (s.bits) {
    case 2: return quantize_impl<T, 2>(s, xt, codes, st, zt, num_threads);
    case 4: return quantize_impl<T, 4>(s, xt, codes, st, zt, num_threads);
    case 8: return quantize_impl<T, 8>(s, xt, codes, st, zt, num_threads);
  }
}

template <typename P, typename O>
void dequantize_bits(const QuantShape& s, const int32_t* codes, const void* scale,
                     const void* zero, void* out, int num_threads) {
  const P* st = static_cast<const P*>(scale);
  const P* zt = static_cast<const P*>(zero);
  O* ot = static_cast<O*>(out);
  switch (s.bits) {
    case 2: return dequantize_impl<P, O, 2>(s, codes, st, zt, ot, num_threads);
    case 4: return dequantize_impl<P, O, 4>(s, codes, st, zt, ot, num_threads);
    case 8: return dequantize_impl<P, O, 8>(s, codes, st, zt, ot, num_threads);
  }
}

template <typename P>
void dequantize_out(const QuantShape& s, const int32_t* codes, const void* scale,
                    const void* zero, DType out_dtype, void* out, int num_threads) {
  switch (out_dtype) {
    case DType::Float32: return dequantize_bits<P, float>(s, codes, scale, zero, out, num_threads);
    case DType::Float16: return dequantize_bits<P, Half>(s, codes, scale, zero, out, num_threads);
    case DType::BFloat16:
      return dequantize_bits<P, BFloat16>(s, codes, scale, zero, out, num_threads);
  }
}

}  // namespace

void quantize(const QuantShape& s, DType dtype, const void* x, int32_t* codes, void* scale,
              void* zero, int num_threads) {
  switch (dtype) {
    case DType::Float32: return quantize_bits<float>(s, x, codes, scale, zero, num_threads);
    case DType::Float16: return quantize_bits<Half>(s, x, codes, scale, zero, num_threads);
    case DType::BFloat16: return quantize_bits<BFloat16>(s, x, codes, scale, zero, num_threads);
  }
}

void dequantize(const QuantShape& s, const int32_t* codes, DType param_dtype, const void* scale,
                const void* zero, DType out_dtype, void* out, int num_threads) {
  switch (param_dtype) {
    case DType::Float32:
      return dequantize_out<float>(s, codes, scale, zero, out_dtype, out, num_threads);
    case DType::Float16:
      return dequantize_out<Half>(s, codes, scale, zero, out_dtype, out, num_threads);
    case DType::BFloat16:
      return dequantize_out<BFloat16>(s, codes, scale, zero, out_dtype, out, num_threads);
  }
}

}  // namespace cpu
}  // namespace effx
