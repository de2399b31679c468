// effx: buffers a thread keeps from call to call. A kernel's buffers of megabytes (packed
// weights, row tiles, fp32 accumulators) would otherwise come from fresh pages on every call
// (glibc maps and trims allocations this large), and at a few rows their page faults cost more
// than the products themselves.
#pragma once

#include <cstddef>

#include "line_aligned.h"

namespace effx {
namespace cpu {

// This thread's buffer named by Tag (a distinct tag per buffer live at the same time; a type
// declared in place, as in scratch<float, struct MonarchOut1>(n)): scratch_vector is the buffer
// itself, for code that sizes it; scratch gives at least n elements of it. Contents are
// unspecified: what the last call on this thread left there. The buffer starts on a cache line,
// as AMX tile loads need to run at their rate (bf16_gemm.h).
template <typename T, typename Tag>
LineVector<T>& scratch_vector() {
  thread_local LineVector<T> buffer;
  return buffer;
}

template <typename T, typename Tag>
T* scratch(std::size_t n) {
  LineVector<T>& buffer = scratch_vector<T, Tag>();
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace cpu
}  // namespace effx
