// effx: fused attention over a plain (dense) KV cache plus the step's new tokens, CPU.
#include "attention_engine.h"

namespace effx {
namespace cpu {
namespace {

// Cached tokens per engine block: 128 rather than 64 halves the per-block softmax and
// rescaling work of many-row units (a 64-token tree over 16k tokens: 84 -> 76 ms here), and
// the block's transposed K panel (128 x D fp32) still sits in L2 beside the queries.
constexpr int64_t kDenseBlock = 128;

template <typename T>
struct DenseCached {
  using Storage = T;
  const DenseKV& kv;
  int64_t D;
  int64_t block() const { return kDenseBlock; }
  // Plain rows: the engine reads whole cached blocks in place.
  const T* key_rows(int64_t b, int64_t h) const { return static_cast<const T*>(kv.k) + b * kv.sb + h * kv.sh; }
  const T* value_rows(int64_t b, int64_t h) const { return static_cast<const T*>(kv.v) + b * kv.sb + h * kv.sh; }
  int64_t row_stride() const { return kv.st; }
  // Blocks that hold some of the step's new tokens too are staged through these.
  void keys_t(int64_t b, int64_t h, int64_t t0, int64_t t1, float* kt, int64_t ld) const {
    const T* k = static_cast<const T*>(kv.k) + b * kv.sb + h * kv.sh;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t d = 0; d < D; ++d) kt[d * ld + (t - t0)] = to_float(k[t * kv.st + d]);
    }
  }
  void values(int64_t b, int64_t h, int64_t t0, int64_t t1, float* v) const {
    const T* vv = static_cast<const T*>(kv.v) + b * kv.sb + h * kv.sh;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t d = 0; d < D; ++d) v[(t - t0) * D + d] = to_float(vv[t * kv.st + d]);
    }
  }
};

template <typename T>
void dense_typed(const AttentionArgs& a, const DenseKV& kv, int num_threads) {
  run_attention_on_this_cpu(a, DenseCached<T>{kv, a.head_dim}, num_threads);
}

}  // namespace

void dense_attention(const AttentionArgs& a, const DenseKV& kv, DType dtype, int num_threads) {
  switch (dtype) {
    case DType::Float32: return dense_typed<float>(a, kv, num_threads);
    case DType::Float16: return dense_typed<Half>(a, kv, num_threads);
    case DType::BFloat16: return dense_typed<BFloat16>(a, kv, num_threads);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
}

}  // namespace cpu
}  // namespace effx
