// NcclHandle: non-blocking NCCL communicator with bounded settle/abort (see nccl_handle.h).
#include "cuda/nccl_handle.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <thread>

#include "common/backoff.h"
#include "cuda/cuda_check.h"

namespace dpsgs {

ncclConfig_t nccl_config(const char* name) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.commName = name;  // callers keep `name` alive until the init/split has settled
  return config;
}

double nccl_abort_timeout() {
  const char* env = std::getenv("DPSGS_NCCL_ABORT_TIMEOUT");
  double t = env ? std::atof(env) : 0.0;
  return t > 0 ? t : 10.0;
}

NcclHandle::NcclHandle(ncclComm_t comm, int rank, std::string name, double timeout_s, double warn_after_s)
    : comm_(comm), rank_(rank), name_(std::move(name)), timeout_s_(timeout_s), warn_after_s_(warn_after_s) {}

NcclHandle::~NcclHandle() {
  if (comm_ == nullptr || aborted_.load()) return;
  // Finalize flushes outstanding operations; bounded so a dead peer cannot hang exit.
  try {
    DPSGS_CHECK_NCCL(ncclCommFinalize(comm_), comm_, rank_, kNoPeer);
    settle("ncclCommFinalize", kNoPeer, nccl_abort_timeout());
    ncclResult_t rc = ncclCommDestroy(comm_);
    if (rc != ncclSuccess)
      std::fprintf(stderr, "[dpsgs] rank %d: ncclCommDestroy(%s) failed: %s\n", rank_, name_.c_str(),
                   ncclGetErrorString(rc));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dpsgs] rank %d: closing NCCL communicator %s: %s\n", rank_, name_.c_str(), e.what());
    abort("its finalize failed");  // settle() has already aborted on most paths; abort is idempotent
  }
}

void NcclHandle::settle(const char* call, int peer, double timeout_s) {
  double t = timeout_s < 0 ? timeout_s_ : timeout_s;
  try {
    poll_until([&] { return check_async(call, peer); }, t, warn_after_s_,
               [&] { return str_cat("rank ", rank_, ": NCCL ", call, " on communicator ", name_,
                                    peer == kNoPeer ? std::string() : str_cat(" with peer ", peer)); });
  } catch (const CommTimeout&) {
    abort(str_cat(call, " timed out"));
    throw;
  }
}

bool NcclHandle::check_async(const char* what, int peer) {
  if (aborted_.load())
    throw CommError(str_cat("rank ", rank_, ": NCCL communicator ", name_, " was aborted before ", what));
  ncclResult_t state = ncclSuccess;
  ncclResult_t rc = ncclCommGetAsyncError(comm_, &state);
  if (rc != ncclSuccess)
    DPSGS_THROW_CALL("NCCL", "ncclCommGetAsyncError", rank_, peer, nccl_error_text(rc, comm_));
  if (state == ncclInProgress) return false;
  if (state != ncclSuccess) {
    std::string text = str_cat("asynchronous error during ", what, " on communicator ", name_, ": ",
                               nccl_error_text(state, comm_));
    abort(text);
    DPSGS_THROW_CALL("NCCL", what, rank_, peer, text);
  }
  return true;
}

void NcclHandle::abort(const std::string& why) noexcept {
  if (aborted_.exchange(true) || comm_ == nullptr) return;
  std::fprintf(stderr, "[dpsgs] rank %d: aborting NCCL communicator %s (%s)\n", rank_, name_.c_str(), why.c_str());
  // ncclCommAbort can itself hang on a broken network: run it on a helper thread and give up
  // on it after a bound. The helper owns its state, so abandoning it is safe.
  auto done = std::make_shared<std::promise<ncclResult_t>>();
  std::future<ncclResult_t> result = done->get_future();
  ncclComm_t comm = comm_;
  std::thread([comm, done] { done->set_value(ncclCommAbort(comm)); }).detach();
  double bound = nccl_abort_timeout();
  if (result.wait_for(std::chrono::duration<double>(bound)) != std::future_status::ready) {
    std::fprintf(stderr, "[dpsgs] rank %d: ncclCommAbort(%s) did not return within %.0f s; abandoned\n",
                 rank_, name_.c_str(), bound);
  } else if (ncclResult_t rc = result.get(); rc != ncclSuccess) {
    std::fprintf(stderr, "[dpsgs] rank %d: ncclCommAbort(%s) failed: %s\n", rank_, name_.c_str(),
                 ncclGetErrorString(rc));
  }
  std::fflush(stderr);
}

}  // namespace dpsgs
