// effx family: offload runtime. The disk tier: one checksummed blob file per tensor (layout in
// include/effx/offload.h), written through a temporary file, read in parallel aligned chunks.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "effx/offload.h"

namespace effx::offload {
namespace {

constexpr char kMagic[8] = {'E', 'F', 'F', 'X', 'B', 'L', 'O', 'B'};
constexpr uint32_t kVersion = 1;
constexpr size_t kFixed = 48;  // bytes of the fixed header fields, before the metadata
constexpr size_t kMaxMeta = 1 << 16;
constexpr size_t kAlign = HostPool::kAlign;

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

struct AlignedBuffer {
  explicit AlignedBuffer(size_t n) : size(n) {
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, n) != 0) throw std::bad_alloc();
    data.reset(static_cast<char*>(p));
    std::memset(data.get(), 0, n);
  }
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data;
  size_t size;
};

template <typename T>
void put(char* dst, size_t off, T v) {
  std::memcpy(dst + off, &v, sizeof(T));
}
template <typename T>
T get(const char* src, size_t off) {
  T v;
  std::memcpy(&v, src + off, sizeof(T));
  return v;
}

std::string errno_text(int err) { return std::strerror(err); }

void check_name(const std::string& name) {
  bool ok = !name.empty() && name.size() <= 200 && name[0] != '.';
  for (char c : name)
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                c == '_' || c == '-');
  if (!ok)
    throw std::invalid_argument(
        "effx.offload.DiskStore: blob name must be 1-200 characters of [A-Za-z0-9._-] not starting "
        "with '.', got '" + name + "'");
}

// pread/pwrite until done; returns bytes moved (short only at end of file) or -errno.
ssize_t full_pread(int fd, char* dst, size_t n, off_t off) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, dst + done, n - done, off + static_cast<off_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -errno;
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(done);
}

int full_pwrite(int fd, const char* src, size_t n, off_t off) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pwrite(fd, src + done, n - done, off + static_cast<off_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return errno;
    if (r == 0) return EIO;
    done += static_cast<size_t>(r);
  }
  return 0;
}

}  // namespace

struct DiskStore::Header {
  size_t header_bytes = 0, nbytes = 0, chunk = 0;
  std::string meta;
  std::vector<uint32_t> crcs;
};

DiskStore::DiskStore(std::string directory, int io_threads, bool direct)
    : dir_(std::move(directory)), direct_(direct), io_(io_threads) {
  struct stat st;
  if (::stat(dir_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw std::invalid_argument("effx.offload.DiskStore: directory must exist, got '" + dir_ + "'");
}

std::string DiskStore::path_of(const std::string& name) const {
  check_name(name);
  return dir_ + "/" + name + ".blob";
}

bool DiskStore::contains(const std::string& name) const {
  struct stat st;
  return ::stat(path_of(name).c_str(), &st) == 0;
}

void DiskStore::remove(const std::string& name) { ::unlink(path_of(name).c_str()); }

void DiskStore::write(const std::string& name, const void* data, size_t nbytes, const std::string& meta) {
  const std::string path = path_of(name);
  if (meta.size() > kMaxMeta)
    throw std::invalid_argument("effx.offload.DiskStore: metadata of blob '" + name + "' must be at most " +
                                std::to_string(kMaxMeta) + " bytes, got " + std::to_string(meta.size()));
  const size_t nchunks = (nbytes + kChunk - 1) / kChunk;
  const size_t header_bytes = round_up(kFixed + meta.size() + 4 * nchunks);
  AlignedBuffer header(header_bytes);
  char* h = header.data.get();
  std::memcpy(h, kMagic, 8);
  put<uint32_t>(h, 8, kVersion);
  put<uint32_t>(h, 12, static_cast<uint32_t>(header_bytes));
  put<uint64_t>(h, 16, nbytes);
  put<uint64_t>(h, 24, kChunk);
  put<uint32_t>(h, 32, static_cast<uint32_t>(meta.size()));
  put<uint32_t>(h, 36, static_cast<uint32_t>(nchunks));
  std::memcpy(h + kFixed, meta.data(), meta.size());
  const auto* src = static_cast<const char*>(data);
  const size_t crc_at = kFixed + meta.size();
  for (size_t c = 0; c < nchunks; ++c) {
    const size_t len = std::min(kChunk, nbytes - c * kChunk);
    put<uint32_t>(h, crc_at + 4 * c, crc32c(src + c * kChunk, len));
  }
  put<uint32_t>(h, 40, crc32c(h, header_bytes));  // computed with this field still zero

  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp" + std::to_string(::getpid()) + "." + std::to_string(counter++);
  auto fail = [&](int err, int fd) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw StoreError("effx.offload: cannot write blob '" + name + "' (" + std::to_string(nbytes) +
                     " bytes) to " + path + ": " + errno_text(err));
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(errno, -1);
  if (int err = full_pwrite(fd, h, header_bytes, 0)) fail(err, fd);
  if (int err = full_pwrite(fd, src, nbytes, static_cast<off_t>(header_bytes))) fail(err, fd);
  // Zero padding to the aligned end so an O_DIRECT read of the last chunk stays in the file.
  const size_t pad = round_up(nbytes) - nbytes;
  if (pad) {
    std::vector<char> zeros(pad, 0);
    if (int err = full_pwrite(fd, zeros.data(), pad, static_cast<off_t>(header_bytes + nbytes))) fail(err, fd);
  }
  // Space errors of delayed allocation surface at fdatasync or close, not at write.
  if (::fdatasync(fd) != 0) fail(errno, fd);
  if (::close(fd) != 0) fail(errno, -1);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail(errno, -1);
}

DiskStore::Header DiskStore::load_header(const std::string& name, int fd, size_t file_size) const {
  const std::string path = path_of(name);
  auto corrupted = [&](const std::string& why) {
    return StoreError("effx.offload: blob '" + name + "' is corrupted (" + why + ") at " + path);
  };
  auto truncated = [&](size_t want) {
    return StoreError("effx.offload: blob '" + name + "' is truncated: " + path + " has " +
                      std::to_string(file_size) + " bytes, expected " + std::to_string(want));
  };
  if (file_size < kAlign) throw truncated(kAlign);
  AlignedBuffer first(kAlign);
  if (full_pread(fd, first.data.get(), kAlign, 0) != static_cast<ssize_t>(kAlign)) throw truncated(kAlign);
  const char* f = first.data.get();
  if (std::memcmp(f, kMagic, 8) != 0) throw corrupted("not an effx blob header");
  const size_t header_bytes = get<uint32_t>(f, 12);
  const size_t nchunks = get<uint32_t>(f, 36), meta_len = get<uint32_t>(f, 32);
  if (get<uint32_t>(f, 8) != kVersion || header_bytes % kAlign || header_bytes < kAlign ||
      meta_len > kMaxMeta || kFixed + meta_len + 4 * nchunks > header_bytes)
    throw corrupted("bad header fields");
  if (file_size < header_bytes) throw truncated(header_bytes);
  AlignedBuffer whole(header_bytes);
  char* h = whole.data.get();
  if (full_pread(fd, h, header_bytes, 0) != static_cast<ssize_t>(header_bytes)) throw truncated(header_bytes);
  const uint32_t header_crc = get<uint32_t>(h, 40);
  put<uint32_t>(h, 40, 0);
  if (crc32c(h, header_bytes) != header_crc) throw corrupted("header checksum mismatch");
  Header out;
  out.header_bytes = header_bytes;
  out.nbytes = get<uint64_t>(h, 16);
  out.chunk = get<uint64_t>(h, 24);
  if (out.chunk == 0 || out.chunk % kAlign || (out.nbytes + out.chunk - 1) / out.chunk != nchunks)
    throw corrupted("bad chunk layout");
  out.meta.assign(h + kFixed, meta_len);
  out.crcs.resize(nchunks);
  std::memcpy(out.crcs.data(), h + kFixed + meta_len, 4 * nchunks);
  const size_t want = header_bytes + round_up(out.nbytes);
  if (file_size < want) throw truncated(want);
  if (file_size > want) throw corrupted("file has " + std::to_string(file_size) + " bytes, expected " + std::to_string(want));
  return out;
}

BlobInfo DiskStore::info(const std::string& name) const {
  const std::string path = path_of(name);
  Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0)
    throw StoreError("effx.offload: blob '" + name + "' is missing (" + path + ": " + errno_text(errno) + ")");
  struct stat st;
  ::fstat(fd.fd, &st);
  Header h = load_header(name, fd.fd, static_cast<size_t>(st.st_size));
  return BlobInfo{h.nbytes, h.meta};
}

BlobInfo DiskStore::read(const std::string& name, void* dst_ptr, size_t capacity) {
  const std::string path = path_of(name);
  Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0)
    throw StoreError("effx.offload: blob '" + name + "' is missing (" + path + ": " + errno_text(errno) + ")");
  struct stat st;
  ::fstat(fd.fd, &st);
  const Header h = load_header(name, fd.fd, static_cast<size_t>(st.st_size));
  if (capacity < h.nbytes)
    throw std::invalid_argument("effx.offload.DiskStore: blob '" + name + "' has " + std::to_string(h.nbytes) +
                                " bytes, the destination only " + std::to_string(capacity));
  char* dst = static_cast<char*>(dst_ptr);
  // O_DIRECT needs an aligned destination with room for the padded last block; it skips the
  // page cache copy and lets several large reads be in flight on the device at once.
  Fd direct_fd;
  const bool aligned = reinterpret_cast<uintptr_t>(dst) % kAlign == 0;
  if (direct_ && aligned && h.nbytes >= kAlign) {
#ifdef O_DIRECT
    direct_fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
#endif
  }
  const size_t nchunks = h.crcs.size();
  // Chunks whose padded read would run past `capacity` go through the buffered descriptor.
  const bool pad_fits = capacity >= round_up(h.nbytes);
  auto read_chunk = [&](size_t c) {
    const size_t off = c * h.chunk, len = std::min(h.chunk, h.nbytes - off);
    const off_t at = static_cast<off_t>(h.header_bytes + off);
    ssize_t got;
    const bool use_direct = direct_fd.fd >= 0 && (len % kAlign == 0 || pad_fits);
    if (use_direct) {
      got = full_pread(direct_fd.fd, dst + off, round_up(len), at);
      if (got == -EINVAL) got = full_pread(fd.fd, dst + off, len, at);  // the filesystem refuses O_DIRECT
      else if (got >= static_cast<ssize_t>(len)) got = static_cast<ssize_t>(len);
    } else {
      got = full_pread(fd.fd, dst + off, len, at);
    }
    if (got < 0)
      throw StoreError("effx.offload: cannot read blob '" + name + "' at " + path + ": " + errno_text(static_cast<int>(-got)));
    if (static_cast<size_t>(got) < len)
      throw StoreError("effx.offload: blob '" + name + "' is truncated: " + path + " ended inside chunk " + std::to_string(c));
    if (crc32c(dst + off, len) != h.crcs[c])
      throw StoreError("effx.offload: blob '" + name + "' is corrupted (checksum mismatch in bytes [" +
                       std::to_string(off) + ", " + std::to_string(off + len) + ")) at " + path);
  };
  const size_t jobs = std::min<size_t>(nchunks, static_cast<size_t>(io_.size()));
  if (jobs <= 1) {
    for (size_t c = 0; c < nchunks; ++c) read_chunk(c);
  } else {
    // Chunks are dealt round-robin so the device sees `jobs` sequential streams at once.
    std::vector<std::future<void>> futs;
    for (size_t j = 0; j < jobs; ++j)
      futs.push_back(io_.submit([&, j] {
        for (size_t c = j; c < nchunks; c += jobs) read_chunk(c);
      }));
    std::exception_ptr first_error;
    for (auto& f : futs) {
      try {
        f.get();
      } catch (...) {
        if (!first_error) first_error = std::current_exception();
      }
    }
    if (first_error) std::rethrow_exception(first_error);
  }
  return BlobInfo{h.nbytes, h.meta};
}

std::future<void> DiskStore::write_async(const std::string& name, const void* data, size_t nbytes,
                                         const std::string& meta) {
  check_name(name);
  // Not on io_: a write may run while reads use every I/O thread.
  return std::async(std::launch::async, [this, name, data, nbytes, meta] { write(name, data, nbytes, meta); });
}

std::future<void> DiskStore::read_async(const std::string& name, void* dst, size_t capacity) {
  check_name(name);
  // The read fans out on io_ and waits, so it must not itself occupy an I/O thread.
  return std::async(std::launch::async, [this, name, dst, capacity] { read(name, dst, capacity); });
}

void DiskStore::evict_cache(const std::string& name) const {
  const std::string path = path_of(name);
  Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) return;
  ::fdatasync(fd.fd);
  ::posix_fadvise(fd.fd, 0, 0, POSIX_FADV_DONTNEED);
}

}  // namespace effx::offload
