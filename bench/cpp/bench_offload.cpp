// effx C++ benchmark: offload runtime disk tier. Disk-to-host read throughput of a DiskStore
// blob (parallel O_DIRECT chunk reads with a CRC32C check per chunk) against a plain
// sequential read() of the same file into the same buffer, both from a cold page cache.
// Size in MiB from EFFX_BENCH_OFFLOAD_MIB (default 1024), directory from EFFX_BENCH_DIR (/tmp).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "effx/offload.h"

using namespace effx::offload;

namespace {

double seconds_of(const std::function<void()>& f) {
  const auto a = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  const char* mib_env = std::getenv("EFFX_BENCH_OFFLOAD_MIB");
  const size_t nbytes = size_t(mib_env ? std::atoi(mib_env) : 1024) << 20;
  const char* dir_env = std::getenv("EFFX_BENCH_DIR");
  std::string tmpl = std::string(dir_env ? dir_env : "/tmp") + "/effx_bench_offload_XXXXXX";
  if (!mkdtemp(tmpl.data())) {
    std::perror("mkdtemp");
    return 1;
  }
  HostPool pool(nbytes);
  char* buf = static_cast<char*>(pool.try_allocate(nbytes));
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i + 8 <= nbytes; i += 8) {  // xorshift: incompressible, cheap to make
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(buf + i, &x, 8);
  }
  DiskStore store(tmpl, 4);
  store.write("weights", buf, nbytes);
  const std::string path = store.path_of("weights");

  std::vector<double> t_plain, t_store;
  for (int r = 0; r < 3; ++r) {
    store.evict_cache("weights");
    t_plain.push_back(seconds_of([&] {
      const int fd = ::open(path.c_str(), O_RDONLY);
      size_t done = 0;
      const size_t step = size_t{1} << 20;
      // The whole file, header included, in 1 MiB read() calls: what `cat` or numpy.fromfile does.
      for (ssize_t got; (got = ::read(fd, buf + (done % nbytes), std::min(step, nbytes - done % nbytes))) > 0;)
        done += static_cast<size_t>(got);
      ::close(fd);
    }));
    store.evict_cache("weights");
    t_store.push_back(seconds_of([&] { store.read("weights", buf, nbytes); }));
  }
  const double plain = nbytes / median(t_plain) / 1e9, ours = nbytes / median(t_store) / 1e9;
  std::printf("offload disk read, %zu MiB blob, cold page cache, %d I/O threads, O_DIRECT %s\n", nbytes >> 20, 4,
              store.direct() ? "on" : "off");
  std::printf("  plain sequential read(): %7.3f GB/s\n", plain);
  std::printf("  effx DiskStore.read:     %7.3f GB/s (checksummed)  = %.0f%% of plain (target >= 80%%)\n", ours,
              100 * ours / plain);
  pool.release(buf);
  store.remove("weights");
  ::rmdir(tmpl.c_str());
  return 0;
}
