// effx: std::vector storage that starts on a cache line. glibc hands out large blocks 16 bytes
// past a page boundary, so every 64-byte vector load of a buffer aligned to its rows would
// straddle two cache lines (twice the L1 accesses in the attention engine's inner loops).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace effx {
namespace cpu {

template <typename T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
};

template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

}  // namespace cpu
}  // namespace effx
