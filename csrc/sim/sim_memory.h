// Simulated device and pinned host memory: which pointer is what, and poison.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

namespace dpsgs::sim {

// Allocates `bytes` (at least 1) of "device" memory on `device`, filled with poison (an
// unwritten buffer reads as NaN / -1). nullptr when out of memory.
void* device_alloc(size_t bytes, int device);
// Poisons and releases a device_alloc block; false if `ptr` is not one. Freed blocks wait
// in a bounded quarantine before they go back to the C allocator, so a stale pointer
// reads poison rather than another buffer's bytes.
bool device_free(void* ptr);
void* host_alloc(size_t bytes);   // pinned host memory (cudaMallocHost)
bool host_free(void* ptr);

// What cudaPointerGetAttributes reports. Simulator blocks are what they were allocated
// as; any other pointer counts as device memory of the calling thread's current device:
// the simulated device's memory IS the process's memory, so torch CPU tensors can stand
// for device tensors (only pinned host memory is host memory).
cudaPointerAttributes attributes(const void* ptr);

// Fills [ptr, ptr + bytes) with the poison byte.
void poison(void* ptr, size_t bytes);

}  // namespace dpsgs::sim
