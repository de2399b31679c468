// effx family: group-wise asymmetric quantization, multithreaded CPU kernels (layout in
// include/effx/quant.h). Work is split into units of lcm(group_size, codes per word) values
// so that every unit owns whole groups and whole output words: threads never share a word.
#include "effx/quant.h"

#include "quant_span.h"

#include <algorithm>
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

template <typename T, int BITS>
void quantize_impl(const QuantShape& s, const T* x, int32_t* codes, T* scale, T* zero,
                   int num_threads) {
  constexpr int kPerWord = 32 / BITS;
  const Units units = make_units(s);
  const int64_t words_per_row = quant_words_per_row(s.cols, BITS);
  const int64_t groups_per_row = s.cols / s.group_size;

#pragma omp parallel num_threads(threads_for(s, num_threads))
  {
    std::vector<float> values(units.size);
    std::vector<uint32_t> q(units.size + kPerWord);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units.total; ++u) {
      const int64_t row = u / units.per_row;
      const int64_t begin = (u % units.per_row) * units.size;
      const int64_t end = std::min(begin + units.size, s.cols);
      const int64_t g = row * groups_per_row + begin / s.group_size;
      quantize_span<T, BITS>(x + row * s.x_row_stride + begin, end - begin, s.group_size,
                             codes + row * words_per_row + begin / kPerWord, scale + g, zero + g,
                             values.data(), q.data());
    }
  }
}

template <typename P, typename O, int BITS>
void dequantize_impl(const QuantShape& s, const int32_t* codes, const P* scale, const P* zero,
                     O* out, int num_threads) {
  constexpr int kPerWord = 32 / BITS;
  const Units units = make_units(s);
  const int64_t words_per_row = quant_words_per_row(s.cols, BITS);
  const int64_t groups_per_row = s.cols / s.group_size;

#pragma omp parallel for schedule(static) num_threads(threads_for(s, num_threads))
  for (int64_t u = 0; u < units.total; ++u) {
    const int64_t row = u / units.per_row;
    const int64_t begin = (u % units.per_row) * units.size;
    const int64_t end = std::min(begin + units.size, s.cols);
    const int64_t g = row * groups_per_row + begin / s.group_size;
    dequantize_span<P, O, BITS>(codes + row * words_per_row + begin / kPerWord, end - begin,
                                s.group_size, scale + g, zero + g, out + row * s.cols + begin);
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
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
}

}  // namespace

void quantize(const QuantShape& s, DType dtype, const void* x, int32_t* codes, void* scale,
              void* zero, int num_threads) {
  switch (dtype) {
    case DType::Float32: return quantize_bits<float>(s, x, codes, scale, zero, num_threads);
    case DType::Float16: return quantize_bits<Half>(s, x, codes, scale, zero, num_threads);
    case DType::BFloat16: return quantize_bits<BFloat16>(s, x, codes, scale, zero, num_threads);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
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
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
}

}  // namespace cpu
}  // namespace effx
