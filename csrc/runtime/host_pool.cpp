// effx family: offload runtime. The host pool: one arena of exactly `budget` bytes, carved
// first-fit into 4096-aligned blocks (aligned for O_DIRECT and for fast DMA).
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>

#include "effx/offload.h"
#ifdef EFFX_WITH_CUDA
#include "device_copy.h"
#endif

namespace effx::offload {

HostPool::HostPool(size_t budget) : budget_(rounded(budget)) {
  if (budget == 0) throw std::invalid_argument("effx.offload.HostPool: budget must be > 0 bytes, got 0");
#ifdef EFFX_WITH_CUDA
  base_ = static_cast<char*>(device::pinned_alloc(budget_));
  pinned_ = base_ != nullptr;
#endif
  if (!base_) {
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, budget_) != 0)
      throw std::bad_alloc();
    base_ = static_cast<char*>(p);
  }
  free_[0] = budget_;
}

HostPool::~HostPool() {
#ifdef EFFX_WITH_CUDA
  if (pinned_) {
    device::pinned_free(base_);
    return;
  }
#endif
  std::free(base_);
}

void* HostPool::carve_locked(size_t nbytes) {
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < nbytes) continue;
    const size_t off = it->first, len = it->second;
    free_.erase(it);
    if (len > nbytes) free_[off + nbytes] = len - nbytes;
    live_[off] = nbytes;
    used_ += nbytes;
    if (used_ > peak_) peak_ = used_;
    return base_ + off;
  }
  return nullptr;
}

void* HostPool::try_allocate(size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  return carve_locked(rounded(nbytes == 0 ? 1 : nbytes));
}

bool HostPool::fits(size_t nbytes) const {
  const size_t n = rounded(nbytes == 0 ? 1 : nbytes);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [off, len] : free_)
    if (len >= n) return true;
  return false;
}

void* HostPool::allocate(size_t nbytes, const std::atomic<bool>* cancelled) {
  const size_t n = rounded(nbytes == 0 ? 1 : nbytes);
  if (n > budget_)
    throw std::runtime_error("effx.offload.HostPool: a block of " + std::to_string(n) +
                             " bytes can never fit the budget of " + std::to_string(budget_) + " bytes");
  std::unique_lock<std::mutex> lock(mu_);
  ++waiting_;
  void* p = nullptr;
  freed_.wait(lock, [&] { return (p = carve_locked(n)) != nullptr || (cancelled && cancelled->load()); });
  --waiting_;
  return p;
}

void HostPool::release(void* ptr) {
  if (!ptr) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t off = static_cast<size_t>(static_cast<char*>(ptr) - base_);
    auto it = live_.find(off);
    if (it == live_.end()) throw std::logic_error("effx.offload.HostPool: release of a pointer it did not allocate");
    size_t start = off, len = it->second;
    used_ -= len;
    live_.erase(it);
    // Coalesce with the free neighbours so large blocks stay available.
    auto next = free_.lower_bound(start);
    if (next != free_.end() && start + len == next->first) {
      len += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == start) {
        start = prev->first;
        len += prev->second;
        free_.erase(prev);
      }
    }
    free_[start] = len;
  }
  freed_.notify_all();
}

void HostPool::cancel_waits() {
  { std::lock_guard<std::mutex> lock(mu_); }
  freed_.notify_all();
}

size_t HostPool::used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}
size_t HostPool::peak() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_;
}
size_t HostPool::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return waiting_;
}

}  // namespace effx::offload
