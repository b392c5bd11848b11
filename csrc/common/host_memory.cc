// host_alloc: aligned payload buffers, huge pages when large (see host_memory.h).
#include "common/host_memory.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace dpsgs {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeFrom = size_t(4) << 20;  // NumPy's threshold for the same advice
constexpr size_t kCacheLine = 64;
}  // namespace

void* host_alloc(size_t bytes) {
  if (bytes == 0) bytes = kCacheLine;
  const bool huge = bytes >= kHugeFrom;
  void* p = nullptr;
  if (posix_memalign(&p, huge ? kHugePage : kCacheLine, bytes) != 0) throw std::bad_alloc();
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP it is a no-op
  return p;
}

}  // namespace dpsgs
