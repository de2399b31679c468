// effx: how the CUDA attention paths cut a token range across blocks (flash-decoding).
#pragma once

namespace effx {
namespace cuda {

struct Splits {
  int count;
  long long tokens;  // per split, a multiple of `align`
};

// `total` tokens for each of `units` (batch row, kv-head, row chunk) blocks: as many splits as
// fill one wave of `slots` resident blocks, none shorter than `min_tokens`.
inline Splits one_wave(long long total, long long units, long long slots, long long min_tokens, long long align) {
  long long count = slots / units;
  const long long most = (total + min_tokens - 1) / min_tokens;
  count = count < most ? count : most;
  count = count < 1 ? 1 : count;
  const long long per = (total + count - 1) / count;
  return Splits{static_cast<int>(count), (per + align - 1) / align * align};
}

}  // namespace cuda
}  // namespace effx
