// RAII for CUDA device, stream and event (see cuda_stream.h).
#include "cuda/cuda_stream.h"

#include <cstdio>

#include "cuda/cuda_check.h"

namespace dpsgs {

DeviceGuard::DeviceGuard(int device) {
  DPSGS_CHECK_CUDA(cudaGetDevice(&previous_), kNoPeer, kNoPeer);
  if (previous_ != device) {
    DPSGS_CHECK_CUDA(cudaSetDevice(device), kNoPeer, kNoPeer);
    changed_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) {
    cudaError_t rc = cudaSetDevice(previous_);
    if (rc != cudaSuccess)
      std::fprintf(stderr, "[dpsgs] cudaSetDevice(%d) while restoring the device failed: %s\n",
                   previous_, cudaGetErrorString(rc));
  }
}

CudaStream::CudaStream(int device, int rank) : device_(device) {
  DeviceGuard guard(device);
  DPSGS_CHECK_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), rank, kNoPeer);
}

CudaStream::~CudaStream() {
  if (stream_ == nullptr) return;
  cudaError_t rc = cudaStreamDestroy(stream_);
  if (rc != cudaSuccess && rc != cudaErrorCudartUnloading)
    std::fprintf(stderr, "[dpsgs] cudaStreamDestroy failed: %s\n", cudaGetErrorString(rc));
}

CudaEvent::CudaEvent(int device, int rank) {
  DeviceGuard guard(device);
  DPSGS_CHECK_CUDA(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), rank, kNoPeer);
}

CudaEvent::~CudaEvent() {
  if (event_ == nullptr) return;
  cudaError_t rc = cudaEventDestroy(event_);
  if (rc != cudaSuccess && rc != cudaErrorCudartUnloading)
    std::fprintf(stderr, "[dpsgs] cudaEventDestroy failed: %s\n", cudaGetErrorString(rc));
}

void CudaEvent::record(cudaStream_t stream, int rank, int peer) {
  DPSGS_CHECK_CUDA(cudaEventRecord(event_, stream), rank, peer);
}

bool CudaEvent::query(int rank, int peer) const {
  cudaError_t rc = cudaEventQuery(event_);
  if (rc == cudaSuccess) return true;
  if (rc == cudaErrorNotReady) return false;
  DPSGS_THROW_CALL("CUDA", "cudaEventQuery", rank, peer, cuda_error_text(rc));
}

void stream_wait_stream(cudaStream_t waiter, cudaStream_t producer, int device, int rank, int peer) {
  if (waiter == producer) return;
  CudaEvent ev(device, rank);
  ev.record(producer, rank, peer);
  DPSGS_CHECK_CUDA(cudaStreamWaitEvent(waiter, ev.get(), 0), rank, peer);
}

}  // namespace dpsgs
