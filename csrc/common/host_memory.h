// Host buffers for message payloads: aligned, and backed by huge pages when large.
#pragma once

#include <cstddef>

namespace dpsgs {

// Like malloc, freed with std::free. From 4 MiB up the block is 2 MiB-aligned and asks the
// kernel for transparent huge pages (madvise), as NumPy does for its arrays: MPICH's
// single-copy transfers pin the pages they copy, and 4 KiB pages halve its bandwidth
// (bench: channel 16 MiB, 6.7 vs 15 GB/s). Throws std::bad_alloc.
void* host_alloc(size_t bytes);

}  // namespace dpsgs
