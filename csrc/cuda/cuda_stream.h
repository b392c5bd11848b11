// RAII for the CUDA objects the NCCL backend owns: current-device guard, stream, event.
#pragma once

#include <cuda_runtime.h>

namespace dpsgs {

// Makes `device` current for a scope and restores the previous device. Needed because the
// caller's thread may have any device current, and events/streams belong to one device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();  // never throws
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

// A non-blocking stream (no implicit sync with the legacy default stream), so communication
// never serialises behind unrelated compute; ordering is explicit, with events.
class CudaStream {
 public:
  CudaStream(int device, int rank);
  ~CudaStream();  // never throws; the stream's pending work still completes (CUDA semantics)
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }

 private:
  cudaStream_t stream_ = nullptr;
  int device_;
};

// A timing-free event (cheapest to record and query). Destroying an event that is still
// pending is allowed by CUDA: its resources are released when it completes.
class CudaEvent {
 public:
  CudaEvent(int device, int rank);
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream, int rank, int peer);
  // true when every work captured by the last record() finished; throws on a CUDA error.
  bool query(int rank, int peer) const;

 private:
  cudaEvent_t event_ = nullptr;
};

// Makes `waiter` wait (on the GPU, not the host) for everything enqueued so far on `producer`.
void stream_wait_stream(cudaStream_t waiter, cudaStream_t producer, int device, int rank, int peer);

}  // namespace dpsgs
