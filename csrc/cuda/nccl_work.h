// NcclWork: handle for one NCCL operation queued to the device's issuing thread.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <string>

#include "common/buffer.h"
#include "cuda/cuda_stream.h"
#include "cuda/nccl_handle.h"
#include "common/work.h"

namespace dpsgs {

// Life of an operation: the caller records `ready` on its compute stream (so the transfer
// sees everything computed before the call), queues the NCCL call; the issuing thread makes
// the communication stream wait for `ready`, issues the call, records `done` and calls
// mark_issued(). Completion is `done` having completed on the GPU.
//
// is_completed() polls cudaEventQuery(done) and ncclCommGetAsyncError (once more when done
// completes: an operation hit by an asynchronous error may still complete); wait() adds the
// deadline and, on timeout, aborts the NCCL communicator (bounded) before throwing
// CommTimeout — a timed-out NCCL kernel never finishes, so the communicator is dead anyway.
// `owner` keeps the caller's memory alive until the Work is destroyed and its operation has
// finished on the GPU: a Work dropped before that (timed out, failed, or let go by the
// caller) hands its owner and `done` event to a keeper that releases them once the event
// completes (never, where the event cannot say), as NCCL may still read or write the memory.
class NcclWork : public Work {
 public:
  NcclWork(std::string what, std::shared_ptr<NcclHandle> handle, int device, int peer, Owner owner);
  ~NcclWork() override;

  bool is_completed() override;
  std::string describe() const override { return what_; }
  void wait(double timeout_s = -1.0) override;
  // Makes `stream` wait on the GPU for this operation, without blocking the host beyond the
  // (short) time until the issuing thread has issued it. Use before consuming a received
  // buffer on a compute stream.
  void wait_stream(uintptr_t stream, double timeout_s = -1.0);

  // Issuing thread side.
  CudaEvent& done_event() { return *done_; }
  void mark_issued() { issued_.store(true, std::memory_order_release); }
  void set_error(std::exception_ptr e);
  // Zero-size operations: nothing to issue.
  void mark_trivial() {
    trivial_ = true;
    mark_issued();
  }

 private:
  bool issued();  // rethrows an issue-time error

  std::string what_;
  std::shared_ptr<NcclHandle> handle_;
  int device_, peer_;
  Owner owner_;
  std::unique_ptr<CudaEvent> done_;
  bool trivial_ = false;
  std::atomic<bool> issued_{false};
  std::atomic<bool> failed_{false};
  std::atomic<bool> verified_{false};  // completed, and NCCL reported no error then
  std::mutex mu_;
  std::exception_ptr error_;
};

}  // namespace dpsgs
