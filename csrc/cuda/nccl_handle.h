// NcclHandle: one non-blocking ncclComm_t with serialised calls, bounded settle, close and abort.
#pragma once

#include <nccl.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

namespace dpsgs {

// Every communicator is created with config.blocking = 0, so no NCCL call can hang the
// calling thread: a call returns ncclInProgress and settle() polls ncclCommGetAsyncError
// (politely, with a deadline) until the communicator is ready again. On error or timeout
// the communicator is aborted (bounded: ncclCommAbort has hung in practice, so it runs on a
// helper thread that is abandoned after abort_timeout_s) and a CommError/CommTimeout names
// the call, this rank, the peer and NCCL's message.
//
// Thread contract: NCCL is not thread-safe per communicator. The device's issuing thread
// makes the calls that enqueue work; waiters on other threads poll check_async(). Both go
// through lock(), so two threads never call into one ncclComm_t at once (two concurrent
// ncclCommGetAsyncError calls both "complete" the communicator's group job: a double free,
// seen as a segfault on the first all-reduce of a split group). abort() may be called from
// any thread; it takes the lock too, and lock() refuses once an abort has begun.
//
// The handle owns the name and the ncclConfig_t it passes to NCCL: NCCL keeps the name's
// pointer (config.commName) for the communicator's lifetime, and a split writes the new
// communicator into slot() from its own thread when it completes.
class NcclHandle {
 public:
  // `rank` is this process's rank in the owning MPI communicator, used in messages only.
  // The communicator itself is created by the caller into slot() with config().
  NcclHandle(int rank, std::string name, double timeout_s, double warn_after_s);
  ~NcclHandle();  // never throws: close()
  NcclHandle(const NcclHandle&) = delete;
  NcclHandle& operator=(const NcclHandle&) = delete;

  ncclComm_t* slot() { return &comm_; }
  ncclConfig_t* config() { return &config_; }
  ncclComm_t get() const { return comm_; }
  const std::string& name() const { return name_; }
  int rank() const { return rank_; }
  bool aborted() const { return aborted_.load(); }
  bool closed() const { return closed_.load(); }

  // Exclusive use of the communicator for one NCCL call (or one group). Throws CommError,
  // naming `what`, once the communicator is aborted or closed.
  std::unique_lock<std::mutex> lock(const char* what, int peer);
  // Polls until the last call on the communicator has completed (not ncclInProgress).
  // `call` and `peer` name what is being settled for the error message.
  void settle(const char* call, int peer, double timeout_s = -1.0);
  // Throws CommError (after aborting) if NCCL reports an asynchronous error; false while an
  // operation is still in progress. Cheap: meant for every poll of a wait loop.
  bool check_async(const char* what, int peer);
  // ncclCommFinalize (settled, bounded by nccl_abort_timeout()) then ncclCommDestroy, once.
  // Skipped quietly when the CUDA runtime is already unloading (nothing can be freed then).
  // Call on the device's issuing thread, after every queued operation. Never throws.
  void close() noexcept;
  // Aborts the communicator once, bounded; further calls are no-ops.
  void abort(const std::string& why) noexcept;

  double timeout() const { return timeout_s_; }
  double warn_after() const { return warn_after_s_; }

 private:
  void check_usable(const char* what, int peer) const;

  ncclComm_t comm_ = nullptr;
  int rank_;
  std::string name_;
  ncclConfig_t config_ = NCCL_CONFIG_INITIALIZER;
  double timeout_s_, warn_after_s_;
  // The call lock and whether the communicator is destroyed, shared with an abort's helper
  // thread (which may outlive us): the helper, once it holds the lock, aborts only a live one.
  struct Shared {
    std::mutex mu;
    bool destroyed = false;  // under mu
  };
  std::shared_ptr<Shared> shared_;
  std::atomic<bool> aborted_{false};
  std::atomic<bool> closing_{false};
  std::atomic<bool> closed_{false};
};

// Seconds an ncclCommAbort or a close may take before it is abandoned
// (DPSGS_NCCL_ABORT_TIMEOUT, default 10).
double nccl_abort_timeout();

// True when the CUDA runtime of this process is shutting down (after exit() began).
bool cuda_runtime_unloading();

}  // namespace dpsgs
