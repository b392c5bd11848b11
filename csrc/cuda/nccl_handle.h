// NcclHandle: one non-blocking ncclComm_t with bounded settle, error polling and abort.
#pragma once

#include <nccl.h>

#include <atomic>
#include <string>

namespace dpsgs {

// Every communicator is created with config.blocking = 0, so no NCCL call can hang the
// calling thread: a call returns ncclInProgress and settle() polls ncclCommGetAsyncError
// (politely, with a deadline) until the communicator is ready again. On error or timeout
// the communicator is aborted (bounded: ncclCommAbort has hung in practice, so it runs on a
// helper thread that is abandoned after abort_timeout_s) and a CommError/CommTimeout names
// the call, this rank, the peer and NCCL's message.
//
// Thread contract: NCCL calls on the handle are made by the device's issuing thread;
// check_async()/abort() may be called from any thread (that is what they exist for).
class NcclHandle {
 public:
  // Takes ownership of `comm` (may still be initialising). `rank` is this process's rank in
  // the owning MPI communicator, used in messages only.
  NcclHandle(ncclComm_t comm, int rank, std::string name, double timeout_s, double warn_after_s);
  ~NcclHandle();  // never throws: finalize + destroy (bounded), else abort
  NcclHandle(const NcclHandle&) = delete;
  NcclHandle& operator=(const NcclHandle&) = delete;

  ncclComm_t get() const { return comm_; }
  const std::string& name() const { return name_; }
  int rank() const { return rank_; }
  bool aborted() const { return aborted_.load(); }

  // Polls until the last call on the communicator has completed (not ncclInProgress).
  // `call` and `peer` name what is being settled for the error message.
  void settle(const char* call, int peer, double timeout_s = -1.0);
  // Throws CommError (after aborting) if NCCL reports an asynchronous error; false while an
  // operation is still in progress. Cheap: meant for every poll of a wait loop.
  bool check_async(const char* what, int peer);
  // Aborts the communicator once, bounded; further calls are no-ops.
  void abort(const std::string& why) noexcept;

  double timeout() const { return timeout_s_; }
  double warn_after() const { return warn_after_s_; }

 private:
  ncclComm_t comm_;
  int rank_;
  std::string name_;
  double timeout_s_, warn_after_s_;
  std::atomic<bool> aborted_{false};
};

// The configuration every dpsgs communicator uses (non-blocking, named for NCCL's logs).
ncclConfig_t nccl_config(const char* name);

// Seconds an ncclCommAbort may take before it is abandoned (DPSGS_NCCL_ABORT_TIMEOUT, default 10).
double nccl_abort_timeout();

}  // namespace dpsgs
