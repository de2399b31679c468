// effx family: offload runtime. CRC32C (Castagnoli, reflected polynomial 0x82F63B78) of the
// disk tier's blobs: the SSE4.2 crc32 instruction when the CPU has it, else slicing-by-8.
#include <array>
#include <cstring>

#include "effx/offload.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <nmmintrin.h>
#define EFFX_CRC_X86 1
#endif

namespace effx::offload {
namespace {

using Tables = std::array<std::array<uint32_t, 256>, 8>;

Tables make_tables() {
  Tables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    t[0][i] = c;
  }
  for (int s = 1; s < 8; ++s)
    for (uint32_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  return t;
}

uint32_t crc_software(const unsigned char* p, size_t n, uint32_t c) {
  static const Tables t = make_tables();
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);  // little-endian load; the tables assume it
    w ^= c;
    c = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
        t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return c;
}

#ifdef EFFX_CRC_X86
__attribute__((target("sse4.2"))) uint32_t crc_hardware(const unsigned char* p, size_t n, uint32_t c) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
    p += 8;
    n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n--) c = _mm_crc32_u8(c, *p++);
  return c;
}

bool has_sse42() {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2);
}
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t nbytes, uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
#ifdef EFFX_CRC_X86
  static const bool hw = has_sse42();
  crc = hw ? crc_hardware(p, nbytes, crc) : crc_software(p, nbytes, crc);
#else
  crc = crc_software(p, nbytes, crc);
#endif
  return ~crc;
}

}  // namespace effx::offload
