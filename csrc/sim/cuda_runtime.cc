// The simulated CUDA runtime API (see include/cuda_runtime.h): argument checks and CUDA's
// error codes over the streams, events and memory of sim_stream.h and sim_memory.h.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "sim/sim.h"
#include "sim/sim_memory.h"
#include "sim/sim_settings.h"
#include "sim/sim_stream.h"

namespace dpsgs::sim {

namespace {
std::atomic<bool> g_unloading{false};
thread_local cudaError_t tls_last_error = cudaSuccess;

// The real runtime tears itself down in an exit handler and answers
// cudaErrorCudartUnloading from then on; registered when the module is loaded, so it runs
// after the interpreter's own atexit callbacks, as CUDA's does.
struct ExitHook {
  ExitHook() {
    std::atexit([] { g_unloading.store(true); });
  }
} exit_hook;

cudaError_t fail(cudaError_t rc) {
  tls_last_error = rc;
  return rc;
}
}  // namespace

bool unloading() { return g_unloading.load(); }

}  // namespace dpsgs::sim

using namespace dpsgs::sim;

#define SIM_ENTRY() \
  if (unloading()) return fail(cudaErrorCudartUnloading)

extern "C" {

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorCudartUnloading: return "cudaErrorCudartUnloading";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorCudartUnloading: return "driver shutting down";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

cudaError_t cudaGetLastError(void) {
  cudaError_t rc = tls_last_error;
  tls_last_error = cudaSuccess;
  return rc;
}

cudaError_t cudaPeekAtLastError(void) { return tls_last_error; }

cudaError_t cudaRuntimeGetVersion(int* version) {
  SIM_ENTRY();
  if (version == nullptr) return fail(cudaErrorInvalidValue);
  *version = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) { return cudaRuntimeGetVersion(version); }

cudaError_t cudaGetDeviceCount(int* count) {
  SIM_ENTRY();
  if (count == nullptr) return fail(cudaErrorInvalidValue);
  *count = settings().devices;
  return *count > 0 ? cudaSuccess : fail(cudaErrorNoDevice);
}

cudaError_t cudaGetDevice(int* device) {
  SIM_ENTRY();
  if (device == nullptr) return fail(cudaErrorInvalidValue);
  *device = current_device();
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  SIM_ENTRY();
  if (device < 0 || device >= settings().devices) return fail(cudaErrorInvalidDevice);
  set_current_device(device);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  SIM_ENTRY();
  for_each_stream(current_device(), [](Stream& s) { s.synchronize(); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  SIM_ENTRY();
  if (stream == nullptr || (flags & ~1u) != 0) return fail(cudaErrorInvalidValue);
  *stream = static_cast<cudaStream_t>(new_stream(current_device()));
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  SIM_ENTRY();
  return destroy_stream(stream) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle);
  return s->idle() ? cudaSuccess : cudaErrorNotReady;  // "not ready" is an answer, not an error
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle);
  s->synchronize();
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  auto e = find_event(event);
  if (!s || !e) return fail(cudaErrorInvalidResourceHandle);
  if (flags != 0) return fail(cudaErrorInvalidValue);
  uint64_t generation = e->last();  // the most recent record before this call, as CUDA
  if (generation == 0) return cudaSuccess;
  s->enqueue(StreamOp{"cudaStreamWaitEvent", false, [e, generation] { e->wait(generation, nullptr); }});
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  SIM_ENTRY();
  if (event == nullptr || (flags & ~3u) != 0) return fail(cudaErrorInvalidValue);
  *event = static_cast<cudaEvent_t>(new_event((flags & cudaEventDisableTiming) == 0));
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  SIM_ENTRY();
  return destroy_event(event) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  auto e = find_event(event);
  if (!s || !e) return fail(cudaErrorInvalidResourceHandle);
  uint64_t generation = e->record();
  s->enqueue(StreamOp{"cudaEventRecord", false, [e, generation] { e->complete(generation); }});
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  SIM_ENTRY();
  auto e = find_event(event);
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  return e->done_all() ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  SIM_ENTRY();
  auto e = find_event(event);
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  e->wait(e->last(), nullptr);
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  SIM_ENTRY();
  auto a = find_event(start), b = find_event(end);
  if (ms == nullptr) return fail(cudaErrorInvalidValue);
  if (!a || !b || !a->timing() || !b->timing()) return fail(cudaErrorInvalidResourceHandle);
  Clock::time_point ta, tb;
  if (!a->completed_at(&ta) || !b->completed_at(&tb)) return fail(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(tb - ta).count();
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  SIM_ENTRY();
  if (ptr == nullptr) return fail(cudaErrorInvalidValue);
  *ptr = device_alloc(size, current_device());
  return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFree(void* ptr) {
  SIM_ENTRY();
  if (ptr == nullptr) return cudaSuccess;
  // As CUDA's: cudaFree waits for all work on the device first.
  for_each_stream(attributes(ptr).device, [](Stream& s) { s.synchronize(); });
  return device_free(ptr) ? cudaSuccess : fail(cudaErrorInvalidValue);
}

cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t stream) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle);
  if (ptr == nullptr) return fail(cudaErrorInvalidValue);
  *ptr = device_alloc(size, s->device());
  return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle);
  if (ptr == nullptr) return cudaSuccess;
  s->enqueue(StreamOp{"cudaFreeAsync", false, [ptr] { device_free(ptr); }});
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t size) {
  SIM_ENTRY();
  if (ptr == nullptr) return fail(cudaErrorInvalidValue);
  *ptr = host_alloc(size);
  return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned int flags) { return cudaMallocHost(ptr, size); }

cudaError_t cudaFreeHost(void* ptr) {
  SIM_ENTRY();
  if (ptr == nullptr) return cudaSuccess;
  return host_free(ptr) ? cudaSuccess : fail(cudaErrorInvalidValue);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle);
  if (ptr == nullptr && count > 0) return fail(cudaErrorInvalidValue);
  s->enqueue(StreamOp{"cudaMemsetAsync", true, [ptr, value, count] { std::memset(ptr, value, count); }});
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream) {
  SIM_ENTRY();
  auto s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle);
  if ((dst == nullptr || src == nullptr) && count > 0) return fail(cudaErrorInvalidValue);
  if (count == 0) return cudaSuccess;
  bool src_pinned = attributes(src).type == cudaMemoryTypeHost;
  bool dst_pinned = attributes(dst).type == cudaMemoryTypeHost;
  if (kind == cudaMemcpyHostToDevice && !src_pinned) {
    // Pageable source: CUDA stages it before returning, so the caller may reuse it at once.
    auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                      static_cast<const char*>(src) + count);
    s->enqueue(StreamOp{"cudaMemcpyAsync(HtoD)", true,
                        [dst, staged] { std::memcpy(dst, staged->data(), staged->size()); }});
    return cudaSuccess;
  }
  s->enqueue(StreamOp{"cudaMemcpyAsync", true, [dst, src, count] { std::memcpy(dst, src, count); }});
  // Pageable destination: CUDA returns only once the copy is done.
  if (kind == cudaMemcpyDeviceToHost && !dst_pinned) s->synchronize();
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes* attributes_out, const void* ptr) {
  SIM_ENTRY();
  if (attributes_out == nullptr) return fail(cudaErrorInvalidValue);
  *attributes_out = attributes(ptr);
  return cudaSuccess;
}

}  // extern "C"
