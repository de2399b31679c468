// effx family: group-wise asymmetric quantization (SPECS.md section 1), torch-free API.
//
// Layout: a 2-D view of `rows` rows of `cols` values; the last dim is split into groups of
// `group_size` consecutive values. Codes of `bits` bits are packed LSB-first into int32
// words along the row: value j of a row lives in word j / (32 / bits) at bit offset
// bits * (j % (32 / bits)); every row starts on a word boundary (the last word of a row is
// zero-padded). Per group: scale = (max - min) / (2^bits - 1) and zero = min, both stored in
// the dtype of x (dequantize accepts any parameter dtype). The scale is rounded UP to that
// dtype and the codes are computed against the scale as stored, so no value is clamped and
// every value is within half a step of its dequantized value. A constant group
// (or one whose scale is not a normal fp32 number) stores scale 0 and codes 0, so it
// dequantizes exactly to q * 0 + min and never produces NaN. Domain: finite values whose
// group range max - min is finite in fp32 (always so for fp16/bf16, and for |x| < 1.7e38).
#pragma once

#include <cstdint>

#include "effx/dtype.h"

namespace effx {

inline bool quant_bits_supported(int bits) { return bits == 2 || bits == 4 || bits == 8; }
inline int64_t quant_codes_per_word(int bits) { return 32 / bits; }
inline int64_t quant_words_per_row(int64_t cols, int bits) {
  const int64_t per_word = quant_codes_per_word(bits);
  return (cols + per_word - 1) / per_word;
}

struct QuantShape {
  int64_t rows;           // number of independent rows
  int64_t cols;           // values per row, a multiple of group_size
  int64_t x_row_stride;   // elements between rows of x (the last dim is contiguous)
  int bits;               // 2, 4 or 8
  int group_size;         // values per group
};

namespace cpu {

// x: rows x cols values of dtype. codes: rows x words_per_row int32. scale, zero:
// rows x (cols / group_size) values of dtype (all outputs contiguous).
void quantize(const QuantShape& s, DType dtype, const void* x, int32_t* codes, void* scale,
              void* zero, int num_threads);

// out[r, j] = code * scale + zero in out_dtype (contiguous rows x cols).
void dequantize(const QuantShape& s, const int32_t* codes, DType param_dtype, const void* scale,
                const void* zero, DType out_dtype, void* out, int num_threads);

}  // namespace cpu
}  // namespace effx
