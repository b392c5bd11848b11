// NcclHandle: non-blocking NCCL communicator with serialised calls, bounded settle/close/abort
// (see nccl_handle.h).
#include "cuda/nccl_handle.h"

#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <thread>

#include "common/backoff.h"
#include "cuda/cuda_check.h"

namespace dpsgs {

double nccl_abort_timeout() {
  const char* env = std::getenv("DPSGS_NCCL_ABORT_TIMEOUT");
  double t = env ? std::atof(env) : 0.0;
  return t > 0 ? t : 10.0;
}

bool cuda_runtime_unloading() {
  int device = 0;
  if (cudaGetDevice(&device) == cudaErrorCudartUnloading) {
    cudaGetLastError();
    return true;
  }
  return false;
}

NcclHandle::NcclHandle(int rank, std::string name, double timeout_s, double warn_after_s)
    : rank_(rank), name_(std::move(name)), timeout_s_(timeout_s),
      warn_after_s_(warn_after_s), shared_(std::make_shared<Shared>()) {
  config_.blocking = 0;
  config_.commName = name_.c_str();  // stable: name_ is never modified, the handle never moves
}

NcclHandle::~NcclHandle() { close(); }

void NcclHandle::check_usable(const char* what, int peer) const {
  if (aborted_.load())
    throw CommError(str_cat("rank ", rank_, ": NCCL communicator ", name_, " was aborted before ", what,
                            peer == kNoPeer ? std::string() : str_cat(" with peer ", peer)));
  if (closed_.load())
    throw CommError(str_cat("rank ", rank_, ": NCCL communicator ", name_, " was closed before ", what,
                            peer == kNoPeer ? std::string() : str_cat(" with peer ", peer)));
}

std::unique_lock<std::mutex> NcclHandle::lock(const char* what, int peer) {
  // Holders make one non-blocking NCCL call and let go, except an abort, which sets
  // aborted_ first: so a short yield loop that re-checks the flags never waits long.
  for (;;) {
    check_usable(what, peer);
    std::unique_lock<std::mutex> guard(shared_->mu, std::try_to_lock);
    if (guard.owns_lock()) {
      check_usable(what, peer);
      return guard;
    }
    std::this_thread::yield();
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
  ncclResult_t state = ncclSuccess, rc = ncclSuccess;
  {
    auto guard = lock(what, peer);
    rc = ncclCommGetAsyncError(comm_, &state);
  }
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

void NcclHandle::close() noexcept {
  if (comm_ == nullptr || aborted_.load() || closing_.exchange(true)) return;
  if (cuda_runtime_unloading()) return;  // the process is past exit(): nothing can be freed now
  try {
    {
      auto guard = lock("ncclCommFinalize", kNoPeer);
      DPSGS_CHECK_NCCL(ncclCommFinalize(comm_), comm_, rank_, kNoPeer);
    }
    // Finalize flushes outstanding operations; bounded so a dead peer cannot hang the exit.
    settle("ncclCommFinalize", kNoPeer, nccl_abort_timeout());
    auto guard = lock("ncclCommDestroy", kNoPeer);
    ncclResult_t rc = ncclCommDestroy(comm_);
    shared_->destroyed = true;  // an abort racing this close finds it so, under the lock
    closed_.store(true);
    comm_ = nullptr;
    // A non-blocking communicator's destroy may answer ncclInProgress: NCCL finishes the
    // teardown on its own thread and frees the communicator, which must not be polled again.
    if (rc != ncclSuccess && rc != ncclInProgress)
      std::fprintf(stderr, "[dpsgs] rank %d: ncclCommDestroy(%s) failed: %s\n", rank_, name_.c_str(),
                   ncclGetErrorString(rc));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dpsgs] rank %d: closing NCCL communicator %s: %s\n", rank_, name_.c_str(), e.what());
    abort("its close failed");  // settle() has already aborted on most paths; abort is idempotent
  }
}

void NcclHandle::abort(const std::string& why) noexcept {
  if (aborted_.exchange(true) || closed_.load() || comm_ == nullptr) return;
  std::fprintf(stderr, "[dpsgs] rank %d: aborting NCCL communicator %s (%s)\n", rank_, name_.c_str(), why.c_str());
  // ncclCommAbort can itself hang on a broken network: run it on a helper thread and give up
  // on it after a bound. The helper owns what it uses (the mutex too), so abandoning it is safe.
  auto done = std::make_shared<std::promise<ncclResult_t>>();
  std::future<ncclResult_t> result = done->get_future();
  std::thread([comm = comm_, shared = shared_, done] {
    std::lock_guard<std::mutex> guard(shared->mu);  // no other call is inside the communicator
    done->set_value(shared->destroyed ? ncclSuccess : ncclCommAbort(comm));
  }).detach();
  double bound = nccl_abort_timeout();
  if (result.wait_for(std::chrono::duration<double>(bound)) != std::future_status::ready) {
    std::fprintf(stderr, "[dpsgs] rank %d: ncclCommAbort(%s) did not return within %.0f s; abandoned\n",
                 rank_, name_.c_str(), bound);
  } else if (ncclResult_t rc = result.get(); rc != ncclSuccess && rc != ncclInProgress) {
    // ncclInProgress: a non-blocking communicator's abort continues on NCCL's own thread,
    // which frees the communicator (so nothing may poll it): the abort was accepted.
    std::fprintf(stderr, "[dpsgs] rank %d: ncclCommAbort(%s) failed: %s\n", rank_, name_.c_str(),
                 ncclGetErrorString(rc));
  }
  std::fflush(stderr);
}

}  // namespace dpsgs
