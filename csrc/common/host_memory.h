// Host buffers for message payloads: aligned, and backed by huge pages when large.
#pragma once

#include <cstddef>

namespace dpsgs {

// Like malloc, freed with std::free. From 4 MiB up the block is 2 MiB-aligned and asks the
// kernel for transparent huge pages (madvise), as NumPy does for its arrays: MPICH's
// single-copy transfers pin every page they copy (measured: channel 16 MiB 6.7 -> 10 GB/s
// with this alone; matching the sender's page offset, see channel.cc, took it to 16).
// Throws std::bad_alloc.
void* host_alloc(size_t bytes);

}  // namespace dpsgs
