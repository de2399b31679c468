// effx family: FlexGen-style offload runtime (SPECS.md section 7), torch-free API.
//
// Memory is raw bytes: a tensor crosses this API as (pointer, byte count); dtype and shape are
// the caller's business (stored as opaque metadata next to a disk blob). Three tiers hold a
// tensor: the compute device (owned by the caller), the host (blocks of a HostPool with a hard
// byte budget, pinned when CUDA is available) and the disk (a DiskStore blob file). Layers are
// streamed in order; the block schedule runs layers outer and GPU batches inner.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace effx::offload {

// A blob is missing, truncated, corrupted or could not be written; the message names it.
class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// CRC32C (Castagnoli), hardware instruction when the CPU has it, else slicing-by-8 tables.
uint32_t crc32c(const void* data, size_t nbytes, uint32_t crc = 0);

// ---------------------------------------------------------------------------- host pool
// One arena of `budget` bytes reserved up front (pinned with cudaHostAlloc in the CUDA build
// when a device is present, else page-aligned host memory), carved into 4096-aligned blocks.
// Host memory used is therefore exactly the budget, whatever the fragmentation or the number
// of blocks; an allocation that does not fit fails (try_allocate) or waits (allocate).
class HostPool {
 public:
  static constexpr size_t kAlign = 4096;
  explicit HostPool(size_t budget);
  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  void* try_allocate(size_t nbytes);
  bool fits(size_t nbytes) const;  // a free range of that size exists now
  // Waits until the block fits; returns nullptr when `cancelled` becomes true (checked on
  // every release and on cancel_waits()).
  void* allocate(size_t nbytes, const std::atomic<bool>* cancelled = nullptr);
  void release(void* p);
  void cancel_waits();

  size_t budget() const { return budget_; }
  size_t used() const;   // bytes in live blocks (each rounded up to kAlign)
  size_t peak() const;   // highest `used` seen
  size_t waiting() const;  // allocations currently blocked
  bool pinned() const { return pinned_; }
  static size_t rounded(size_t nbytes) { return (nbytes + kAlign - 1) / kAlign * kAlign; }

 private:
  void* carve_locked(size_t nbytes);
  char* base_ = nullptr;
  size_t budget_ = 0;
  bool pinned_ = false;
  mutable std::mutex mu_;
  std::condition_variable freed_;
  std::map<size_t, size_t> free_;  // offset -> length, coalesced
  std::map<size_t, size_t> live_;  // offset -> length
  size_t used_ = 0, peak_ = 0, waiting_ = 0;
};

// ---------------------------------------------------------------------------- I/O threads
// A fixed pool of threads running jobs in FIFO order; submit returns a future.
class IoThreads {
 public:
  explicit IoThreads(int threads);
  ~IoThreads();
  std::future<void> submit(std::function<void()> job);
  int size() const { return static_cast<int>(workers_.size()); }

 private:
  std::vector<std::thread> workers_;
  std::deque<std::packaged_task<void()>> jobs_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

// ---------------------------------------------------------------------------- disk tier
// One file per blob, `<directory>/<name>.blob`: a header padded to 4096 bytes (magic,
// version, payload bytes, chunk size, metadata, one CRC32C per chunk of the payload, a CRC of
// the header itself), then the payload padded to 4096 bytes so O_DIRECT can read it whole.
// Writes go to a temporary file renamed into place, so a failed write loses nothing else.
// Reads are split into chunks read in parallel on the I/O threads, each checked against its
// CRC; O_DIRECT is used for aligned destinations and falls back to buffered I/O where the
// filesystem refuses it.
struct BlobInfo {
  size_t nbytes = 0;
  std::string meta;
};

class DiskStore {
 public:
  static constexpr size_t kChunk = size_t{8} << 20;
  DiskStore(std::string directory, int io_threads = 4, bool direct = true);

  const std::string& directory() const { return dir_; }
  std::string path_of(const std::string& name) const;
  bool direct() const { return direct_; }
  IoThreads& io() { return io_; }

  void write(const std::string& name, const void* data, size_t nbytes, const std::string& meta = "");
  BlobInfo info(const std::string& name) const;
  // Reads the payload into dst (capacity >= nbytes); verifies every chunk.
  BlobInfo read(const std::string& name, void* dst, size_t capacity);
  std::future<void> write_async(const std::string& name, const void* data, size_t nbytes,
                                const std::string& meta = "");
  std::future<void> read_async(const std::string& name, void* dst, size_t capacity);
  void remove(const std::string& name);
  bool contains(const std::string& name) const;
  // Drops the blob's pages from the page cache, so the next read comes from the device.
  void evict_cache(const std::string& name) const;

 private:
  struct Header;
  Header load_header(const std::string& name, int fd, size_t file_size) const;
  std::string dir_;
  bool direct_;
  IoThreads io_;
};

// ---------------------------------------------------------------------------- placement
enum class Tier : int { Device = 0, Host = 1, Disk = 2 };
const char* tier_name(Tier t);

// Percentages of one kind of data (weights, KV cache or activations) on the device and the
// host; the disk holds the rest. Throws std::invalid_argument naming `what` when a value is
// negative, not finite, or the two sum past 100.
void check_percentages(double device, double host, const char* what);

// Whole tensors placed by cumulative size within a layer (FlexGen): tensor i goes to the tier
// whose percentage interval contains the midpoint of its cumulative byte range.
std::vector<Tier> place_by_size(const std::vector<size_t>& nbytes, double device_percent,
                                double host_percent);

// ---------------------------------------------------------------------------- schedule
// One step of the block schedule (layers outer, GPU batches inner): compute (layer, batch)
// while loading the weights of the next layer (at the first batch of a layer), loading the
// cache of the next step and storing the cache of the previous step.
struct ScheduleStep {
  int layer, batch;
  int load_weight_layer;        // -1: none
  int load_cache_layer, load_cache_batch;    // -1: none
  int store_cache_layer, store_cache_batch;  // -1: none
};
std::vector<ScheduleStep> block_schedule(int num_layers, int num_gpu_batches);

// ---------------------------------------------------------------------------- event log
// A totally ordered log of what the runtime (and its caller) did, so tests prove overlap by
// order of events rather than by timing.
struct Event {
  uint64_t seq;
  std::string kind;
  int layer;
};

class EventLog {
 public:
  void record(const std::string& kind, int layer);
  std::vector<Event> events() const;
  // Blocks until an event (kind, layer) is recorded; false when it is not after `seconds`.
  bool wait_for(const std::string& kind, int layer, double seconds) const;
  void clear();

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::vector<Event> events_;
  uint64_t next_ = 0;
};

// ---------------------------------------------------------------------------- layer streamer
// The weights of every layer, spread over host blocks and disk blobs, streamed in layer order.
// On CUDA a fetch of layer j fills caller-provided device destinations: host-tier tensors are
// copied from their pool blocks, disk-tier tensors are read into a staging pool block and
// copied from there. On a CPU compute device host-tier tensors are used in place and a fetch
// reads the disk-tier tensors into one staging block that the caller keeps. On CUDA the copies run on the streamer's own copy
// stream and the caller's compute stream waits on an event, so layer j+1 loads while layer j
// computes.
struct StreamedTensor {
  std::string name;
  size_t nbytes;
  Tier tier;
  size_t staging_offset;  // Disk tier: where it lands in the layer's staging block
};

class LayerStreamer {
 public:
  // cuda_device < 0: CPU compute device (destinations are host memory).
  LayerStreamer(HostPool& pool, DiskStore* disk, int cuda_device);
  ~LayerStreamer();
  LayerStreamer(const LayerStreamer&) = delete;
  LayerStreamer& operator=(const LayerStreamer&) = delete;

  // Adds tensor `name` of layer `layer` to tier Host or Disk (copied now; Device-tier tensors
  // stay with the caller). Returns the host block pointer for Host, nullptr for Disk.
  void* put(int layer, const std::string& name, const void* data, size_t nbytes, Tier tier);
  const std::vector<StreamedTensor>& tensors(int layer) const;
  const void* host_pointer(int layer, const std::string& name) const;
  int num_layers() const { return static_cast<int>(layers_.size()); }
  size_t staging_bytes(int layer) const;  // disk bytes of a layer (a staging block on CUDA)

  // Starts filling dsts[i] (capacity nbytes of tensors(layer)[i]) for layer `layer`.
  // `compute_stream` (a cudaStream_t on CUDA, ignored on CPU) is where the destinations were
  // allocated: the copies wait for the work already queued there.
  void fetch(int layer, const std::vector<void*>& dsts, uintptr_t compute_stream);
  // Waits for the fetch of `layer`; on CUDA makes `compute_stream` wait for its copies and
  // returns nullptr; on CPU returns the staging block holding the layer's disk tensors (at
  // their staging_offset), which the caller now owns and releases to the pool. Rethrows the
  // fetch's error (StoreError for a bad blob).
  void* wait(int layer, uintptr_t compute_stream);
  bool pending(int layer) const;
  EventLog& log() { return log_; }

 private:
  struct Entry {
    StreamedTensor t;
    void* host = nullptr;
  };
  struct Fetch;
  void run_fetch(int layer, std::vector<void*> dsts, Fetch* f);
  HostPool& pool_;
  DiskStore* disk_;
  int cuda_device_;
  std::vector<std::vector<Entry>> layers_;
  std::vector<std::vector<StreamedTensor>> views_;
  std::map<int, std::unique_ptr<Fetch>> fetches_;
  mutable std::mutex mu_;
  std::atomic<bool> closing_{false};
  IoThreads worker_{1};  // orders fetches; the chunk reads fan out on the DiskStore threads
  EventLog log_;
  void* copy_stream_ = nullptr;  // cudaStream_t in the CUDA build
};

}  // namespace effx::offload
