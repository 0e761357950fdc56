// Minimal check macro shared by the host tests (ctest): prints each failure, main returns nonzero.
#pragma once
#include <cstdio>
#include <initializer_list>

static int failures = 0;
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);            \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
      ++failures;                                                 \
    }                                                             \
  } while (0)
#define REPORT() (std::printf("%s: %d failures\n", __FILE__, failures), failures ? 1 : 0)
