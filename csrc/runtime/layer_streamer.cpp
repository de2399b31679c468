// effx family: offload runtime. The layer streamer: weights of every layer on the host and
// disk tiers, fetched one layer ahead on a worker thread (SPECS.md section 7).
#include <chrono>
#include <cstring>

#include "effx/offload.h"
#ifdef EFFX_WITH_CUDA
#include "device_copy.h"
#endif

namespace effx::offload {

struct LayerStreamer::Fetch {
  std::future<void> done;
  std::atomic<bool> cancel{false};
  std::atomic<bool> blocked{false};  // waiting in the pool for its staging block
  size_t staging = 0;
  void* block = nullptr;        // CPU: the filled staging block, handed to the caller
  void* ready_event = nullptr;  // CUDA: the compute stream's work before the fetch
  void* done_event = nullptr;   // CUDA: all copies of the fetch
};

namespace {
std::string blob_name(int layer, const std::string& name) { return "layer" + std::to_string(layer) + "." + name; }
}  // namespace

LayerStreamer::LayerStreamer(HostPool& pool, DiskStore* disk, int cuda_device)
    : pool_(pool), disk_(disk), cuda_device_(cuda_device) {
  if (cuda_device >= 0) {
#ifdef EFFX_WITH_CUDA
    copy_stream_ = device::stream_create(cuda_device);
#else
    throw std::invalid_argument("effx.offload: this build of effx has no CUDA support, so it cannot stream to cuda:" +
                                std::to_string(cuda_device));
#endif
  }
}

LayerStreamer::~LayerStreamer() {
  closing_ = true;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [layer, f] : fetches_) f->cancel = true;
  pool_.cancel_waits();
  for (auto& [layer, f] : fetches_) {
    if (f->done.valid()) f->done.wait();
    pool_.release(f->block);
#ifdef EFFX_WITH_CUDA
    if (f->ready_event) device::event_destroy(f->ready_event);
    if (f->done_event) device::event_destroy(f->done_event);
#endif
  }
  for (auto& layer : layers_)
    for (auto& e : layer) pool_.release(e.host);
#ifdef EFFX_WITH_CUDA
  if (copy_stream_) device::stream_destroy(copy_stream_);
#endif
}

void* LayerStreamer::put(int layer, const std::string& name, const void* data, size_t nbytes, Tier tier) {
  if (layer < 0) throw std::invalid_argument("effx.offload: layer must be >= 0, got " + std::to_string(layer));
  std::lock_guard<std::mutex> lock(mu_);
  if (static_cast<size_t>(layer) >= layers_.size()) {
    layers_.resize(layer + 1);
    views_.resize(layer + 1);
  }
  Entry e{StreamedTensor{name, nbytes, tier, 0}, nullptr};
  if (tier == Tier::Host) {
    e.host = pool_.try_allocate(nbytes);
    if (!e.host)
      throw std::runtime_error("effx.offload: host budget exhausted placing '" + name + "' of layer " +
                               std::to_string(layer) + " (" + std::to_string(nbytes) + " bytes; " +
                               std::to_string(pool_.used()) + " of " + std::to_string(pool_.budget()) +
                               " bytes in use)");
    std::memcpy(e.host, data, nbytes);
  } else if (tier == Tier::Disk) {
    if (!disk_) throw std::invalid_argument("effx.offload: a disk-tier tensor needs a DiskStore");
    disk_->write(blob_name(layer, name), data, nbytes);
    size_t offset = 0;
    for (const auto& other : layers_[layer])
      if (other.t.tier == Tier::Disk) offset += HostPool::rounded(other.t.nbytes);
    e.t.staging_offset = offset;
  } else {
    throw std::invalid_argument("effx.offload: device-tier tensors stay with the caller, not the streamer");
  }
  layers_[layer].push_back(e);
  views_[layer].push_back(e.t);
  return e.host;
}

const std::vector<StreamedTensor>& LayerStreamer::tensors(int layer) const {
  if (layer < 0 || layer >= num_layers())
    throw std::out_of_range("effx.offload: layer must be in [0, " + std::to_string(num_layers()) + "), got " +
                            std::to_string(layer));
  return views_[layer];
}

const void* LayerStreamer::host_pointer(int layer, const std::string& name) const {
  for (const auto& e : layers_.at(layer))
    if (e.t.name == name) return e.host;
  return nullptr;
}

size_t LayerStreamer::staging_bytes(int layer) const {
  size_t n = 0;
  for (const auto& t : tensors(layer))
    if (t.tier == Tier::Disk) n += HostPool::rounded(t.nbytes);
  return n;
}

bool LayerStreamer::pending(int layer) const {
  std::lock_guard<std::mutex> lock(mu_);
  return fetches_.count(layer) != 0;
}

void LayerStreamer::fetch(int layer, const std::vector<void*>& dsts, uintptr_t compute_stream) {
  const auto& ts = tensors(layer);
  if (cuda_device_ >= 0 && dsts.size() != ts.size())
    throw std::invalid_argument("effx.offload: layer " + std::to_string(layer) + " has " + std::to_string(ts.size()) +
                                " streamed tensors, got " + std::to_string(dsts.size()) + " destinations");
  std::lock_guard<std::mutex> lock(mu_);
  if (fetches_.count(layer)) return;  // already on its way
  auto f = std::make_unique<Fetch>();
  f->staging = staging_bytes(layer);
#ifdef EFFX_WITH_CUDA
  if (cuda_device_ >= 0) {
    device::set_device(cuda_device_);
    f->ready_event = device::event_create();
    f->done_event = device::event_create();
    // Destinations were just allocated on the compute stream and may reuse memory that queued
    // kernels still read: the copies start after them.
    device::event_record(f->ready_event, reinterpret_cast<void*>(compute_stream));
  }
#else
  (void)compute_stream;
#endif
  Fetch* raw = f.get();
  f->done = worker_.submit([this, layer, dsts, raw] { run_fetch(layer, dsts, raw); });
  fetches_[layer] = std::move(f);
}

void LayerStreamer::run_fetch(int layer, std::vector<void*> dsts, Fetch* f) {
  log_.record("load_begin", layer);
  const auto& ts = views_[layer];
  void* staging = nullptr;
  try {
    if (f->staging) {
      f->blocked = true;
      staging = pool_.allocate(f->staging, &f->cancel);
      f->blocked = false;
      if (!staging) throw std::runtime_error("effx.offload: fetch of layer " + std::to_string(layer) + " was cancelled");
    }
    char* stage = static_cast<char*>(staging);
    // All disk tensors of the layer are read at once: most are smaller than one chunk, and
    // only concurrent requests keep the device's queue full. std::async futures join when
    // destroyed, so no read still writes into the staging block when an error releases it.
    std::vector<std::future<void>> reads(ts.size());
    for (size_t i = 0; i < ts.size(); ++i)
      if (ts[i].tier == Tier::Disk)
        reads[i] = disk_->read_async(blob_name(layer, ts[i].name), stage + ts[i].staging_offset,
                                     HostPool::rounded(ts[i].nbytes));
    auto finish_reads = [&] {
      std::exception_ptr first;
      for (auto& r : reads) {
        if (!r.valid()) continue;
        try {
          r.get();
        } catch (...) {
          if (!first) first = std::current_exception();
        }
      }
      if (first) std::rethrow_exception(first);
    };
    if (cuda_device_ < 0) {
      finish_reads();
      f->block = staging;
    } else {
#ifdef EFFX_WITH_CUDA
      device::set_device(cuda_device_);
      device::stream_wait_event(copy_stream_, f->ready_event);
      // Host tensors first: their copies run while the disk reads below proceed.
      for (size_t i = 0; i < ts.size(); ++i)
        if (ts[i].tier == Tier::Host)
          device::copy_to_device_async(dsts[i], layers_[layer][i].host, ts[i].nbytes, copy_stream_);
      for (size_t i = 0; i < ts.size(); ++i) {
        if (ts[i].tier != Tier::Disk) continue;
        reads[i].get();
        device::copy_to_device_async(dsts[i], stage + ts[i].staging_offset, ts[i].nbytes, copy_stream_);
      }
      device::event_record(f->done_event, copy_stream_);
      if (staging) {
        device::event_synchronize(f->done_event);  // the staging block is read by the copies
        pool_.release(staging);
        staging = nullptr;
      }
#else
      (void)dsts;  // unreachable: the constructor rejects a device without CUDA
#endif
    }
  } catch (...) {
    f->blocked = false;
    if (staging) pool_.release(staging);
    f->block = nullptr;
    log_.record("load_failed", layer);
    throw;
  }
  log_.record("load_end", layer);
}

void* LayerStreamer::wait(int layer, uintptr_t compute_stream) {
  Fetch* f;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = fetches_.find(layer);
    if (it == fetches_.end())
      throw std::logic_error("effx.offload: no fetch of layer " + std::to_string(layer) + " was started");
    f = it->second.get();
  }
  // On a CPU compute device only the caller frees pool blocks (by dropping earlier layers), and
  // it is blocked here: a fetch stuck in the pool would wait forever, so it fails instead.
  while (f->done.wait_for(std::chrono::milliseconds(20)) != std::future_status::ready) {
    if (cuda_device_ < 0 && f->blocked && !pool_.fits(f->staging)) {
      f->cancel = true;
      pool_.cancel_waits();
      f->done.wait();
      break;
    }
  }
  std::unique_ptr<Fetch> owned;
  {
    std::lock_guard<std::mutex> lock(mu_);
    owned = std::move(fetches_[layer]);
    fetches_.erase(layer);
  }
  if (owned->cancel && !closing_) {
    try {
      owned->done.get();
    } catch (...) {
    }
    throw std::runtime_error("effx.offload: host budget exhausted: layer " + std::to_string(layer) + " needs " +
                             std::to_string(owned->staging) + " bytes of staging but " + std::to_string(pool_.used()) +
                             " of " + std::to_string(pool_.budget()) +
                             " bytes are held (tensors of earlier layers still referenced?); release them or "
                             "raise the host budget");
  }
  void* block = nullptr;
  try {
    owned->done.get();
    block = owned->block;
#ifdef EFFX_WITH_CUDA
    if (cuda_device_ >= 0) device::stream_wait_event(reinterpret_cast<void*>(compute_stream), owned->done_event);
#else
    (void)compute_stream;
#endif
  } catch (...) {
#ifdef EFFX_WITH_CUDA
    if (owned->ready_event) device::event_destroy(owned->ready_event);
    if (owned->done_event) device::event_destroy(owned->done_event);
#endif
    throw;
  }
#ifdef EFFX_WITH_CUDA
  // Destroying an event still pending on a stream is allowed; CUDA releases it when it completes.
  if (owned->ready_event) device::event_destroy(owned->ready_event);
  if (owned->done_event) device::event_destroy(owned->done_event);
#endif
  return block;
}

}  // namespace effx::offload
