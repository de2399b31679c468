// effx C++ tests: a minimal check macro (the tests are plain executables run by ctest).
#pragma once

#include <cstdio>
#include <cstdlib>

#define EFFX_EXPECT(cond, ...)                                              \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                    \
      std::fprintf(stderr, "\n");                                           \
      std::exit(1);                                                         \
    }                                                                       \
  } while (0)
