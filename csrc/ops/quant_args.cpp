// effx family: group-wise quantization, argument checks and allocation (see quant_args.h).
#include "quant_args.h"

#include "checks.h"

namespace effx {
namespace ops {
namespace {

void check_bits_and_group(int64_t bits, int64_t group_size, const char* op) {
  EFFX_CHECK(bits == 2 || bits == 4 || bits == 8, op, "bits must be 2, 4 or 8, got ", bits);
  EFFX_CHECK(group_size >= 1 && group_size <= (int64_t{1} << 30), op,
             "group_size must be a positive int32, got ", group_size);
}

}  // namespace

QuantizeCall prepare_quantize(const at::Tensor& x_in, int64_t bits, int64_t group_size) {
  constexpr const char* op = "quantize";
  check_bits_and_group(bits, group_size, op);
  EFFX_CHECK(x_in.dim() >= 1, op, "x must have at least 1 dim, got a 0-dim tensor");
  EFFX_CHECK(x_in.numel() > 0, op, "x must be non-empty, got shape ", x_in.sizes());
  const DType dtype = float_dtype(x_in, op, "x");
  const int64_t cols = x_in.size(-1);
  EFFX_CHECK(cols % group_size == 0, op, "group_size must divide the last dim of x (", cols,
             "), got ", group_size);

  QuantizeCall call;
  int64_t stride = row_stride(x_in);
  call.x = stride >= 0 ? x_in : x_in.contiguous();
  if (stride < 0) stride = cols;
  call.dtype = dtype;
  call.shape = QuantShape{x_in.numel() / cols, cols, stride, static_cast<int>(bits),
                          static_cast<int>(group_size)};

  auto lead = x_in.sizes().vec();
  lead.back() = quant_words_per_row(cols, static_cast<int>(bits));
  call.codes = at::empty(lead, x_in.options().dtype(at::kInt));
  lead.back() = cols / group_size;
  call.scale = at::empty(lead, x_in.options());
  call.zero = at::empty(lead, x_in.options());
  return call;
}

DequantizeCall prepare_dequantize(const at::Tensor& codes, const at::Tensor& scale,
                                  const at::Tensor& zero, int64_t bits, int64_t group_size,
                                  at::ScalarType dtype) {
  constexpr const char* op = "dequantize";
  check_bits_and_group(bits, group_size, op);
  EFFX_CHECK(codes.scalar_type() == at::kInt, op, "codes must be int32, got ",
             describe(codes.scalar_type()));
  check_same_device(codes, "codes", scale, "scale", op);
  check_same_device(codes, "codes", zero, "zero", op);
  EFFX_CHECK(scale.dim() >= 1 && scale.numel() > 0, op,
             "scale must be a non-empty tensor with at least 1 dim, got shape ", scale.sizes());
  EFFX_CHECK(zero.sizes() == scale.sizes(), op, "zero must have the shape of scale (",
             scale.sizes(), "), got ", zero.sizes());
  EFFX_CHECK(zero.scalar_type() == scale.scalar_type(), op, "zero must have the dtype of scale (",
             describe(scale.scalar_type()), "), got ", describe(zero.scalar_type()));

  DequantizeCall call;
  call.param_dtype = float_dtype(scale, op, "scale");
  call.out_dtype = float_dtype(dtype, op, "dtype");
  const int64_t cols = scale.size(-1) * group_size;
  auto expected = scale.sizes().vec();
  expected.back() = quant_words_per_row(cols, static_cast<int>(bits));
  EFFX_CHECK(codes.sizes() == at::IntArrayRef(expected), op, "codes must have shape ",
             at::IntArrayRef(expected),
             " for scale of shape ", scale.sizes(), " at ", bits, " bits and group_size ",
             group_size, ", got ", codes.sizes());

  call.shape = QuantShape{scale.numel() / scale.size(-1), cols, cols, static_cast<int>(bits),
                          static_cast<int>(group_size)};
  call.codes = codes.contiguous();
  call.scale = scale.contiguous();
  call.zero = zero.contiguous();
  auto out_shape = scale.sizes().vec();
  out_shape.back() = cols;
  call.out = at::empty(out_shape, scale.options().dtype(dtype));
  return call;
}

}  // namespace ops
}  // namespace effx
