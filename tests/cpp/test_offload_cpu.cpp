// effx C++ tests: the offload runtime without torch (host pool budget, disk blobs with
// checksums, placement, block schedule, layer streaming with prefetch order on a CPU).
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "effx/offload.h"

using namespace effx::offload;

namespace {

std::string make_dir() {
  char tmpl[] = "/tmp/effx_offload_test_XXXXXX";
  EFFX_EXPECT(mkdtemp(tmpl) != nullptr, "mkdtemp failed");
  return tmpl;
}

std::vector<char> random_bytes(size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::vector<char> v(n);
  for (auto& c : v) c = static_cast<char>(g());
  return v;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const StoreError& e) {
    return e.what();
  }
  return "";
}

void test_crc32c() {
  // RFC 3720 B.4 test vector: 32 bytes of zero.
  std::vector<char> zeros(32, 0);
  EFFX_EXPECT(crc32c(zeros.data(), 32) == 0x8A9136AAu, "crc of zeros %08x", crc32c(zeros.data(), 32));
  const char* s = "123456789";
  EFFX_EXPECT(crc32c(s, 9) == 0xE3069283u, "crc of 123456789 %08x", crc32c(s, 9));
  // Incremental equals one shot.
  auto v = random_bytes(100003, 1);
  EFFX_EXPECT(crc32c(v.data() + 777, v.size() - 777, crc32c(v.data(), 777)) == crc32c(v.data(), v.size()),
              "incremental crc differs");
}

void test_pool_budget() {
  HostPool pool(1 << 20);
  EFFX_EXPECT(pool.budget() == (1u << 20), "budget %zu", pool.budget());
  std::vector<void*> blocks;
  while (void* p = pool.try_allocate(100000)) {
    EFFX_EXPECT(reinterpret_cast<uintptr_t>(p) % HostPool::kAlign == 0, "block not aligned");
    blocks.push_back(p);
  }
  EFFX_EXPECT(blocks.size() == (1u << 20) / HostPool::rounded(100000), "got %zu blocks", blocks.size());
  EFFX_EXPECT(pool.used() <= pool.budget(), "used %zu > budget", pool.used());
  // Freeing two neighbours coalesces them into room for a block twice as large.
  pool.release(blocks[1]);
  pool.release(blocks[2]);
  void* big = pool.try_allocate(200000);
  EFFX_EXPECT(big == blocks[1], "coalesced block not reused");
  pool.release(big);
  for (size_t i = 0; i < blocks.size(); ++i)
    if (i != 1 && i != 2) pool.release(blocks[i]);
  EFFX_EXPECT(pool.used() == 0, "used %zu after releasing all", pool.used());
  EFFX_EXPECT(pool.try_allocate(2 << 20) == nullptr, "allocation past the budget succeeded");

  // Concurrent blocking allocations never exceed the budget.
  std::vector<std::thread> threads;
  std::atomic<size_t> over{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        void* p = pool.allocate(300000 + 4096 * t);
        if (pool.used() > pool.budget()) ++over;
        pool.release(p);
      }
    });
  for (auto& th : threads) th.join();
  EFFX_EXPECT(over == 0 && pool.peak() <= pool.budget(), "budget exceeded: peak %zu", pool.peak());
}

void test_disk_round_trip_and_errors() {
  const std::string dir = make_dir();
  DiskStore store(dir, 3);
  // Sizes around the chunk and alignment boundaries, aligned and unaligned destinations.
  for (size_t n : {size_t{0}, size_t{1}, size_t{4095}, size_t{4096}, DiskStore::kChunk + 12345, 3 * DiskStore::kChunk}) {
    auto data = random_bytes(n, static_cast<unsigned>(n));
    store.write("blob", data.data(), n, "meta" + std::to_string(n));
    HostPool pool(HostPool::rounded(n) + 8192);
    char* aligned = static_cast<char*>(pool.try_allocate(HostPool::rounded(n)));
    BlobInfo info = store.read("blob", aligned, HostPool::rounded(n));
    EFFX_EXPECT(info.nbytes == n && info.meta == "meta" + std::to_string(n), "info of %zu", n);
    EFFX_EXPECT(n == 0 || std::memcmp(aligned, data.data(), n) == 0, "aligned round trip of %zu differs", n);
    std::vector<char> unaligned(n + 1);
    store.read("blob", unaligned.data() + 1, n);
    EFFX_EXPECT(n == 0 || std::memcmp(unaligned.data() + 1, data.data(), n) == 0, "unaligned round trip of %zu", n);
  }
  auto data = random_bytes(2 * DiskStore::kChunk, 7);
  store.write("good", data.data(), data.size());
  store.write("victim", data.data(), data.size());
  std::vector<char> out(data.size());
  const std::string path = store.path_of("victim");

  // Corrupt one payload byte in the second chunk.
  {
    int fd = ::open(path.c_str(), O_RDWR);
    char c;
    const off_t at = 4096 + static_cast<off_t>(DiskStore::kChunk) + 5;
    EFFX_EXPECT(::pread(fd, &c, 1, at) == 1, "pread");
    c ^= 0x10;
    EFFX_EXPECT(::pwrite(fd, &c, 1, at) == 1, "pwrite");
    ::close(fd);
  }
  std::string err = error_of([&] { store.read("victim", out.data(), out.size()); });
  EFFX_EXPECT(err.find("'victim' is corrupted") != std::string::npos && err.find("checksum") != std::string::npos,
              "corruption message: %s", err.c_str());
  // Truncate it.
  EFFX_EXPECT(::truncate(path.c_str(), 4096 + 1000) == 0, "truncate");
  err = error_of([&] { store.read("victim", out.data(), out.size()); });
  EFFX_EXPECT(err.find("'victim' is truncated") != std::string::npos, "truncation message: %s", err.c_str());
  // Remove it.
  store.remove("victim");
  err = error_of([&] { store.read("victim", out.data(), out.size()); });
  EFFX_EXPECT(err.find("'victim' is missing") != std::string::npos, "missing message: %s", err.c_str());
  // Nothing else was lost.
  store.read("good", out.data(), out.size());
  EFFX_EXPECT(std::memcmp(out.data(), data.data(), data.size()) == 0, "other blob damaged");

  // A write that the filesystem refuses (file size limit, as on a full disk) is a StoreError
  // naming the blob, leaves no partial file and keeps the earlier blobs.
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit old;
  getrlimit(RLIMIT_FSIZE, &old);
  rlimit small = old;
  small.rlim_cur = 1 << 20;
  setrlimit(RLIMIT_FSIZE, &small);
  err = error_of([&] { store.write("too_big", data.data(), data.size()); });
  setrlimit(RLIMIT_FSIZE, &old);
  EFFX_EXPECT(err.find("cannot write blob 'too_big'") != std::string::npos, "write failure message: %s", err.c_str());
  EFFX_EXPECT(!store.contains("too_big"), "partial blob left behind");
  store.read("good", out.data(), out.size());
  EFFX_EXPECT(std::memcmp(out.data(), data.data(), data.size()) == 0, "blob damaged by failed write");
}

void test_placement_and_schedule() {
  // Sizes 10, 30, 60: midpoints at 5%, 25%, 70%.
  auto t = place_by_size({10, 30, 60}, 20, 30);
  EFFX_EXPECT(t[0] == Tier::Device && t[1] == Tier::Host && t[2] == Tier::Disk, "placement 20/30/50");
  t = place_by_size({10, 30, 60}, 0, 100);
  EFFX_EXPECT(t[0] == Tier::Host && t[1] == Tier::Host && t[2] == Tier::Host, "all host");
  bool threw = false;
  try {
    place_by_size({1}, 60, 50);
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("at most 100") != std::string::npos;
  }
  EFFX_EXPECT(threw, "percentages over 100 not rejected");

  const int L = 3, B = 2;
  auto steps = block_schedule(L, B);
  EFFX_EXPECT(steps.size() == L * B, "steps %zu", steps.size());
  std::vector<int> weight_loads(L, 0);
  for (size_t s = 0; s < steps.size(); ++s) {
    EFFX_EXPECT(steps[s].layer == static_cast<int>(s) / B && steps[s].batch == static_cast<int>(s) % B, "order");
    if (steps[s].load_weight_layer >= 0) {
      ++weight_loads[steps[s].load_weight_layer];
      EFFX_EXPECT(steps[s].batch == 0 && steps[s].load_weight_layer == (steps[s].layer + 1) % L, "weight prefetch");
    }
    const auto& next = steps[(s + 1) % steps.size()];
    EFFX_EXPECT(steps[s].load_cache_layer == next.layer && steps[s].load_cache_batch == next.batch, "cache prefetch");
    const auto& prev = steps[(s + steps.size() - 1) % steps.size()];
    EFFX_EXPECT(steps[s].store_cache_layer == prev.layer && steps[s].store_cache_batch == prev.batch, "cache store");
  }
  for (int j = 0; j < L; ++j) EFFX_EXPECT(weight_loads[j] == 1, "layer %d weights loaded %d times", j, weight_loads[j]);
}

void test_streamer_prefetch_order() {
  const std::string dir = make_dir();
  DiskStore store(dir, 2);
  const int L = 4;
  const size_t n = 1 << 20;
  HostPool pool(L * HostPool::rounded(n) + 2 * HostPool::rounded(n));  // host tier + two staging blocks
  std::vector<std::vector<char>> host(L), disk(L);
  {
    LayerStreamer s(pool, &store, -1);
    for (int j = 0; j < L; ++j) {
      host[j] = random_bytes(n, 100 + j);
      disk[j] = random_bytes(n, 200 + j);
      s.put(j, "w_host", host[j].data(), n, Tier::Host);
      s.put(j, "w_disk", disk[j].data(), n, Tier::Disk);
    }
    s.fetch(0, {}, 0);
    void* held = nullptr;
    for (int j = 0; j < L; ++j) {
      void* block = s.wait(j, 0);
      if (j + 1 < L) s.fetch(j + 1, {}, 0);
      pool.release(held);  // the caller drops layer j-1 once j is in hand
      held = block;
      s.log().record("compute_begin", j);
      // Layer j "computes" until the prefetch of j+1 has finished: only possible if it overlaps.
      if (j + 1 < L) EFFX_EXPECT(s.log().wait_for("load_end", j + 1, 60.0), "prefetch of %d did not overlap", j + 1);
      EFFX_EXPECT(std::memcmp(block, disk[j].data(), n) == 0, "disk tensor of layer %d", j);
      EFFX_EXPECT(std::memcmp(s.host_pointer(j, "w_host"), host[j].data(), n) == 0, "host tensor of layer %d", j);
      s.log().record("compute_end", j);
      EFFX_EXPECT(pool.used() <= pool.budget(), "budget exceeded");
    }
    pool.release(held);
    auto ev = s.log().events();
    auto seq = [&](const char* kind, int layer) {
      for (const auto& e : ev)
        if (e.kind == kind && e.layer == layer) return static_cast<long>(e.seq);
      return -1L;
    };
    for (int j = 0; j + 1 < L; ++j)
      EFFX_EXPECT(seq("compute_begin", j) < seq("load_end", j + 1) && seq("load_end", j + 1) < seq("compute_end", j),
                  "load of %d not inside compute of %d", j + 1, j);
  }
  EFFX_EXPECT(pool.used() == 0 && pool.peak() <= pool.budget(), "pool not returned: %zu", pool.used());
}

}  // namespace

int main() {
  test_crc32c();
  test_pool_budget();
  test_disk_round_trip_and_errors();
  test_placement_and_schedule();
  test_streamer_prefetch_order();
  std::printf("offload_cpu: all checks passed\n");
  return 0;
}
